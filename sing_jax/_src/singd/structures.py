r"""Structured square matrices for SINGD's Kronecker factors :math:`K` and :math:`C`.

Every class represents a :math:`d \times d` matrix :math:`S` drawn from a set that is
closed under addition and multiplication (a matrix group once invertible), stored with
fewer than :math:`d^2` numbers. The optimizer needs, for a structure :math:`S` and its
projection :math:`P` (the orthogonal projection of a *symmetric* matrix onto the
structure, off-diagonal mass folded by doubling where the structure is triangular):

.. math::

   \mathrm{from\_inner}(X) = P(S^\top X X^\top S), \qquad
   \mathrm{from\_inner}() = P(S^\top S),

plus :math:`S Y`, :math:`S^\top Y`, :math:`S_1 S_2` (stays in the structure),
:math:`\operatorname{tr}(S)/d`, :math:`S + \alpha I`, sums, scalings and the largest
absolute stored entry.

All classes are JAX pytrees: the arrays are leaves, the dimension and block sizes are
static, so structures go through ``jit``, ``lax.cond``, ``shard_map`` and orbax.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class StructuredMatrix:
    r"""Base class: a :math:`d \times d` matrix stored through a few arrays.

    Subclasses list their array attributes in ``_array_fields`` and their static
    (hashable) options in ``_static_fields``; ``dim`` is always static.
    """

    _array_fields: ClassVar[tuple[str, ...]] = ()
    _static_fields: ClassVar[tuple[str, ...]] = ("dim",)
    name: ClassVar[str] = "structured"
    dim: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls, cls._flatten_with_keys, cls._unflatten, cls._flatten
        )

    # -- pytree plumbing ------------------------------------------------------------
    # Zero-size arrays (an empty remainder block, a hierarchical matrix without middle)
    # are not leaves: they are rebuilt from static shapes, so checkpointers that reject
    # empty arrays (orbax) never see them. They are rebuilt as NumPy arrays, which
    # need no device dispatch: every unflatten (each step's output state, each
    # tree_map) rebuilds them: 2.5 us an unflatten, against 31 us with jnp.zeros.
    def _split_fields(self):
        full, empty = [], []
        for f in self._array_fields:
            x = getattr(self, f)
            if getattr(x, "size", 1) == 0:
                empty.append((f, tuple(x.shape)))
            else:
                full.append(f)
        return full, tuple(empty)

    def _flatten(self):
        full, empty = self._split_fields()
        aux = (tuple(getattr(self, f) for f in self._static_fields), empty)
        return tuple(getattr(self, f) for f in full), aux

    def _flatten_with_keys(self):
        full, empty = self._split_fields()
        aux = (tuple(getattr(self, f) for f in self._static_fields), empty)
        return tuple((jax.tree_util.GetAttrKey(f), getattr(self, f)) for f in full), aux

    @classmethod
    def _unflatten(cls, aux, children):
        static, empty = aux
        obj = object.__new__(cls)
        for f, v in zip(cls._static_fields, static, strict=True):
            object.__setattr__(obj, f, v)
        empty_shapes = dict(empty)
        dtype = next((c.dtype for c in children if isinstance(c, jax.Array | np.ndarray)),
                     jnp.float32)
        it = iter(children)
        for f in cls._array_fields:
            value = np.zeros(empty_shapes[f], dtype) if f in empty_shapes else next(it)
            object.__setattr__(obj, f, value)
        return obj

    def _replace(self, **arrays: Any) -> StructuredMatrix:
        obj = object.__new__(type(self))
        for f in self._static_fields:
            object.__setattr__(obj, f, getattr(self, f))
        for f in self._array_fields:
            object.__setattr__(obj, f, arrays.get(f, getattr(self, f)))
        return obj

    def options(self) -> dict[str, Any]:
        """The static options (besides ``dim``) that rebuild a matrix of this kind."""
        return {f: getattr(self, f) for f in self._static_fields if f != "dim"}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}(dim={self.dim}{', ' if opts else ''}{opts})"

    # -- constructors (subclasses implement from_dense and eye/zeros) ----------------
    @classmethod
    def from_dense(cls, sym_mat: Array, **options: Any) -> StructuredMatrix:
        """The projection :math:`P(M)` of a symmetric dense matrix onto the structure."""
        raise NotImplementedError

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32, **options: Any) -> StructuredMatrix:
        """The zero matrix."""
        return cls.from_dense(jnp.zeros((dim, dim), dtype), **options)

    @classmethod
    def eye(cls, dim: int, dtype: Any = jnp.float32, **options: Any) -> StructuredMatrix:
        """The identity matrix."""
        return cls.zeros(dim, dtype, **options).add_diagonal(1.0)

    @classmethod
    def num_stored(cls, dim: int, **options: Any) -> int:
        """How many numbers a ``dim x dim`` matrix of this structure stores."""
        shapes = jax.eval_shape(lambda: cls.zeros(dim, jnp.float32, **options))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))

    def project(self, sym_mat: Array) -> StructuredMatrix:
        """:math:`P(M)` with this matrix's structure and options."""
        return type(self).from_dense(sym_mat, **self.options())

    # -- operations -----------------------------------------------------------------
    def to_dense(self) -> Array:
        """The represented dense ``dim x dim`` matrix."""
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        return jax.tree.leaves(self)[0].dtype

    def astype(self, dtype: Any) -> StructuredMatrix:
        return jax.tree.map(lambda x: x.astype(dtype), self)

    def matmat(self, mat: Array) -> Array:
        """:math:`S Y` for a dense ``dim x n`` matrix ``Y``."""
        return self.to_dense() @ mat

    def rmatmat(self, mat: Array) -> Array:
        r""":math:`S^\top Y` for a dense ``dim x n`` matrix ``Y``."""
        return self.to_dense().T @ mat

    def outer_matmat(self, mat: Array) -> Array:
        r""":math:`S S^\top Y` (the natural gradient's factor) for a dense ``dim x n``
        ``Y``; ``rmatmat`` then ``matmat``, unless the structure has a cheaper way."""
        return self.matmat(self.rmatmat(mat))

    def right_outer_matmat(self, mat: Array) -> Array:
        r""":math:`Y S S^\top` for a dense ``n x dim`` matrix ``Y`` (the natural
        gradient's right factor in Flax layout): ``outer_matmat`` of ``Y^T``, transposed,
        unless the structure has a cheaper way."""
        return self.outer_matmat(mat.T).T

    def matmul(self, other: StructuredMatrix) -> StructuredMatrix:
        """:math:`S_1 S_2` for two matrices of the same structure (stays in it)."""
        raise NotImplementedError

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, StructuredMatrix):
            return self.matmul(other)
        return self.matmat(other)

    def project_outer(self, mat: Array) -> StructuredMatrix:
        r""":math:`P(Y Y^\top)` for a dense ``dim x n`` matrix ``Y``."""
        return self.project(mat @ mat.T)

    def from_inner(self, mat: Array | None = None) -> StructuredMatrix:
        r""":math:`P(S^\top X X^\top S)`, or :math:`P(S^\top S)` when ``X`` is None."""
        if mat is None:
            return self.project_outer(self.to_dense().T)
        return self.project_outer(self.rmatmat(mat))

    # Dense-cost structures compute P(S^T X X^T S) faster from the Gram matrix X X^T when
    # X has many more columns than rows (conv inputs: one column per patch).
    gram_is_cheaper: ClassVar[bool] = False

    def from_inner_gram(self, gram: Array) -> StructuredMatrix:
        r""":math:`P(S^\top M S)` for a symmetric dense :math:`M` (e.g. :math:`X X^\top`)."""
        half = self.rmatmat(gram)  # S^T M
        full = self.rmatmat(half.T)  # S^T (S^T M)^T = S^T M S  (M symmetric)
        return self.project(0.5 * (full + full.T))

    def uses_gram(self, num_rows: int) -> bool:
        r"""Whether :meth:`from_inner_rows` of ``num_rows`` rows goes through the Gram
        statistic (:meth:`gram_statistic`), which is a sum over rows: then the rows can
        be produced and summed in chunks (see ``capture.input_gram_statistic``)."""
        return self.gram_is_cheaper and num_rows > 2 * self.dim

    def prefers_whole_gram(self, gram_cost_per_row: float) -> bool:
        r"""Whether :meth:`gram_statistic` is best taken from the whole Gram matrix
        :math:`R^\top R` (:meth:`gram_statistic_of_gram`), given what that costs in
        multiply-adds per row. Here the statistic is the whole Gram matrix: always."""
        return True

    def gram_statistic_of_gram(self, gram: Array) -> Any:
        r""":meth:`gram_statistic` of rows :math:`R` from their whole Gram matrix."""
        return gram

    def gram_statistic(self, rows: Array) -> Any:
        r"""The part of :math:`R^\top R` that :math:`P(S^\top R^\top R S)` depends on, a
        pytree that is additive over chunks of rows (here the whole Gram matrix)."""
        return rows.T @ rows

    def from_gram_statistic(self, statistic: Any) -> StructuredMatrix:
        r""":math:`P(S^\top M S)` from ``gram_statistic`` of the rows of :math:`M = R^\top R`."""
        return self.from_inner_gram(statistic)

    def from_inner_rows(self, rows: Array) -> StructuredMatrix:
        r""":math:`P(S^\top R^\top R S)` for a ``(n, dim)`` matrix of rows :math:`R`.

        ``from_inner(R.T)``, or through the Gram statistic where that is cheaper (many
        more rows than columns, for the dense-cost structures).
        """
        if self.uses_gram(rows.shape[0]):
            return self.from_gram_statistic(self.gram_statistic(rows))
        return self.from_inner(rows.T)

    def average_trace(self) -> Array:
        r""":math:`\operatorname{tr}(S) / d`."""
        return _trace(self.to_dense()) / self.dim

    def add_diagonal(self, value: Any) -> StructuredMatrix:
        r""":math:`S + \alpha I`."""
        raise NotImplementedError

    def max_abs(self) -> Array:
        """The largest absolute stored entry (the reference's infinity vector norm)."""
        leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(self) if x.size > 0]
        return jnp.max(jnp.stack(leaves))

    def _check_same(self, other: StructuredMatrix) -> None:
        if type(other) is not type(self) or other.options() != self.options() or (
            other.dim != self.dim
        ):
            raise TypeError(f"cannot combine {self!r} with {other!r}: structures differ")

    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return jax.tree.map(jnp.add, self, other)

    def __sub__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return jax.tree.map(jnp.subtract, self, other)

    def __mul__(self, scalar: Any) -> StructuredMatrix:
        return jax.tree.map(lambda x: (x * scalar).astype(x.dtype), self)

    __rmul__ = __mul__


