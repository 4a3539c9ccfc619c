"""One spelling of a pytree key path, shared by every module that names leaves.

A leaf is named ``'block/conv/kernel'``: dict keys, sequence indices and attribute
names joined by ``/``. A trailing ``.value`` (what a Flax ``Variable`` adds around
its array) is left out, so a name built over an ``nnx.State`` of Variables matches
the plain arrays an optimizer sees later.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey/FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """``(DictKey('block'), GetAttrKey('kernel'))`` or ``('block', 0)`` -> ``'block/kernel'``."""
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_name(key) for key in path)


def leaf_paths(tree: Any, is_leaf: Any = None) -> list[str]:
    """The ``path_str`` of every leaf of ``tree``, in flattening order."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [path_str(path) for path, _ in flat]
