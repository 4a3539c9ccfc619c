r"""Structured square matrices for SINGD's Kronecker factors :math:`K` and :math:`C`.

One module per family (as the PyTorch reference lays them out): :mod:`.base` (the
operations every structure provides), :mod:`.dense` (dense, diagonal),
:mod:`.block_diagonal`, :mod:`.hierarchical`, :mod:`.toeplitz`, :mod:`.triangular`.
This module is the registry from names (ours and the reference's) to classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sing_jax._src.singd.structures.base import StructuredMatrix
from sing_jax._src.singd.structures.block_diagonal import BlockDiagonalMatrix
from sing_jax._src.singd.structures.dense import DenseMatrix, DiagonalMatrix
from sing_jax._src.singd.structures.hierarchical import HierarchicalMatrix
from sing_jax._src.singd.structures.toeplitz import TrilToeplitzMatrix, TriuToeplitzMatrix
from sing_jax._src.singd.structures.triangular import (
    TrilBottomRightDiagonalMatrix,
    TrilTopLeftDiagonalMatrix,
    TriuBottomRightDiagonalMatrix,
    TriuTopLeftDiagonalMatrix,
)

__all__ = [
    "STRUCTURE_CLASSES",
    "BlockDiagonalMatrix",
    "DenseMatrix",
    "DiagonalMatrix",
    "HierarchicalMatrix",
    "StructureSpec",
    "StructuredMatrix",
    "TrilBottomRightDiagonalMatrix",
    "TrilToeplitzMatrix",
    "TrilTopLeftDiagonalMatrix",
    "TriuBottomRightDiagonalMatrix",
    "TriuToeplitzMatrix",
    "TriuTopLeftDiagonalMatrix",
    "structure",
]

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
