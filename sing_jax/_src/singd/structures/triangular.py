"""Triangular factors made of a diagonal and one dense row or column (``2d - 1``
numbers; not registered in the reference optimizer)."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sing_jax._src.singd.structures.base import StructuredMatrix, check_square

Array = jax.Array


class _TriangularDiagonalMatrix(StructuredMatrix):
    r"""A diagonal plus one dense row or column at index ``s`` (first or last), kept
    triangular. Memory: :math:`2d - 1` numbers (the diagonal and the off-diagonal
    entries of the special row/column). The projection folds the off-diagonal mass:
    :math:`v_j = M_{sj} + M_{js}`.
    """

    _array_fields = ("diag", "offdiag")
    lower: ClassVar[bool]
    special_last: ClassVar[bool]

    def __init__(self, diag: Array, offdiag: Array):
        if diag.ndim != 1 or offdiag.shape != (max(diag.shape[0] - 1, 0),):
            raise ValueError(
                f"diag must be 1-D (d,) and offdiag (d-1,), got {diag.shape}, {offdiag.shape}"
            )
        self.dim = diag.shape[0]
        self.diag, self.offdiag = diag, offdiag

    @classmethod
    def _is_row(cls) -> bool:
        # lower with the dense part at the end is a last row; upper at the start a first row
        return cls.lower == cls.special_last

    @classmethod
    def _special(cls, dim: int) -> int:
        return dim - 1 if cls.special_last else 0

    @classmethod
    def _pad(cls, offdiag: Array) -> Array:
        """The full length-d vector with a zero at the special index."""
        zero = jnp.zeros((1,), offdiag.dtype)
        parts = [offdiag, zero] if cls.special_last else [zero, offdiag]
        return jnp.concatenate(parts)

    @classmethod
    def _unpad(cls, full: Array) -> Array:
        return full[:-1] if cls.special_last else full[1:]

    @classmethod
    def from_dense(cls, sym_mat: Array) -> _TriangularDiagonalMatrix:
        d = check_square(sym_mat)
        s = cls._special(d)
        folded = sym_mat[s, :] + sym_mat[:, s]
        return cls(jnp.diag(sym_mat), cls._unpad(folded))

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32) -> _TriangularDiagonalMatrix:
        return cls(jnp.zeros((dim,), dtype), jnp.zeros((max(dim - 1, 0),), dtype))

    def to_dense(self) -> Array:
        s = self._special(self.dim)
        v = self._pad(self.offdiag)
        out = jnp.diag(self.diag)
        return out.at[s, :].add(v) if self._is_row() else out.at[:, s].add(v)

    def _row_form_matmat(self, mat: Array) -> Array:
        # (D + e_s v^T) Y
        s = self._special(self.dim)
        return (self.diag[:, None] * mat).at[s].add(self._pad(self.offdiag) @ mat)

    def _col_form_matmat(self, mat: Array) -> Array:
        # (D + v e_s^T) Y
        s = self._special(self.dim)
        return self.diag[:, None] * mat + self._pad(self.offdiag)[:, None] * mat[s][None, :]

    def matmat(self, mat: Array) -> Array:
        return self._row_form_matmat(mat) if self._is_row() else self._col_form_matmat(mat)

    def rmatmat(self, mat: Array) -> Array:
        return self._col_form_matmat(mat) if self._is_row() else self._row_form_matmat(mat)

    def _times_row_form(self, mat: Array) -> Array:
        # Y (D + e_s v^T)
        s = self._special(self.dim)
        return mat * self.diag[None, :] + mat[:, s][:, None] * self._pad(self.offdiag)[None, :]

    def _times_col_form(self, mat: Array) -> Array:
        # Y (D + v e_s^T)
        s = self._special(self.dim)
        return (mat * self.diag[None, :]).at[:, s].add(mat @ self._pad(self.offdiag))

    def right_outer_matmat(self, mat: Array) -> Array:
        # (Y S) S^T in O(nd), on the columns of Y: the default transposes Y twice.
        if self._is_row():
            return self._times_col_form(self._times_row_form(mat))
        return self._times_row_form(self._times_col_form(mat))

    def from_inner(self, mat: Array | None = None) -> _TriangularDiagonalMatrix:
        if mat is not None:
            return super().from_inner(mat)
        # P(S^T S) in closed form, without the dense d x d matrix (v_s = 0):
        #   row form S = D + e_s v^T: S^T S = D^2 + d_s (e_s v^T + v e_s^T) + v v^T
        #   column form S = D + v e_s^T: S^T S = D^2 + D v e_s^T + e_s v^T D + |v|^2 e_s e_s^T
        s = self._special(self.dim)
        v = self._pad(self.offdiag)
        if self._is_row():
            return type(self)(self.diag ** 2 + v ** 2, self._unpad(2 * self.diag[s] * v))
        diag = (self.diag ** 2).at[s].add(jnp.sum(v * v))
        return type(self)(diag, self._unpad(2 * self.diag * v))

    def matmul(self, other: StructuredMatrix) -> _TriangularDiagonalMatrix:
        self._check_same(other)
        s = self._special(self.dim)
        v1, v2 = self._pad(self.offdiag), self._pad(other.offdiag)
        if self._is_row():  # (D1 + e v1^T)(D2 + e v2^T) = D1 D2 + e (D2 v1 + D1_s v2)^T
            v = other.diag * v1 + self.diag[s] * v2
        else:  # (D1 + v1 e^T)(D2 + v2 e^T) = D1 D2 + (D2_s v1 + D1 v2) e^T
            v = other.diag[s] * v1 + self.diag * v2
        return type(self)(self.diag * other.diag, self._unpad(v))

    def project_outer(self, mat: Array) -> _TriangularDiagonalMatrix:
        s = self._special(self.dim)
        folded = 2 * (mat @ mat[s])
        return type(self)(jnp.sum(mat * mat, axis=1), self._unpad(folded))

    def average_trace(self) -> Array:
        return jnp.mean(self.diag)

    def add_diagonal(self, value: Any) -> _TriangularDiagonalMatrix:
        return type(self)(self.diag + value, self.offdiag)


class TrilTopLeftDiagonalMatrix(_TriangularDiagonalMatrix):
    r"""Lower triangular :math:`\begin{pmatrix} \operatorname{diag}(a) & 0 \\ b^\top & c
    \end{pmatrix}`: a diagonal top-left block and a dense last row."""

    name = "tril_top_left_diagonal"
    lower, special_last = True, True


class TriuTopLeftDiagonalMatrix(_TriangularDiagonalMatrix):
    r"""Upper triangular :math:`\begin{pmatrix} \operatorname{diag}(a) & b \\ 0 & c
    \end{pmatrix}`: a diagonal top-left block and a dense last column."""

    name = "triu_top_left_diagonal"
    lower, special_last = False, True


class TrilBottomRightDiagonalMatrix(_TriangularDiagonalMatrix):
    r"""Lower triangular :math:`\begin{pmatrix} c & 0 \\ b & \operatorname{diag}(a)
    \end{pmatrix}`: a dense first column and a diagonal bottom-right block."""

    name = "tril_bottom_right_diagonal"
    lower, special_last = True, False


class TriuBottomRightDiagonalMatrix(_TriangularDiagonalMatrix):
    r"""Upper triangular :math:`\begin{pmatrix} c & b^\top \\ 0 & \operatorname{diag}(a)
    \end{pmatrix}`: a dense first row and a diagonal bottom-right block."""

    name = "triu_bottom_right_diagonal"
    lower, special_last = False, False