def _check_square(mat: Array, what: str = "matrix") -> int:
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {mat.shape}")
    return mat.shape[0]


def _trace(mat: Array) -> Array:
    # The diagonal's sum: jnp.trace masks the whole matrix with an identity first, a
    # full pass over it (the dense MLP step of bench_singd: 123.6 -> 120.6 ms).
    return jnp.sum(jnp.diagonal(mat))


def _eye_like(dim: int, dtype: Any) -> Array:
    return jnp.eye(dim, dtype=dtype)


# Below this width the three half-size products of square_gram / square_outer cost
# more than one full product on XLA:CPU (d = 577: 1.02 against 0.95 ms; d = 768: 1.87
# against 2.05 ms).
_SYMMETRIC_PRODUCT_MIN_DIM = 768


def symmetric_product_cost(dim: int) -> float:
    """The flops of :func:`square_gram` / :func:`square_outer` of a ``dim x dim``
    matrix, as a fraction of one ``dim x dim`` matrix product."""
    return 0.75 if dim >= _SYMMETRIC_PRODUCT_MIN_DIM else 1.0


def _symmetric_from_half_blocks(top_left: Array, top_right: Array,
                                bottom_right: Array) -> Array:
    return jnp.concatenate([jnp.concatenate([top_left, top_right], axis=1),
                            jnp.concatenate([top_right.T, bottom_right], axis=1)], axis=0)


