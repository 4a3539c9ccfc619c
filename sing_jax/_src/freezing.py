"""Freezing parameters and transfer learning, with ``optax.partition`` + ``optax.set_to_zero``.

A *frozen mask* is a callable ``params -> tree of bool`` (True: frozen) built from
parameter paths ('/'-joined keys, ``.value`` of Flax Variables left out) or from
NNX module types. :func:`freeze` turns it into labels for ``optax.partition``:
frozen leaves go to ``optax.set_to_zero()`` (their update is exactly 0, so they
stay bit-for-bit unchanged) and the optimizer only ever sees the trainable
leaves, so its state holds nothing for the frozen ones (``optax.MaskedNode``).

Everything works on a plain parameter tree and with
``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from sing_jax._src.regularizers import (
    MaskFn,
    compile_patterns,
    map_named_leaves,
    named_leaves,
    path_matcher,
)

TRAINABLE = "trainable"
FROZEN = "frozen"


def _as_mask_fn(mask: Any | MaskFn) -> MaskFn:
    """A callable mask; a tree of bool is matched to the params *by path*.

    Matching by path lets a tree built over ``nnx.state(model, nnx.Param)`` serve
    the plain arrays that ``nnx.Optimizer`` passes to ``update``.
    """
    if callable(mask):
        return mask
    table = {}
    for name, flag in named_leaves(mask):
        if isinstance(flag, nnx.Variable):
            flag = flag.get_value()
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"frozen mask: the entry at {name!r} is {flag!r}; expected a bool")
        table[name] = bool(flag)

    def lookup(path, _leaf):
        if path not in table:
            raise ValueError(f"frozen mask: no entry for parameter {path!r}; the mask has "
                             f"{sorted(table)[:4]}...")
        return table[path]

    return lambda params: map_named_leaves(lookup, params)


def frozen_by_regex(patterns: str | Sequence[str]) -> MaskFn:
    """Freeze the leaves whose path fullmatches one of ``patterns``.

    A pattern that matches no path gives a warning naming it.

    Example::

      frozen = frozen_by_regex([r"stem/.*", r"blocks/[01]/.*"])
    """
    return path_matcher(patterns, "frozen_by_regex")


def freeze_all_but(patterns: str | Sequence[str]) -> MaskFn:
    """Freeze every leaf *except* those whose path fullmatches one of ``patterns``.

    ``freeze_all_but(r"head/.*")`` is "train only the head".
    """
    trainable = path_matcher(patterns, "freeze_all_but")
    return lambda params: jax.tree.map(lambda t: not t, trainable(params))


def any_frozen(*masks: MaskFn) -> MaskFn:
    """The union of frozen masks: a leaf is frozen when any mask freezes it."""
    if not masks:
        raise ValueError("any_frozen: give at least one mask")
    fns = [_as_mask_fn(m) for m in masks]

    def mask_fn(params):
        trees = [fn(params) for fn in fns]
        return jax.tree.map(lambda *flags: any(flags), *trees)

    return mask_fn


def module_paths(model: nnx.Module, module_types: type | Sequence[type]) -> list[str]:
    """The '/'-joined paths of the submodules of ``model`` of the given types."""
    types = tuple(module_types) if isinstance(module_types, (list, tuple)) else (module_types,)
    for t in types:
        if not isinstance(t, type):
            raise TypeError(f"module_paths: expected module classes, got {t!r}")
    found = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, types):
            found.append("/".join(str(k) for k in path))
    return found


def frozen_by_module_type(model: nnx.Module, module_types: type | Sequence[type]) -> MaskFn:
    """Freeze every parameter that lives inside a submodule of one of ``module_types``.

    The paths are read from ``model`` once; the mask then applies to any tree with
    the same paths (``nnx.state(model, nnx.Param)`` or the plain arrays of it).
    A type that matches no submodule gives a warning naming it.

    Example::

      frozen = frozen_by_module_type(model, nnx.LayerNorm)
    """
    types = tuple(module_types) if isinstance(module_types, (list, tuple)) else (module_types,)
    prefixes = []
    for t in types:
        paths = module_paths(model, t)
        if not paths:
            warnings.warn(f"frozen_by_module_type: no submodule of type {t.__name__} in "
                          f"{type(model).__name__}", stacklevel=2)
        prefixes.extend(paths)
    if not prefixes:
        return lambda params: map_named_leaves(lambda _p, _l: False, params)
    # The model itself (path '') covers everything.
    patterns = [".*" if p == "" else re.escape(p) + "/.*" for p in prefixes]
    return path_matcher(patterns, "frozen_by_module_type")


def frozen_norm_affine(model: nnx.Module,
                       norm_types: type | Sequence[type] = (nnx.LayerNorm,),
                       patterns: str | Sequence[str] = ()) -> MaskFn:
    """SING's advice: freeze the affine parameters of LayerNorm (and LayerScale).

    Seed 000: when the training loss falls while the gradient norm rises, stop
    learning the per-channel rescalings (LayerNorm's scale and bias, LayerScale's
    gamma); the normalisation itself still applies. ``norm_types`` picks the
    modules by class; ``patterns`` adds paths by regex (e.g.
    ``r".*layer_scale.*"`` for a LayerScale that is a bare ``nnx.Param``).
    """
    masks = [frozen_by_module_type(model, norm_types)]
    if patterns:
        masks.append(frozen_by_regex(patterns))
    return any_frozen(*masks)


def unfreeze_top_blocks(num_blocks: int, block_pattern: str = r"blocks/(\d+)/.*",
                        always_trainable: str | Sequence[str] = (r"head/.*",)) -> MaskFn:
    r"""Freeze everything except the top ``num_blocks`` blocks and the head.

    ``block_pattern`` fullmatches the paths of block parameters and captures the
    block index in its first group (``r"blocks/(\d+)/.*"`` for ``blocks/0/...``,
    ``blocks/1/...``). The blocks with the ``num_blocks`` largest indices stay
    trainable, as do paths matching ``always_trainable``; everything else is frozen.
    ``num_blocks=0`` trains the head only.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) \
            or num_blocks < 0:
        raise ValueError(f"unfreeze_top_blocks: num_blocks must be an int >= 0, got {num_blocks!r}")
    (block_regex,) = compile_patterns(block_pattern, "unfreeze_top_blocks")
    if block_regex.groups < 1:
        raise ValueError(f"unfreeze_top_blocks: block_pattern {block_pattern!r} must capture "
                         r"the block index in a group, e.g. r'blocks/(\d+)/.*'")
    keep = path_matcher(always_trainable, "unfreeze_top_blocks(always_trainable=...)") \
        if always_trainable else None
    warned = []

    def mask_fn(params):
        names = [name for name, _ in named_leaves(params)]
        indices = {}
        for name in names:
            m = block_regex.fullmatch(name)
            if m is not None:
                try:
                    indices[name] = int(m.group(1))
                except ValueError as e:
                    raise ValueError(f"unfreeze_top_blocks: block_pattern captured "
                                     f"{m.group(1)!r} in {name!r}; expected an int") from e
        if not indices and not warned:
            warned.append(True)
            warnings.warn(f"unfreeze_top_blocks: block_pattern {block_pattern!r} matches no "
                          f"parameter path (paths look like {names[:4]})", stacklevel=2)
        top = set(sorted(set(indices.values()))[::-1][:num_blocks])
        trainable = [name in indices and indices[name] in top for name in names]
        if keep is not None:
            trainable = [t or k for t, k in zip(trainable, jax.tree.leaves(keep(params)))]
        flags = iter(trainable)
        return map_named_leaves(lambda _p, _l: not next(flags), params)

    return mask_fn


