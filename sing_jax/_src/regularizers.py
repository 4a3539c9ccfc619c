"""Regularisers as optax pieces: decay masks, L1, max-norm, per-leaf norm clipping.

Parameter masks are chosen from parameter *paths* and *ranks*. A path is the
'/'-joined keys of a leaf (``'blocks/0/conv/kernel'``); the ``.value`` attribute of
Flax ``Variable`` s is left out, so one mask builder works on a plain parameter
tree and on the ``nnx.State`` of ``Param`` s that ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` hands to ``tx.init`` (its ``update`` then sees plain arrays).
Mask builders return a *callable* ``params -> tree of bool`` that optax's
``mask=`` arguments (``optax.masked``, ``optax.add_decayed_weights``,
``optax.adamw``) call with whatever tree they get.

Weight decay itself is optax's ``add_decayed_weights``; :func:`add_weight_decay`
only adds argument checks and the bias/normalisation-skipping default mask.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sing_jax._src.channels import ChannelDims, resolve_channel_dims
from sing_jax._src.paths import path_str

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
MaskFn = Callable[[Any], Any]


# ---------------------------------------------------------------------------------
# Paths over plain trees and nnx.State alike


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_shape(x: Any) -> tuple[int, ...]:
    if _is_variable(x):
        x = x.get_value()
    return tuple(np.shape(x))


def map_named_leaves(fn: Callable[[str, Any], Any], params: Any) -> Any:
    """``fn(path, leaf)`` on every leaf; a Flax ``Variable`` counts as one leaf.

    The output keeps the container structure of ``params`` (an ``nnx.State`` stays
    an ``nnx.State``) with ``fn``'s results in place of the leaves, which is the
    shape optax's masks and labels need.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn(path_str(path), leaf), params, is_leaf=_is_variable)