def square_gram(mat: Array) -> Array:
    r""":math:`M^\top M` for a square :math:`M`, from three of its four half blocks.

    With :math:`M = [M_1\; M_2]` split by columns, the product is
    :math:`\begin{bmatrix} M_1^\top M_1 & M_1^\top M_2 \\ (M_1^\top M_2)^\top & M_2^\top M_2
    \end{bmatrix}`: three quarters of the flops, and exactly symmetric. Dense SINGD's
    :math:`K^\top K` at T = 1 is flop-bound on CPU (d = 785 / 1024 / 1025: 2.1 / 5.3 /
    4.8 ms as one product, 1.8 / 4.4 / 4.1 ms by blocks). Not for thin inputs
    (``rows @ S``, 128 rows): their products are bound by writing the output. The
    optimizer uses it where the factors are refreshed on every step (T = 1).
    """
    dim = mat.shape[1]
    if dim < _SYMMETRIC_PRODUCT_MIN_DIM:
        return mat.T @ mat
    half = (dim + 1) // 2
    left, right = mat[:, :half], mat[:, half:]
    return _symmetric_from_half_blocks(left.T @ left, left.T @ right, right.T @ right)


def square_outer(mat: Array) -> Array:
    r""":math:`M M^\top` for a square :math:`M`, from three of its four half blocks
    (:math:`M` split by rows; see :func:`square_gram`).

    Not ``square_gram(mat.T)``: that form was slower on XLA:CPU (d = 1024: 6.0 against
    3.8 ms; d = 1025: 4.6 against 4.0 ms; interleaved, one process).
    """
    dim = mat.shape[0]
    if dim < _SYMMETRIC_PRODUCT_MIN_DIM:
        return mat @ mat.T
    half = (dim + 1) // 2
    top, bottom = mat[:half], mat[half:]
    return _symmetric_from_half_blocks(top @ top.T, top @ bottom.T, bottom @ bottom.T)