def frozen_labels(frozen: Any | MaskFn) -> MaskFn:
    """The ``optax.partition`` labels of a frozen mask: ``'frozen'`` / ``'trainable'``."""
    fn = _as_mask_fn(frozen)
    return lambda params: jax.tree.map(lambda f: FROZEN if f else TRAINABLE, fn(params))


def freeze(tx: optax.GradientTransformation, frozen: Any | MaskFn
           ) -> optax.GradientTransformationExtraArgs:
    """Run ``tx`` on the trainable leaves only; frozen leaves get an update of exactly 0.

    ``optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)``:
    frozen parameters are bit-for-bit unchanged by ``optax.apply_updates`` and the
    state of ``tx`` holds ``optax.MaskedNode()`` (nothing) in their place. Weight
    decay inside ``tx`` never touches them.

    Args:
      tx: the optimizer of the trainable leaves (any optax or sing_jax optimizer).
      frozen: a tree of bool shaped like the params (True: frozen) or a mask
        builder (:func:`frozen_by_regex`, :func:`freeze_all_but`,
        :func:`frozen_by_module_type`, :func:`frozen_norm_affine`,
        :func:`unfreeze_top_blocks`).

    Example::

      tx = freeze(sing_jax.sing(1e-2), frozen_norm_affine(model))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    """
    return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, frozen_labels(frozen))


