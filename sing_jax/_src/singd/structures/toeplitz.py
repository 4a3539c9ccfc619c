"""Triangular Toeplitz factors: ``d`` numbers, products by FFT."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sing_jax._src.singd.structures.base import (
    StructuredMatrix,
    at_least_float32,
    check_square,
)
from sing_jax._src.singd.structures.dense import DenseMatrix

Array = jax.Array


def _diagonal_sums(mat: Array) -> Array:
    """Sums of the diagonals of a square matrix, for offsets ``i - j = -(d-1)..(d-1)``."""
    d = mat.shape[0]
    offsets = jnp.arange(d)[:, None] - jnp.arange(d)[None, :] + (d - 1)
    return jax.ops.segment_sum(mat.ravel(), offsets.ravel(), num_segments=2 * d - 1)


def _fft_length(min_length: int) -> int:
    """The smallest ``2^a 3^b 5^c >= min_length`` (lengths FFTs are fast at)."""
    best = 2 ** max(min_length - 1, 0).bit_length()
    power3 = 1
    while power3 < best:
        power5 = power3
        while power5 < best:
            length = power5
            while length < min_length:
                length *= 2
            best = min(best, length)
            power5 *= 5
        power3 *= 3
    return best


def _fold_diagonal_sums(below: Array, above: Array) -> Array:
    """Toeplitz coefficients of the projection from the diagonal sums at offsets
    ``0..d-1`` below and ``1..d-1`` above: ``t_k = (below_k + above_k) / (d - k)``."""
    d = below.shape[0]
    return below.at[1:].add(above) / jnp.arange(d, 0, -1, dtype=below.dtype)


class _ToeplitzMatrix(StructuredMatrix):
    r"""Triangular Toeplitz matrix stored by its ``d`` diagonal coefficients.

    What only involves the coefficients avoids the dense form: the product of two
    such matrices is a truncated convolution (zero-padded FFTs of length
    :math:`\ge 2d - 1`, in float32 at least) and :math:`P(S^\top S)` has a closed
    form in :math:`d^2` multiply-adds. Products with a dense ``d x n`` matrix use
    the dense form: matrix units run it well, and it is more accurate in float32
    than an FFT convolution of every column.
    """

    _array_fields = ("coeffs",)
    lower: ClassVar[bool]
    gram_is_cheaper = True

    def __init__(self, coeffs: Array):
        if coeffs.ndim != 1:
            raise ValueError(f"coeffs must be 1-D, got shape {coeffs.shape}")
        self.dim = coeffs.shape[0]
        self.coeffs = coeffs

    @classmethod
    def from_dense(cls, sym_mat: Array) -> _ToeplitzMatrix:
        d = check_square(sym_mat)
        sums = _diagonal_sums(sym_mat)
        below = sums[d - 1:]  # offsets 0..d-1 (i - j >= 0)
        above = sums[: d - 1][::-1]  # offsets -1..-(d-1)
        return cls(_fold_diagonal_sums(below, above))

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32) -> _ToeplitzMatrix:
        return cls(jnp.zeros((dim,), dtype))

    def to_dense(self) -> Array:
        d = self.dim
        offset = jnp.arange(d)[:, None] - jnp.arange(d)[None, :]
        if not self.lower:
            offset = -offset
        vals = self.coeffs[jnp.clip(offset, 0, d - 1)]
        return jnp.where(offset >= 0, vals, jnp.zeros((), self.coeffs.dtype))

    def right_outer_matmat(self, mat: Array) -> Array:
        # The dense form's (Y S) S^T: untransposed products (the default transposes Y
        # twice).
        return DenseMatrix(self.to_dense()).right_outer_matmat(mat)

    def from_inner(self, mat: Array | None = None) -> _ToeplitzMatrix:
        if mat is not None:
            return super().from_inner(mat)
        # The lag-k diagonal sum of S^T S (either triangle) is
        # sum_u (d - k - u) t_u t_{u+k} = sum_u r_{u+k} t_u with r_s = (d - s) t_s:
        # a Hankel matrix of r times t, d^2 multiply-adds instead of the d^3 of S^T S.
        # (An FFT correlation is cheaper still but ~5x less accurate in float32.)
        # In float32 at least: the weights d - s are integers up to d.
        d = self.dim
        t = self.coeffs.astype(at_least_float32(self.coeffs))
        r = jnp.arange(d, 0, -1, dtype=t.dtype) * t
        shifted = jnp.arange(d)[:, None] + jnp.arange(d)[None, :]  # u + k
        hankel = jnp.concatenate([r, jnp.zeros((d,), r.dtype)])[shifted]
        lags = hankel @ t  # S^T S is symmetric: the same sums above and below
        return type(self)(_fold_diagonal_sums(lags, lags[1:]).astype(self.coeffs.dtype))

    def matmul(self, other: StructuredMatrix) -> _ToeplitzMatrix:
        self._check_same(other)
        # Products of triangular Toeplitz matrices are the truncated convolution, taken
        # with FFTs: O(d log d) instead of the O(d^2) of a direct convolution.
        n = _fft_length(2 * self.dim - 1)
        dtype = at_least_float32(self.coeffs, other.coeffs)
        spectrum = (jnp.fft.rfft(self.coeffs.astype(dtype), n)
                    * jnp.fft.rfft(other.coeffs.astype(dtype), n))
        return type(self)(jnp.fft.irfft(spectrum, n)[: self.dim].astype(self.coeffs.dtype))

    def average_trace(self) -> Array:
        return self.coeffs[0]

    def add_diagonal(self, value: Any) -> _ToeplitzMatrix:
        return type(self)(self.coeffs.at[0].add(value))


class TrilToeplitzMatrix(_ToeplitzMatrix):
    r"""Lower-triangular Toeplitz: :math:`S_{ij} = t_{i-j}` for :math:`i \ge j`.

    Memory: :math:`d` numbers. Projection: :math:`t_0` is the mean of the diagonal,
    :math:`t_k` is (sum of sub-diagonal :math:`k` + sum of super-diagonal :math:`k`)
    divided by :math:`d-k`.
    """

    name = "tril_toeplitz"
    lower = True


class TriuToeplitzMatrix(_ToeplitzMatrix):
    r"""Upper-triangular Toeplitz: :math:`S_{ij} = t_{j-i}` for :math:`j \ge i`.

    Memory: :math:`d` numbers; the projection folds like :class:`TrilToeplitzMatrix`.
    """

    name = "triu_toeplitz"
    lower = False