# ------------------------------------------------------------------------------------
class DenseMatrix(StructuredMatrix):
    r"""A full :math:`d \times d` matrix. Memory: :math:`d^2` numbers."""

    name = "dense"
    _array_fields = ("mat",)
    gram_is_cheaper = True

    def __init__(self, mat: Array):
        self.dim = _check_square(mat)
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
        # (Y S) S^T: untransposed and half-transposed products, which XLA:CPU runs
        # faster than the transposed ones of (S S^T Y^T)^T (a 1025x1024 layer's
        # natural gradient: 21.7 ms against 24.7 ms).
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
        if self.uses_gram(rows.shape[0]):
            return super().from_inner_rows(rows)
        # (R S)^T (R S), the untransposed R S first: from_inner(R^T)'s S^T R^T then
        # s s^T took 3.1 ms on XLA:CPU for 128 rows and d = 1024, against 1.7-2.1 ms
        # (d = 1025: 1.8 against 1.7; the transposed S is slow at power-of-two strides).
        u = rows @ self.mat
        return DenseMatrix(u.T @ u)

    def average_trace(self) -> Array:
        return _trace(self.mat) / self.dim

    def add_diagonal(self, value: Any) -> DenseMatrix:
        return DenseMatrix(self.mat + value * _eye_like(self.dim, self.mat.dtype))


# ------------------------------------------------------------------------------------
class DiagonalMatrix(StructuredMatrix):
    r"""A diagonal matrix :math:`\operatorname{diag}(v)`. Memory: :math:`d` numbers."""

    name = "diagonal"
    _array_fields = ("diag",)

    def __init__(self, diag: Array):
        if diag.ndim != 1:
            raise ValueError(f"diag must be 1-D, got shape {diag.shape}")
        self.dim = diag.shape[0]
        self.diag = diag

    @classmethod
    def from_dense(cls, sym_mat: Array) -> DiagonalMatrix:
        _check_square(sym_mat)
        return cls(jnp.diag(sym_mat))

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32) -> DiagonalMatrix:
        return cls(jnp.zeros((dim,), dtype))

    def to_dense(self) -> Array:
        return jnp.diag(self.diag)

    def matmat(self, mat: Array) -> Array:
        return self.diag[:, None] * mat

    rmatmat = matmat

    def matmul(self, other: StructuredMatrix) -> DiagonalMatrix:
        self._check_same(other)
        return DiagonalMatrix(self.diag * other.diag)

    def project_outer(self, mat: Array) -> DiagonalMatrix:
        return DiagonalMatrix(jnp.sum(mat * mat, axis=1))

    def from_inner(self, mat: Array | None = None) -> DiagonalMatrix:
        return self.from_square_sums(None if mat is None else jnp.sum(mat * mat, axis=1))

    def from_inner_rows(self, rows: Array) -> DiagonalMatrix:
        return self.from_square_sums(jnp.sum(rows * rows, axis=0))

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


