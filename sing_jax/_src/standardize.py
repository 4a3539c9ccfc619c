"""SING's gradient standardisation: centralisation and per-leaf normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sing_jax._src import channels
from sing_jax._src.channels import ChannelDims, ChannelDimsSpec
from sing_jax._src.paths import path_str

# Leaves that Flax stores in PyTorch's layout (they are not conv/linear kernels):
# token and position embeddings, and nnx.Embed's (num_embeddings, features) table.
SAME_LAYOUT_NAMES = ("cls_token", "pos_embed", "pos_embedding", "dist_token", "reg_token",
                     "mask_token", "embedding")


def output_channel_dims(params: Any, min_ndim: int = 2, *,
                        same_layout_names: Sequence[str] = SAME_LAYOUT_NAMES) -> Any:
    """SING's centralisation spec: the reference's output-channel axis of every leaf.

    The reference (PyTorch) keeps axis 0 of every leaf with ``ndim > 1`` and
    reduces over the others. For conv/linear kernels axis 0 is the output
    channel, which Flax stores last (``(in, out)`` dense and ``(kH, kW, C_in,
    C_out)`` conv kernels): those leaves get ``ChannelDims((-1,))``. Leaves whose
    name (the last part of the path) is in ``same_layout_names`` are stored as in
    PyTorch, so they keep axis 0 as the reference does: for a ViT's ``cls_token``
    ``(1, 1, D)`` and ``pos_embed`` ``(1, N, D)`` that subtracts the global mean
    (keeping their last axis would subtract each element from itself, and the leaf
    would never train). Such a leaf whose axis-0 groups hold one element is left
    uncentred (``None``) rather than zeroed. Leaves with ``ndim < min_ndim`` get
    ``None`` (biases and norm parameters stay Euclidean).

    A kernel with one input (``(1, out)`` dense, ``(1, 1, 1, out)`` conv) is still
    zeroed, as in the reference and spec section 1; give it ``None`` to train it.

    Usable directly as ``channel_dims=sing_jax.output_channel_dims``.
    """
    channels.refuse_step_count("output_channel_dims", params)
    same_layout = frozenset(same_layout_names)

    def pick(path, leaf):
        shape = jnp.shape(leaf.get_value() if channels.is_variable(leaf) else leaf)
        if len(shape) < min_ndim:
            return None
        if path_str(path).rsplit("/", 1)[-1] in same_layout:
            return ChannelDims((0,)) if math.prod(shape[1:]) > 1 else None
        return ChannelDims((-1,))

    return jax.tree_util.tree_map_with_path(pick, params, is_leaf=channels.is_variable)


def _stateless(channel_dims: ChannelDimsSpec,
               tree_fn: Callable[[list[channels.LeafGeometry], Any], Any],
               ) -> optax.GradientTransformation:
    """A stateless transform returning ``tree_fn(geometries, updates)``.

    The spec is validated at ``init`` (errors name the leaf) and resolved again on
    the updates at every ``update``.
    """

    def init_fn(params):
        channels.resolve_channel_dims(channel_dims, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return tree_fn(channels.resolve_channel_dims(channel_dims, updates), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _stateless_per_leaf(channel_dims: ChannelDimsSpec,
                        leaf_fn: Callable[[channels.LeafGeometry, jax.Array], jax.Array],
                        ) -> optax.GradientTransformation:
    """A stateless transform applying ``leaf_fn(geometry, g)`` to every leaf."""
    return _stateless(channel_dims, lambda geometries, updates: channels.map_with_geometry(
        leaf_fn, geometries, updates))


def centralize_gradients(channel_dims: ChannelDimsSpec = output_channel_dims,
                         ) -> optax.GradientTransformation:
    r"""Gradient centralisation (SING step 1).

    .. math::
      g \leftarrow g - \operatorname{mean}_{G}(g)

    where the mean is taken over the group axes ``G`` of each leaf, i.e. every axis
    except its channel axes. The default spec, :func:`output_channel_dims`, keeps
    the reference's axis: the last (output-channel) axis of kernels, axis 0 of
    embeddings stored as in PyTorch (``cls_token``, ``pos_embed``: the global
    mean), and leaves 1-D leaves untouched, as SING does. A kernel with one input
    (shape ``(1, out)``) is thereby zeroed, as in the reference; give it a
    ``None`` spec to train it.

    Args:
      channel_dims: a spec tree (leaves ``ChannelDims`` or ``None`` = untouched), a
        single ``ChannelDims``, or a callable ``params -> spec``.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    def centralize(geometry, g):
        # A group of one element (e.g. a (1, out) kernel) is its own mean, so its
        # centred gradient is zero, as in spec section 1 and the reference.
        if geometry.group_axes is None:
            return g
        return g - jnp.mean(g, axis=geometry.group_axes, keepdims=True)

    return _stateless_per_leaf(channel_dims, centralize)


