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
from sing_jax._src.regularizers import _leaf_shape, map_named_leaves

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
        shape = _leaf_shape(leaf)
        if len(shape) < min_ndim:
            return None
        if path.rsplit("/", 1)[-1] in same_layout:
            return ChannelDims((0,)) if math.prod(shape[1:]) > 1 else None
        return ChannelDims((-1,))

    return map_named_leaves(pick, params)


def _standardized(g: jax.Array, eps: float,
                  group_axes: tuple[int, ...] | None = None) -> jax.Array:
    """``g`` (centred over ``group_axes`` first, if given) over its whole-leaf L2 norm
    plus ``eps``, computed in float32 at least and returned in ``g``'s dtype."""
    wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    if group_axes is not None:
        wide = wide - jnp.mean(wide, axis=group_axes, keepdims=True)
    norm = jnp.sqrt(jnp.sum(wide * wide))
    return (wide / (norm + eps)).astype(g.dtype)


def _stateless_per_leaf(channel_dims: ChannelDimsSpec,
                        leaf_fn: Callable[[channels.LeafGeometry, jax.Array], jax.Array],
                        ) -> optax.GradientTransformation:
    """A stateless transform applying ``leaf_fn(geometry, g)`` to every leaf.

    The spec is validated at ``init`` (errors name the leaf) and resolved again on
    the updates at every ``update``.
    """

    def init_fn(params):
        channels.resolve_channel_dims(channel_dims, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        geometries = channels.resolve_channel_dims(channel_dims, updates)
        return channels.map_with_geometry(leaf_fn, geometries, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


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

    return optax.stateless(
        lambda updates, params: jax.tree.map(lambda g: _standardized(g, eps), updates))


def centralize_and_normalize_gradients(channel_dims: ChannelDimsSpec = output_channel_dims,
                                       eps: float = 1e-8) -> optax.GradientTransformation:
    r"""SING steps 1 and 2 in one transform: ``normalize_gradients(centralize_gradients(g))``.

    .. math::
      \tilde g = g - \operatorname{mean}_{G}(g), \qquad
      g \leftarrow \tilde g / (\lVert \tilde g \rVert_2 + \epsilon)

    Equal to chaining :func:`centralize_gradients` and :func:`normalize_gradients`
    (leaves without a channel spec are only normalised), with the centred gradient
    kept in float32 at least between the two steps instead of rounded to a narrow
    leaf dtype.

    Args:
      channel_dims: the centralisation spec, as in :func:`centralize_gradients`.
      eps: added to the norm.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    return _stateless_per_leaf(
        channel_dims, lambda geometry, g: _standardized(g, eps, geometry.group_axes))