# ---------------------------------------------------------------------------------
# Transfer learning


def reuse_layers(source: nnx.Module, target: nnx.Module, include: str | Sequence[str] = r".*",
                 exclude: str | Sequence[str] = ()) -> list[str]:
    """Copies the variables of ``source`` into ``target`` where the paths match.

    Every variable type is copied (``Param`` and ``BatchStat`` alike: reused
    BatchNorm layers keep their running statistics). A target path is copied
    when it fullmatches an ``include`` pattern, no ``exclude`` pattern, and exists
    in ``source``; the shapes must agree.

    Args:
      source: the trained model.
      target: the new model (for example the same body under a new head).
      include: regexes of the paths to copy (``r"(stem|blocks)/.*"``).
      exclude: regexes of paths never copied (``r"head/.*"``).

    Returns:
      The copied paths, sorted.

    Raises:
      ValueError: a copied path has a different shape in ``source`` and ``target``.
    """
    included = compile_patterns(include, "reuse_layers(include=...)")
    excluded = compile_patterns(exclude, "reuse_layers(exclude=...)")
    source_vars = dict(named_leaves(nnx.state(source)))
    target_state = nnx.state(target)
    copied, used = [], [False] * len(included)

    def pick(path, variable):
        hits = [p.fullmatch(path) is not None for p in included]
        for i, hit in enumerate(hits):
            used[i] = used[i] or hit
        if not any(hits) or any(p.fullmatch(path) for p in excluded) or path not in source_vars:
            return variable
        new = source_vars[path]
        if np.shape(new.get_value()) != np.shape(variable.get_value()):
            raise ValueError(f"reuse_layers: {path} has shape {np.shape(new.get_value())} in "
                             f"the source but {np.shape(variable.get_value())} in the target")
        copied.append(path)
        return type(variable)(jax.numpy.array(new.get_value()))

    new_state = map_named_leaves(pick, target_state)
    for pattern, was_used in zip(included, used):
        if not was_used:
            warnings.warn(f"reuse_layers: pattern {pattern.pattern!r} matches no path of the "
                          "target model", stacklevel=2)
    nnx.update(target, new_state)
    return sorted(copied)


def head_only(tx: optax.GradientTransformation, head: str | Sequence[str] = r"head/.*"
              ) -> optax.GradientTransformationExtraArgs:
    """Phase 1 of transfer learning: train the paths matching ``head``, freeze the rest.

    ``freeze(tx, freeze_all_but(head))``.
    """
    return freeze(tx, freeze_all_but(head))


def finetune(head_tx: optax.GradientTransformation, body_tx: optax.GradientTransformation,
             head: str | Sequence[str] = r"head/.*") -> optax.GradientTransformationExtraArgs:
    """Phase 2 of transfer learning: everything trains, the reused body more gently.

    ``optax.partition({'head': head_tx, 'body': body_tx}, ...)``; typically
    ``body_tx`` is the same optimizer with a learning rate ~10x lower (seed 003:
    "unfreeze the reused layers, reduce the learning rate, and keep training").
    """
    is_head = path_matcher(head, "finetune(head=...)")
    return optax.partition(
        {"head": head_tx, "body": body_tx},
        lambda params: jax.tree.map(lambda h: "head" if h else "body", is_head(params)))


def frozen_paths(frozen: Any | MaskFn, params: Any) -> list[str]:
    """The paths that ``frozen`` freezes in ``params`` (to log or to check a mask)."""
    flags = jax.tree.leaves(_as_mask_fn(frozen)(params))
    return [name for (name, _), f in zip(named_leaves(params), flags) if f]