def named_leaves(params: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` in flattening order, a Flax ``Variable`` counting as one leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    return [(path_str(path), leaf) for path, leaf in flat]


def compile_patterns(patterns: str | Sequence[str], where: str) -> list[re.Pattern]:
    """Compiles one regex or a sequence of them; a bad regex is a ValueError naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{where}: patterns must be regex strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{where}: bad regex {pattern!r}: {e}") from e
    return compiled


class PatternUsage:
    """Tracks which patterns matched some path, and warns once about the others."""

    def __init__(self, patterns: list[re.Pattern], where: str):
        self.patterns = patterns
        self.where = where
        self.warned = False

    def matches(self, path: str) -> list[bool]:
        return [p.fullmatch(path) is not None for p in self.patterns]

    def warn_unused(self, used: list[bool], paths: list[str]) -> None:
        # The mask callable runs at init and at every trace of update: warn once.
        if self.warned:
            return
        self.warned = True
        for pattern, was_used in zip(self.patterns, used):
            if not was_used:
                warnings.warn(
                    f"{self.where}: pattern {pattern.pattern!r} matches no parameter path "
                    f"(paths look like {paths[:4]}); patterns are re.fullmatch-ed",
                    stacklevel=3)


def path_matcher(patterns: str | Sequence[str], where: str) -> Callable[[Any], Any]:
    """A callable ``params -> tree of bool``: True where the path fullmatches a pattern.

    A pattern that matches no path is reported with a warning naming it.
    """
    usage = PatternUsage(compile_patterns(patterns, where), where)

    def mask_fn(params: Any) -> Any:
        names = [name for name, _ in named_leaves(params)]
        used = [False] * len(usage.patterns)

        def one(path, _leaf):
            hits = usage.matches(path)
            for i, hit in enumerate(hits):
                used[i] = used[i] or hit
            return any(hits)

        mask = map_named_leaves(one, params)
        usage.warn_unused(used, names)
        return mask

    return mask_fn


def _check_rate(name: str, value: ScalarOrSchedule) -> None:
    if callable(value):
        return
    array = np.asarray(value)
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be a scalar or a schedule, got {value!r}")
    if not float(array) >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {float(array)}")


# ---------------------------------------------------------------------------------
# Weight decay and its mask


def decay_mask(*, min_ndim: int = 2, exclude: str | Sequence[str] = (),
               include: str | Sequence[str] = ()) -> MaskFn:
    """A mask builder for weight decay that skips biases and normalisation parameters.

    A leaf is decayed when its path fullmatches an ``include`` pattern, or when
    ``ndim >= min_ndim`` and its path matches no ``exclude`` pattern. With the
    defaults, kernels and embeddings (2-D and up) decay while biases and the
    scale/bias of BatchNorm, LayerNorm and LearnableScaler (1-D) do not: seed
    003's two parameter groups, chosen by rank instead of by name.

    Args:
      min_ndim: leaves of lower rank are not decayed (unless included).
      exclude: regexes of paths never decayed, e.g. ``r".*(pos_embed|cls_token)"``.
      include: regexes of paths always decayed.

    Returns:
      ``params -> tree of bool`` (True: decay), for any optax ``mask=`` argument.

    Example::

      tx = optax.adamw(1e-3, weight_decay=1e-4, mask=decay_mask())
    """
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, (int, np.integer)) or min_ndim < 0:
        raise ValueError(f"decay_mask: min_ndim must be an int >= 0, got {min_ndim!r}")
    excluded = path_matcher(exclude, "decay_mask(exclude=...)")
    included = path_matcher(include, "decay_mask(include=...)")

    def mask_fn(params: Any) -> Any:
        excluded_tree = jax.tree.leaves(excluded(params))
        included_tree = jax.tree.leaves(included(params))
        flags = iter([
            inc or (len(_leaf_shape(leaf)) >= min_ndim and not exc)
            for (_, leaf), exc, inc in zip(named_leaves(params), excluded_tree, included_tree)
        ])
        return map_named_leaves(lambda _path, _leaf: next(flags), params)

    return mask_fn


# The default mask of the decays: rank >= 2 (no patterns, so no warning state shared).
SKIP_LOW_RANK = decay_mask()


def add_weight_decay(weight_decay: ScalarOrSchedule,
                     mask: Any | MaskFn | None = SKIP_LOW_RANK) -> optax.GradientTransformation:
    r"""Decoupled weight decay on the masked leaves: :math:`u \leftarrow u + \lambda p`.

    This is ``optax.add_decayed_weights`` with a check that ``weight_decay >= 0`` and
    :func:`decay_mask` (skip rank < 2, i.e. biases and normalisation parameters) as
    the default mask. Place it after the optimizer's ``scale_by_*`` and before the
    learning rate (as ``optax.adamw`` does) for AdamW-style decay.

    Args:
      weight_decay: :math:`\lambda >= 0`, or a schedule.
      mask: a tree of bool, a callable building one, or ``None`` for every leaf.
    """
    _check_rate("weight_decay", weight_decay)
    return optax.add_decayed_weights(weight_decay, mask=mask)


# ---------------------------------------------------------------------------------
# L1


class AddL1State(NamedTuple):
    """The update count, to evaluate a schedule of the L1 strength."""

    count: jax.Array


def add_l1(l1: ScalarOrSchedule, mask: Any | MaskFn | None = SKIP_LOW_RANK
           ) -> optax.GradientTransformation:
    r"""L1 regularisation as a gradient term: :math:`g \leftarrow g + \lambda_1 \mathrm{sign}(p)`.

    This is the gradient of :math:`\lambda_1 \lVert p \rVert_1` added to the loss (seed
    003: "use l1 regularization for a sparse model"). Put it *first* in the chain,
    before the optimizer, like a loss term. ``sign(0) = 0``, so exact zeros stay put.

    Args:
      l1: :math:`\lambda_1 >= 0`, or a schedule of the update count.
      mask: which leaves are regularised (default :func:`decay_mask`: not biases nor
        normalisation parameters); ``None`` for every leaf.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    _check_rate("l1", l1)

    def init_fn(params):
        del params
        return AddL1State(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_l1: update needs params (the sign of each weight)")
        strength = l1(state.count) if callable(l1) else l1
        updates = jax.tree.map(
            lambda g, p: g + (strength * jnp.sign(p)).astype(g.dtype), updates, params)
        return updates, AddL1State(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx


# ---------------------------------------------------------------------------------
# Max-norm


def incoming_weights(min_ndim: int = 2, axis: int = -1) -> Callable[[Any], Any]:
    """Default max-norm geometry: one vector per output neuron for leaves of rank >= 2.

    Returns a callable ``params -> spec tree`` with ``ChannelDims((axis,))`` on leaves
    with ``ndim >= min_ndim`` (Flax ``(in, out)`` dense and ``(kH, kW, in, out)``
    conv kernels keep the last axis: one vector of incoming weights per output
    neuron) and ``None`` (not constrained) elsewhere.
    """
    def spec_fn(params):
        return map_named_leaves(
            lambda _p, leaf: ChannelDims((axis,)) if len(_leaf_shape(leaf)) >= min_ndim else None,
            params)

    return spec_fn


INCOMING_WEIGHTS = incoming_weights()


def max_norm(max_value: float, channel_dims: Any = INCOMING_WEIGHTS
             ) -> optax.GradientTransformation:
    r"""Max-norm constraint (seed 003): every neuron's incoming weights end with norm <= r.

    For each constrained leaf, with :math:`w = p + u` the updated weights and
    :math:`\lVert w \rVert_c = \sqrt{\langle w, w\rangle}` per channel (see
    :mod:`sing_jax._src.channels`),

    .. math::

      w' = w \cdot \min\!\left(1, \frac{r}{\lVert w \rVert_c}\right), \qquad
      u' = w' - p,

    so that ``optax.apply_updates(p, u')`` is the projected point. Channels already
    within the ball keep their update ``u`` untouched (bit for bit). Put it *last*
    in the chain, after the learning rate: it owns the projection and must see the
    final step.

    Args:
      max_value: the radius ``r > 0``.
      channel_dims: which axes index the neurons: a ``ChannelDims``, a tree of
        ``ChannelDims | None`` shaped like the params, or a callable building one.
        ``None`` leaves are *not constrained* (unlike the optimizers, where ``None``
        means Euclidean). Default :func:`incoming_weights`: the last axis of every
        leaf of rank >= 2 (Flax layout); use ``ChannelDims((0,))`` for PyTorch's
        ``(out, in)``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    if not isinstance(max_value, (int, float, np.number)) or not float(max_value) > 0:
        raise ValueError(f"max_norm: max_value must be a number > 0, got {max_value!r}")
    radius = float(max_value)

    def init_fn(params):
        resolve_channel_dims(channel_dims, params)  # fail early on a bad spec
        return optax.EmptyState()

    def project(geometry, u, p):
        if geometry.group_axes is None:
            return u
        w = p + u
        norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=geometry.group_axes,
                                keepdims=True))
        too_long = norm > radius
        scale = jnp.where(too_long, radius / jnp.where(too_long, norm, 1.0), 1.0)
        return jnp.where(too_long, (w * scale).astype(u.dtype) - p, u)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm: update needs params (the projection acts on p + u)")
        geometries = resolve_channel_dims(channel_dims, params)
        leaves, treedef = jax.tree.flatten(updates)
        param_leaves = jax.tree.leaves(params)
        out = [project(g, u, p) for g, u, p in zip(geometries, leaves, param_leaves)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------
# Per-leaf clipping (optax has global norm, value and block RMS; not leaf norm)


def clip_by_leaf_norm(max_value: float) -> optax.GradientTransformation:
    r"""Clip each leaf to L2 norm <= ``c``: :math:`g \leftarrow g \min(1, c / \lVert g\rVert)`.

    PyTorch's ``clip_grad_norm_`` called once per parameter. optax has the global
    version (``optax.clip_by_global_norm``), the per-element one (``optax.clip``)
    and a per-leaf *RMS* one (``optax.clip_by_block_rms``); this is the per-leaf
    norm.
    """
    if not isinstance(max_value, (int, float, np.number)) or not float(max_value) > 0:
        raise ValueError(f"clip_by_leaf_norm: max_value must be a number > 0, got {max_value!r}")

    def update_fn(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            scale = jnp.minimum(1.0, max_value / jnp.maximum(norm, 1e-30))
            return (g * scale).astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