def normalize_gradients(eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Per-leaf gradient normalisation (SING step 2).

    .. math::
      g \leftarrow \frac{g}{\lVert g \rVert_2 + \epsilon}

    with the norm taken over the whole leaf, for every leaf (1-D ones too). The
    norm is accumulated in float32 at least, whatever the leaf's dtype.

    Args:
      eps: added to the norm.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    def normalize(g):
        wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(wide * wide))
        return (wide / (norm + eps)).astype(g.dtype)

    return optax.stateless(lambda updates, params: jax.tree.map(normalize, updates))


def centralize_and_normalize_gradients(channel_dims: ChannelDimsSpec = output_channel_dims,
                                       eps: float = 1e-8) -> optax.GradientTransformation:
    r"""SING steps 1 and 2 in one transform: ``normalize_gradients(centralize_gradients(g))``.

    .. math::
      \tilde g = g - \operatorname{mean}_{G}(g), \qquad
      g \leftarrow \tilde g / (\lVert \tilde g \rVert_2 + \epsilon), \qquad
      \lVert \tilde g \rVert^2 = \lVert g \rVert^2 - d \sum_c \mu_c^2

    Equal to chaining :func:`centralize_gradients` and :func:`normalize_gradients`
    (leaves without a channel spec are only normalised), but the norm of the
    centred gradient comes from the two sums ``sum(g)`` per channel and
    ``sum(g^2)``, so the centred gradient is never written out: on CPU this saves
    most of the cost of the two steps. Where the identity would cancel badly
    (``||g~||^2 < 1e-2 ||g||^2``, a gradient dominated by its channel means), the
    norm is recomputed exactly from the centred gradient; one ``lax.cond`` for the
    whole tree decides whether any leaf needs that (a conditional per leaf cost
    more on CPU than the sums). Sums run in float32 at least.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    def standardize(geometries, updates):
        leaves, treedef = jax.tree.flatten(updates)
        wides = [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in leaves]
        means = [jnp.mean(w, axis=geo.group_axes, keepdims=True)
                 if geo.group_axes is not None else None
                 for w, geo in zip(wides, geometries)]
        square_sums = [jnp.sum(w * w) for w in wides]
        # ||g - mean||^2 = ||g||^2 - d sum_c mean_c^2 on the centred leaves
        norms_sq = [s if m is None else s - geo.group_size * jnp.sum(m * m)
                    for s, m, geo in zip(square_sums, means, geometries)]

        # whether the identity kept its accuracy, per centred leaf (None: not centred)
        accurate = [None if m is None else n > 1e-2 * s
                    for n, s, m in zip(norms_sq, square_sums, means)]

        def exact_where_cancelled():
            return [n if ok is None else jnp.where(ok, n, jnp.sum(jnp.square(w - m)))
                    for n, ok, w, m in zip(norms_sq, accurate, wides, means)]

        checks = [ok for ok in accurate if ok is not None]
        if checks:
            # One conditional for the whole tree: one per leaf cost more than the sums.
            norms_sq = jax.lax.cond(jnp.all(jnp.stack(checks)), lambda: norms_sq,
                                    exact_where_cancelled)
        out = [((w if m is None else w - m) / (jnp.sqrt(n) + eps)).astype(g.dtype)
               for w, m, n, g in zip(wides, means, norms_sq, leaves)]
        return treedef.unflatten(out)

    return _stateless(channel_dims, standardize)
