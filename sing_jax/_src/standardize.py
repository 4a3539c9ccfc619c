"""SING's gradient standardisation: centralisation and per-leaf normalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sing_jax._src import channels
from sing_jax._src.channels import ChannelDims, ChannelDimsSpec


def output_channel_dims(params: Any, min_ndim: int = 2) -> Any:
    """Spec with ``ChannelDims((-1,))`` on every leaf of ``ndim >= min_ndim``, else None.

    In Flax layouts (``(in, out)`` dense and ``(kH, kW, C_in, C_out)`` conv kernels)
    the last axis is the output channel, so this makes every kernel a product of
    per-output-channel spheres and leaves biases and norm parameters Euclidean.
    Usable directly as ``channel_dims=sing_jax.output_channel_dims``.
    """
    channels.refuse_step_count("output_channel_dims", params)
    return jax.tree.map(lambda p: ChannelDims((-1,)) if jnp.ndim(p) >= min_ndim else None,
                        params, is_leaf=channels.is_variable)


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
    except its channel axes. The default spec keeps the last (output-channel) axis
    of leaves with ``ndim > 1`` and leaves 1-D leaves untouched, as SING does. A
    kernel with one input (shape ``(1, out)``) is thereby zeroed, as in the
    reference; give it a ``None`` spec to train it.

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

    def standardize(geometry, g):
        wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        if geometry.group_axes is not None:
            wide = wide - jnp.mean(wide, axis=geometry.group_axes, keepdims=True)
        norm = jnp.sqrt(jnp.sum(wide * wide))
        return (wide / (norm + eps)).astype(g.dtype)

    return _stateless_per_leaf(channel_dims, standardize)