# ------------------------------------------------------------------------------------
class BlockDiagonalMatrix(StructuredMatrix):
    r"""Block-diagonal: :math:`\lfloor d/b \rfloor` blocks of size :math:`b` and one
    remainder block of size :math:`d \bmod b`.

    Memory: :math:`\lfloor d/b \rfloor b^2 + (d \bmod b)^2 \le d b` numbers.

    The blocks are general (not symmetric) matrices, so :math:`S^\top Y` transposes
    each block and :math:`P(S^\top S)` is built from :math:`B_i^\top B_i`. The PyTorch
    reference (``singd`` 0.0.5) uses :math:`B_i Y` and :math:`B_i B_i^\top` instead,
    which is only right for symmetric blocks; ``symmetric_blocks=True`` reproduces
    that behaviour for comparisons.
    """

    name = "block_diagonal"
    _array_fields = ("blocks", "last")
    _static_fields = ("dim", "block_size", "symmetric_blocks")

    def __init__(self, blocks: Array, last: Array, block_size: int = 30,
                 symmetric_blocks: bool = False):
        if blocks.ndim != 3 or blocks.shape[1:] != (block_size, block_size):
            raise ValueError(
                f"blocks must have shape (n, {block_size}, {block_size}), got {blocks.shape}"
            )
        r = _check_square(last, "last block")
        if r >= block_size:
            raise ValueError(f"last block must be smaller than {block_size}, got {r}")
        self.dim = blocks.shape[0] * block_size + r
        self.block_size = int(block_size)
        self.symmetric_blocks = bool(symmetric_blocks)
        self.blocks, self.last = blocks, last

    @property
    def _split(self) -> tuple[int, int]:
        return self.dim // self.block_size, self.dim % self.block_size

    @classmethod
    def from_dense(cls, sym_mat: Array, block_size: int = 30,
                   symmetric_blocks: bool = False) -> BlockDiagonalMatrix:
        d = _check_square(sym_mat)
        n = d // block_size
        nb = n * block_size
        head = sym_mat[:nb, :nb].reshape(n, block_size, n, block_size)
        idx = jnp.arange(n)
        blocks = head[idx, :, idx, :]
        return cls(blocks, sym_mat[nb:, nb:], block_size, symmetric_blocks)

    @classmethod
    def zeros(cls, dim: int, dtype: Any = jnp.float32, block_size: int = 30,
              symmetric_blocks: bool = False) -> BlockDiagonalMatrix:
        n, r = divmod(dim, block_size)
        return cls(jnp.zeros((n, block_size, block_size), dtype), jnp.zeros((r, r), dtype),
                   block_size, symmetric_blocks)

    def to_dense(self) -> Array:
        n, _ = self._split
        b = self.block_size
        eye_n = jnp.eye(n, dtype=self.blocks.dtype)
        head = jnp.einsum("nij,nm->nimj", self.blocks, eye_n).reshape(n * b, n * b)
        return jax.scipy.linalg.block_diag(head, self.last)

    def _blockwise(self, blocks: Array, last: Array, mat: Array, transpose: bool) -> Array:
        n, _ = self._split
        b = self.block_size
        nb = n * b
        out_last = (last.T if transpose else last) @ mat[nb:]
        # Row blocks of Y are a free reshape, so one batched product serves every
        # backend (XLA:CPU with YNNPACK's products: 0.75 ms for the 1025x1024 S S^T Y,
        # against 0.87 ms with one product per block).
        head = mat[:nb].reshape(n, b, mat.shape[1])
        spec = "nji,njk->nik" if transpose else "nij,njk->nik"
        out_head = jnp.einsum(spec, blocks, head).reshape(nb, mat.shape[1])
        return jnp.concatenate([out_head, out_last], axis=0)

    def matmat(self, mat: Array) -> Array:
        return self._blockwise(self.blocks, self.last, mat, transpose=False)

    def rmatmat(self, mat: Array) -> Array:
        return self._blockwise(self.blocks, self.last, mat, transpose=not self.symmetric_blocks)

    def _transposed_blocks(self) -> tuple[Array, Array]:
        """The blocks of :math:`S^\top` as ``rmatmat`` uses them: ``B_i^T``, or ``B_i``
        itself under the reference's symmetric-block assumption."""
        if self.symmetric_blocks:
            return self.blocks, self.last
        return jnp.swapaxes(self.blocks, 1, 2), self.last.T

    def _outer_blocks(self) -> tuple[Array, Array]:
        """The blocks of :math:`S S^\top`, which is block-diagonal too."""
        left, left_last = self._transposed_blocks()
        return jnp.einsum("nij,njk->nik", self.blocks, left), self.last @ left_last

    def outer_matmat(self, mat: Array) -> Array:
        # Form the small blocks of S S^T, then read Y once.
        return self._blockwise(*self._outer_blocks(), mat, transpose=False)

    def right_outer_matmat(self, mat: Array) -> Array:
        # Y (S S^T) on column slices of Y: the default (S S^T Y^T)^T makes XLA:CPU copy
        # every row slice of Y^T out of a transpose, which for a 1025x1024 Y took 3.1 ms
        # against 0.7 ms this way.
        blocks, last = self._outer_blocks()
        n, _ = self._split
        b = self.block_size
        nb = n * b
        out_last = mat[:, nb:] @ last
        if jax.default_backend() == "cpu":
            # Column blocks are no free reshape: one batched product would transpose Y
            # first (4.4 ms against 1.2 ms for one product per block).
            heads = [mat[:, i * b:(i + 1) * b] @ blocks[i] for i in range(n)]
            return jnp.concatenate([*heads, out_last], axis=1)
        head = mat[:, :nb].reshape(mat.shape[0], n, b)
        out_head = jnp.einsum("mni,nij->mnj", head, blocks).reshape(mat.shape[0], nb)
        return jnp.concatenate([out_head, out_last], axis=1)

    def matmul(self, other: StructuredMatrix) -> BlockDiagonalMatrix:
        self._check_same(other)
        return self._replace(blocks=jnp.einsum("nij,njk->nik", self.blocks, other.blocks),
                             last=self.last @ other.last)

    def project_outer(self, mat: Array) -> BlockDiagonalMatrix:
        n, _ = self._split
        nb = n * self.block_size
        head = mat[:nb].reshape(n, self.block_size, mat.shape[1])
        return self._replace(blocks=jnp.einsum("nik,njk->nij", head, head),
                             last=mat[nb:] @ mat[nb:].T)

    def from_inner(self, mat: Array | None = None) -> BlockDiagonalMatrix:
        if mat is not None:
            return self.project_outer(self.rmatmat(mat))
        if self.symmetric_blocks:  # the reference's B B^T
            return self._replace(blocks=jnp.einsum("nij,nkj->nik", self.blocks, self.blocks),
                                 last=self.last @ self.last.T)
        return self._replace(blocks=jnp.einsum("nji,njk->nik", self.blocks, self.blocks),
                             last=self.last.T @ self.last)

    def uses_gram(self, num_rows: int) -> bool:
        return True  # the diagonal blocks of R^T R cost what R S costs

    def prefers_whole_gram(self, gram_cost_per_row: float) -> bool:
        # Its own statistic takes d b multiply-adds per row, but also copies each block
        # of columns out of R, which on CPU costs about as much again.
        return gram_cost_per_row <= 2 * self.dim * self.block_size

    def gram_statistic_of_gram(self, gram: Array) -> tuple[Array, Array]:
        n, _ = self._split
        b = self.block_size
        blocks = gram[:n * b, :n * b].reshape(n, b, n, b)
        return blocks[jnp.arange(n), :, jnp.arange(n), :], gram[n * b:, n * b:]

    def gram_statistic(self, rows: Array) -> tuple[Array, Array]:
        # Only the diagonal blocks M_ii of M = R^T R enter P(S^T M S) = blocks
        # S_i^T M_ii S_i: n d b multiply-adds instead of the n d^2 of the whole Gram.
        # One plain product per block of columns: a batched einsum over the blocks
        # makes XLA:CPU transpose all of R first, which costs more than the products.
        if self.prefers_whole_gram(self.dim * self.dim):  # few blocks: no column copies
            return self.gram_statistic_of_gram(rows.T @ rows)
        n, _ = self._split
        b = self.block_size
        blocks = [rows[:, i * b:(i + 1) * b] for i in range(n)]
        gram_blocks = (jnp.stack([blk.T @ blk for blk in blocks]) if n
                       else jnp.zeros((0, b, b), rows.dtype))
        rest = rows[:, n * b:]
        return gram_blocks, rest.T @ rest

    def from_gram_statistic(self, statistic: tuple[Array, Array]) -> BlockDiagonalMatrix:
        gram_blocks, gram_last = statistic
        left, left_last = self._transposed_blocks()
        return self._replace(
            blocks=jnp.einsum("nij,njk,nlk->nil", left, gram_blocks, left),
            last=left_last @ gram_last @ left_last.T)

    def average_trace(self) -> Array:
        total = jnp.sum(jnp.diagonal(self.blocks, axis1=1, axis2=2)) + _trace(self.last)
        return total / self.dim

    def add_diagonal(self, value: Any) -> BlockDiagonalMatrix:
        b, r = self.block_size, self.last.shape[0]
        return self._replace(blocks=self.blocks + value * jnp.eye(b, dtype=self.blocks.dtype),
                             last=self.last + value * jnp.eye(r, dtype=self.last.dtype))


