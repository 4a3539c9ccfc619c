"""Dense and diagonal factors: the two ends of the memory range."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sing_jax._src.singd.structures.base import StructuredMatrix, check_square, trace

Array = jax.Array


class DenseMatrix(StructuredMatrix):
    r"""A full :math:`d \times d` matrix. Memory: :math:`d^2` numbers."""

    name = "dense"
    _array_fields = ("mat",)
    gram_is_cheaper = True

    def __init__(self, mat: Array):
        self.dim = check_square(mat)
        self.mat = mat

    @classmethod
    def from_dense(cls, sym_mat: Array) -> DenseMatrix:
        return cls(sym_mat)

    def to_dense(self) -> Array:
        return self.mat

    def matmat(self, mat: Array) -> Array:
        return self.mat @ mat

    def rmatmat(self, mat: Array) -> Array:
        return self.mat.T @ mat

    def right_outer_matmat(self, mat: Array) -> Array:
        # (Y S) S^T: Y in the kernel's (d_in, d_out) layout is never transposed.
        return (mat @ self.mat) @ self.mat.T

    def matmul(self, other: StructuredMatrix) -> DenseMatrix:
        self._check_same(other)
        return DenseMatrix(self.mat @ other.mat)

    def from_inner(self, mat: Array | None = None) -> DenseMatrix:
        if mat is None:
            return DenseMatrix(self.mat.T @ self.mat)
        s = self.mat.T @ mat
        return DenseMatrix(s @ s.T)

    def from_inner_rows(self, rows: Array) -> DenseMatrix:
        # (R S)^T (R S): the rows are never transposed.
        u = rows @ self.mat
        return DenseMatrix(u.T @ u)

    def average_trace(self) -> Array:
        return trace(self.mat) / self.dim

    def add_diagonal(self, value: Any) -> DenseMatrix:
        return DenseMatrix(self.mat + value * jnp.eye(self.dim, dtype=self.mat.dtype))


class DiagonalMatrix(StructuredMatrix):
    r"""A diagonal matrix :math:`\operatorname{diag}(v)`. Memory: :math:`d` numbers.

    Its curvature needs only the column sums of squares of the rows :math:`R`
    (the diagonal of :math:`R^\top R`): :meth:`from_square_sums`.
    """

    name = "diagonal"
    _array_fields = ("diag",)
    input_statistic = "square_sums"

    def __init__(self, diag: Array):
        if diag.ndim != 1:
            raise ValueError(f"diag must be 1-D, got shape {diag.shape}")
        self.dim = diag.shape[0]
        self.diag = diag

    @classmethod
    def from_dense(cls, sym_mat: Array) -> DiagonalMatrix:
        check_square(sym_mat)
        return cls(jnp.diag(sym_mat))

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32) -> DiagonalMatrix:
        return cls(jnp.zeros((dim,), dtype))

    def to_dense(self) -> Array:
        return jnp.diag(self.diag)

    def matmat(self, mat: Array) -> Array:
        return self.diag[:, None] * mat

    rmatmat = matmat

    def right_outer_matmat(self, mat: Array) -> Array:
        return mat * jnp.square(self.diag)[None, :]

    def matmul(self, other: StructuredMatrix) -> DiagonalMatrix:
        self._check_same(other)
        return DiagonalMatrix(self.diag * other.diag)

    def project_outer(self, mat: Array) -> DiagonalMatrix:
        return DiagonalMatrix(jnp.sum(mat * mat, axis=1))

    def from_inner(self, mat: Array | None = None) -> DiagonalMatrix:
        return self.from_square_sums(None if mat is None else jnp.sum(mat * mat, axis=1))

    def from_inner_rows(self, rows: Array) -> DiagonalMatrix:
        return self.from_square_sums(jnp.sum(rows * rows, axis=0))

    def from_gram(self, gram: Array) -> DiagonalMatrix:
        return self.from_square_sums(jnp.diagonal(gram))

    def from_square_sums(self, square_sums: Array | None) -> DiagonalMatrix:
        r""":math:`P(S^\top X X^\top S)` from the row sums of squares of :math:`X`
        (``None``: :math:`X = I`). The diagonal of :math:`X X^\top` is all it needs."""
        sq = self.diag * self.diag
        if square_sums is not None:
            sq = sq * square_sums.astype(sq.dtype)
        return DiagonalMatrix(sq)

    def average_trace(self) -> Array:
        return jnp.mean(self.diag)

    def add_diagonal(self, value: Any) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag + value)
