r"""The base class of SINGD's structured factors :math:`K` and :math:`C`.

A structure represents a :math:`d \times d` matrix :math:`S` drawn from a set that is
closed under addition and multiplication, stored with fewer than :math:`d^2` numbers.
For a structure and its projection :math:`P` (the orthogonal projection of a
*symmetric* matrix onto the structure, off-diagonal mass folded by doubling where the
structure is triangular) the optimizer needs

.. math::

   \mathrm{from\_inner}(X) = P(S^\top X X^\top S), \qquad
   \mathrm{from\_inner}() = P(S^\top S),

plus :math:`S Y`, :math:`S^\top Y`, :math:`S S^\top Y`, :math:`Y S S^\top`,
:math:`S_1 S_2` (stays in the structure), :math:`\operatorname{tr}(S)/d`,
:math:`S + \alpha I`, sums, scalings and the largest absolute stored entry.

The curvature :math:`H = P(S^\top A^\top A S)` of a layer is formed from the one
statistic of the rows of :math:`A` that the structure needs
(:attr:`StructuredMatrix.input_statistic`): the whole Gram matrix :math:`A^\top A`
(or the rows themselves, when there are few), its diagonal, or its diagonal blocks.

All classes are JAX pytrees: the arrays are leaves, the dimension and options are
static, so structures go through ``jit``, ``vmap``, ``lax.cond``, ``shard_map`` and
orbax.
"""

from __future__ import annotations

import math
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
    # Which statistic of the rows R of A the curvature P(S^T R^T R S) is formed from:
    # "gram" (R^T R, or R itself when it has few rows), "square_sums" (the diagonal of
    # R^T R) or "block_gram" (its diagonal blocks).
    input_statistic: ClassVar[str] = "gram"
    # Whether P(S^T M S) from the d x d Gram matrix M takes fewer multiply-adds than
    # from the rows once there are more than 2 d of them (S^T M S costs ~2 d^3).
    gram_is_cheaper: ClassVar[bool] = False
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
    # need no device dispatch.
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
        gradient's right factor in Flax layout): ``outer_matmat`` of ``Y^T``,
        transposed, unless the structure has a cheaper way."""
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

    def from_inner_rows(self, rows: Array) -> StructuredMatrix:
        r""":math:`P(S^\top R^\top R S)` for a ``(n, dim)`` matrix of rows :math:`R`."""
        return self.from_inner(rows.T)

    def from_gram(self, gram: Array) -> StructuredMatrix:
        r""":math:`P(S^\top M S)` for a symmetric dense :math:`M` (e.g. :math:`R^\top R`)."""
        half = self.rmatmat(gram)  # S^T M
        full = self.rmatmat(half.T)  # S^T (S^T M)^T = S^T M S  (M symmetric)
        return self.project(0.5 * (full + full.T))

    def uses_gram(self, num_rows: int) -> bool:
        """Whether the curvature of ``num_rows`` rows is formed from their Gram matrix
        (:meth:`from_gram`) rather than from the rows (:meth:`from_inner_rows`): for
        the structures where that takes fewer multiply-adds, once there are more than
        ``2 dim`` rows."""
        return self.gram_is_cheaper and num_rows > 2 * self.dim

    def average_trace(self) -> Array:
        r""":math:`\operatorname{tr}(S) / d`."""
        return trace(self.to_dense()) / self.dim

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


def check_square(mat: Array, what: str = "matrix") -> int:
    """The side of a square 2-D matrix; a ValueError naming ``what`` otherwise."""
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {mat.shape}")
    return mat.shape[0]


def trace(mat: Array) -> Array:
    """The sum of the diagonal (``jnp.trace`` masks the whole matrix first)."""
    return jnp.sum(jnp.diagonal(mat))


def at_least_float32(*arrays: Array) -> Any:
    """The arrays' common dtype, float32 at least (FFTs take no bfloat16/float16, and
    integer weights up to ``d`` need its precision)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