# ------------------------------------------------------------------------------------
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
        dim = _check_square(sym_mat)
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
        # Y S S^T = (S S^T Y^T)^T as outer_matmat, on column slices of Y. Going
        # through Y^T has XLA:CPU scale row slices of Y^T in fusions that transpose
        # as they go (2.6 ms for a 1024x785 Y, most of the MLP step's preconditioner).
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
        return (_trace(self.a) + jnp.sum(self.c) + _trace(self.e)) / self.dim

    def add_diagonal(self, value: Any) -> HierarchicalMatrix:
        n1, _, n2 = self._sizes
        return self._replace(a=self.a + value * jnp.eye(n1, dtype=self.a.dtype),
                             c=self.c + value,
                             e=self.e + value * jnp.eye(n2, dtype=self.e.dtype))


# ------------------------------------------------------------------------------------
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


def _at_least_float32(*arrays: Array) -> Any:
    """The arrays' common dtype, float32 at least (FFTs take no bfloat16/float16)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


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
    the dense form: an FFT convolution of its columns is no faster on XLA:CPU at
    ``d = n = 1024`` (2.3 ms an FFT against 5.3 ms the whole product), matrix units
    favour it, and it is more accurate in float32.
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
        d = _check_square(sym_mat)
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
        t = self.coeffs.astype(_at_least_float32(self.coeffs))
        r = jnp.arange(d, 0, -1, dtype=t.dtype) * t
        shifted = jnp.arange(d)[:, None] + jnp.arange(d)[None, :]  # u + k
        hankel = jnp.concatenate([r, jnp.zeros((d,), r.dtype)])[shifted]
        lags = hankel @ t  # S^T S is symmetric: the same sums above and below
        return type(self)(_fold_diagonal_sums(lags, lags[1:]).astype(self.coeffs.dtype))

    def matmul(self, other: StructuredMatrix) -> _ToeplitzMatrix:
        self._check_same(other)
        # Products of triangular Toeplitz matrices are the truncated convolution, taken
        # with FFTs (jnp.convolve costs 1.5 ms on XLA:CPU for d = 1025).
        n = _fft_length(2 * self.dim - 1)
        dtype = _at_least_float32(self.coeffs, other.coeffs)
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


# ------------------------------------------------------------------------------------
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
        d = _check_square(sym_mat)
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


# ------------------------------------------------------------------------------------
STRUCTURE_CLASSES: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        DenseMatrix,
        DiagonalMatrix,
        BlockDiagonalMatrix,
        HierarchicalMatrix,
        TrilToeplitzMatrix,
        TriuToeplitzMatrix,
        TrilTopLeftDiagonalMatrix,
        TriuTopLeftDiagonalMatrix,
        TrilBottomRightDiagonalMatrix,
        TriuBottomRightDiagonalMatrix,
    )
}

# The PyTorch reference's names.
_REFERENCE_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "block30diagonal": ("block_diagonal", {"block_size": 30}),
    "hierarchical15_15": ("hierarchical", {"k1": 15, "k2": 15}),
    "triltoeplitz": ("tril_toeplitz", {}),
    "triutoeplitz": ("triu_toeplitz", {}),
    "triltopleftdiag": ("tril_top_left_diagonal", {}),
    "triutopleftdiag": ("triu_top_left_diagonal", {}),
    "trilbottomrightdiag": ("tril_bottom_right_diagonal", {}),
    "triubottomrightdiag": ("triu_bottom_right_diagonal", {}),
}


@dataclasses.dataclass(frozen=True)
class StructureSpec:
    """A structure name with its options, e.g. ``StructureSpec("block_diagonal",
    (("block_size", 10),))``; build one with :func:`structure`."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def cls(self) -> type[StructuredMatrix]:
        return STRUCTURE_CLASSES[self.name]

    def eye(self, dim: int, dtype: Any) -> StructuredMatrix:
        return self.cls.eye(dim, dtype, **dict(self.options))

    def zeros(self, dim: int, dtype: Any) -> StructuredMatrix:
        return self.cls.zeros(dim, dtype, **dict(self.options))

    def num_stored(self, dim: int) -> int:
        return self.cls.num_stored(dim, **dict(self.options))

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}({opts})" if opts else self.name


