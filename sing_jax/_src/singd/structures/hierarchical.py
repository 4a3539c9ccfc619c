"""Hierarchical (arrowhead-like) factors (the reference's ``hierarchical15_15``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sing_jax._src.singd.structures.base import StructuredMatrix, check_square, trace

Array = jax.Array


def _hierarchical_dims(dim: int, k1: int, k2: int) -> tuple[int, int, int]:
    if dim <= k1:
        return dim, 0, 0
    if dim <= k1 + k2:
        return k1, 0, dim - k1
    return k1, dim - k1 - k2, k2


class HierarchicalMatrix(StructuredMatrix):
    r"""Hierarchical (arrowhead-like) matrix with blocks of sizes :math:`k_1, m, k_2`:

    .. math::

       S = \begin{pmatrix} A & B_m & B_e \\ 0 & \operatorname{diag}(c) & 0 \\
           0 & D & E \end{pmatrix},\quad A \in \mathbb{R}^{k_1\times k_1},
           E \in \mathbb{R}^{k_2\times k_2},\ m = d - k_1 - k_2.

    A small ``d`` fills only ``A`` (``d <= k1``) or ``A, B, E`` (``d <= k1 + k2``).
    Memory: :math:`k_1^2 + k_1(d-k_1) + m + k_2 m + k_2^2` numbers. The projection keeps
    :math:`M_{11}, 2 M_{12}, \operatorname{diag}(M_{22}), 2 M_{32}, M_{33}`.
    """

    name = "hierarchical"
    _array_fields = ("a", "b", "c", "d", "e")
    gram_is_cheaper = True
    _static_fields = ("dim", "k1", "k2")

    def __init__(self, a: Array, b: Array, c: Array, d: Array, e: Array,
                 k1: int = 15, k2: int = 15):
        n1, nm, n2 = a.shape[0], c.shape[0], e.shape[0]
        expected = {"a": (n1, n1), "b": (n1, nm + n2), "c": (nm,), "d": (n2, nm), "e": (n2, n2)}
        for key, arr in zip("abcde", (a, b, c, d, e), strict=True):
            if arr.shape != expected[key]:
                raise ValueError(f"block {key} must have shape {expected[key]}, got {arr.shape}")
        self.dim = n1 + nm + n2
        if _hierarchical_dims(self.dim, k1, k2) != (n1, nm, n2):
            raise ValueError(
                f"blocks ({n1}, {nm}, {n2}) do not match dim={self.dim}, k1={k1}, k2={k2}"
            )
        self.k1, self.k2 = int(k1), int(k2)
        self.a, self.b, self.c, self.d, self.e = a, b, c, d, e

    @property
    def _sizes(self) -> tuple[int, int, int]:
        return _hierarchical_dims(self.dim, self.k1, self.k2)

    @classmethod
    def from_dense(cls, sym_mat: Array, k1: int = 15, k2: int = 15) -> HierarchicalMatrix:
        dim = check_square(sym_mat)
        n1, nm, _ = _hierarchical_dims(dim, k1, k2)
        s = n1 + nm
        return cls(sym_mat[:n1, :n1], 2 * sym_mat[:n1, n1:], jnp.diag(sym_mat)[n1:s],
                   2 * sym_mat[s:, n1:s], sym_mat[s:, s:], k1, k2)

    def to_dense(self) -> Array:
        n1, nm, n2 = self._sizes
        s = n1 + nm
        out = jnp.zeros((self.dim, self.dim), self.a.dtype)
        out = out.at[:n1, :n1].set(self.a).at[:n1, n1:].set(self.b)
        idx = jnp.arange(n1, s)
        out = out.at[idx, idx].set(self.c)
        return out.at[s:, n1:s].set(self.d).at[s:, s:].set(self.e)

    def _split_rows(self, mat: Array) -> tuple[Array, Array, Array]:
        n1, nm, _ = self._sizes
        return mat[:n1], mat[n1:n1 + nm], mat[n1 + nm:]

    def matmat(self, mat: Array) -> Array:
        n1, nm, _ = self._sizes
        top, mid, bot = self._split_rows(mat)
        b_m, b_e = self.b[:, :nm], self.b[:, nm:]
        out_top = self.a @ top + b_m @ mid + b_e @ bot
        out_mid = self.c[:, None] * mid
        out_bot = self.d @ mid + self.e @ bot
        return jnp.concatenate([out_top, out_mid, out_bot], axis=0)

    def rmatmat(self, mat: Array) -> Array:
        n1, nm, _ = self._sizes
        top, mid, bot = self._split_rows(mat)
        b_m, b_e = self.b[:, :nm], self.b[:, nm:]
        out_top = self.a.T @ top
        out_mid = b_m.T @ top + self.c[:, None] * mid + self.d.T @ bot
        out_bot = b_e.T @ top + self.e.T @ bot
        return jnp.concatenate([out_top, out_mid, out_bot], axis=0)

    def outer_matmat(self, mat: Array) -> Array:
        # S S^T Y with the thin blocks stacked: the middle rows of S^T Y are
        # Z_m = [B_m; D]^T [Y_1; Y_2] + c Y_m, and [B_m; D] Z_m gives both thin rows'
        # middle terms, so the large middle block is read and written fewer times
        # than by rmatmat then matmat.
        n1, nm, _ = self._sizes
        top, mid, bot = self._split_rows(mat)
        b_e = self.b[:, nm:]
        thin = jnp.concatenate([self.b[:, :nm], self.d], axis=0)  # (n1 + n2, nm)
        z_mid = thin.T @ jnp.concatenate([top, bot], axis=0) + self.c[:, None] * mid
        z_top, z_bot = self.a.T @ top, b_e.T @ top + self.e.T @ bot
        from_mid = thin @ z_mid
        return jnp.concatenate([self.a @ z_top + from_mid[:n1] + b_e @ z_bot,
                                self.c[:, None] * z_mid,
                                from_mid[n1:] + self.e @ z_bot], axis=0)

    def right_outer_matmat(self, mat: Array) -> Array:
        # Y S S^T = (S S^T Y^T)^T as outer_matmat does it, on column slices of Y: Y
        # (the kernel's (d_in, d_out) layout) is never transposed.
        n1, nm, _ = self._sizes
        left, mid, right = mat[:, :n1], mat[:, n1:n1 + nm], mat[:, n1 + nm:]
        b_e = self.b[:, nm:]
        thin = jnp.concatenate([self.b[:, :nm], self.d], axis=0)  # (n1 + n2, nm)
        z_mid = jnp.concatenate([left, right], axis=1) @ thin + mid * self.c
        z_left, z_right = left @ self.a, left @ b_e + right @ self.e
        from_mid = z_mid @ thin.T
        return jnp.concatenate([z_left @ self.a.T + from_mid[:, :n1] + z_right @ b_e.T,
                                z_mid * self.c,
                                from_mid[:, n1:] + z_right @ self.e.T], axis=1)

    def matmul(self, other: StructuredMatrix) -> HierarchicalMatrix:
        self._check_same(other)
        _, nm, _ = self._sizes
        b_m, b_e = self.b[:, :nm], self.b[:, nm:]
        ob_m, ob_e = other.b[:, :nm], other.b[:, nm:]
        new_b = jnp.concatenate(
            [self.a @ ob_m + b_m * other.c[None, :] + b_e @ other.d, self.a @ ob_e + b_e @ other.e],
            axis=1,
        )
        return self._replace(a=self.a @ other.a, b=new_b, c=self.c * other.c,
                             d=self.d * other.c[None, :] + self.e @ other.d, e=self.e @ other.e)

    def project_outer(self, mat: Array) -> HierarchicalMatrix:
        s_a, s_m, s_e = self._split_rows(mat)
        return self._replace(
            a=s_a @ s_a.T,
            b=2 * jnp.concatenate([s_a @ s_m.T, s_a @ s_e.T], axis=1),
            c=jnp.sum(s_m * s_m, axis=1),
            d=2 * s_e @ s_m.T,
            e=s_e @ s_e.T,
        )

    def from_inner(self, mat: Array | None = None) -> HierarchicalMatrix:
        if mat is not None:
            return self.project_outer(self.rmatmat(mat))
        _, nm, _ = self._sizes
        b_m, b_e = self.b[:, :nm], self.b[:, nm:]
        return self._replace(
            a=self.a.T @ self.a,
            b=2 * self.a.T @ self.b,
            c=self.c ** 2 + jnp.sum(b_m ** 2, axis=0) + jnp.sum(self.d ** 2, axis=0),
            d=2 * (b_e.T @ b_m + self.e.T @ self.d),
            e=self.e.T @ self.e + b_e.T @ b_e,
        )

    def average_trace(self) -> Array:
        return (trace(self.a) + jnp.sum(self.c) + trace(self.e)) / self.dim

    def add_diagonal(self, value: Any) -> HierarchicalMatrix:
        n1, _, n2 = self._sizes
        return self._replace(a=self.a + value * jnp.eye(n1, dtype=self.a.dtype),
                             c=self.c + value,
                             e=self.e + value * jnp.eye(n2, dtype=self.e.dtype))
