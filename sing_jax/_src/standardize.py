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