def structure(name: str | StructureSpec, **options: Any) -> StructureSpec:
    """Resolve a structure name (ours or the reference's) and options into a spec.

    Names: ``dense``, ``diagonal``, ``block_diagonal`` (``block_size=30``),
    ``hierarchical`` (``k1=15, k2=15``), ``tril_toeplitz``, ``triu_toeplitz``,
    ``tril_top_left_diagonal``, ``triu_top_left_diagonal``,
    ``tril_bottom_right_diagonal``, ``triu_bottom_right_diagonal``; the reference's
    ``block30diagonal``, ``hierarchical15_15``, ``triltoeplitz``, ``triutoeplitz``.
    """
    if isinstance(name, StructureSpec):
        if not options:
            return name
        merged = dict(name.options) | options
        return structure(name.name, **merged)
    if not isinstance(name, str):
        raise TypeError(f"a structure must be a name or StructureSpec, got {name!r}")
    key = name.lower()
    if key in _REFERENCE_ALIASES:
        key, defaults = _REFERENCE_ALIASES[key]
        options = defaults | options
    if key not in STRUCTURE_CLASSES:
        known = sorted(STRUCTURE_CLASSES) + sorted(_REFERENCE_ALIASES)
        raise ValueError(f"unknown structure {name!r}; expected one of {known}")
    cls = STRUCTURE_CLASSES[key]
    allowed = set(cls._static_fields) - {"dim"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"structure {key!r} got unknown options {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    for option in ("block_size", "k1", "k2"):
        value = options.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                  or value < 1):
            raise ValueError(
                f"structure {key!r}: {option}={value!r} is not allowed; expected an int >= 1"
            )
    return StructureSpec(key, tuple(sorted(options.items())))


StructureLike = str | StructureSpec
StructureFactory = Callable[[int, Any], StructuredMatrix]
