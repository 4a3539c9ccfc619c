"""Optimizers on the sphere of each channel: AdamS, the RT transport, SGDM and AdamG.

A leaf followed by a normalisation layer is invariant to a positive rescaling
of each channel, so its channels live on spheres. ``channel_dims`` (see
:mod:`sing_jax._src.channels`) says which axes index the channels; ``<a, b>`` is
the per-channel inner product and ``d`` the number of elements of one channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sing_jax._src import channels, hyperparams
from sing_jax._src.channels import ChannelDimsSpec, LeafGeometry


def _wide(x: jax.Array) -> jax.Array:
    """At least float32, so that per-channel sums of bf16 leaves do not lose bits."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _learning_rate_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _map_leaves(fn, geometries: list[LeafGeometry], updates: Any, *trees: Any,
                num_states: int) -> tuple[Any, ...]:
    """Runs ``fn(geometry, update, *leaves_of_trees)`` per leaf and regroups its outputs.

    ``fn`` returns the new update and then a new leaf for each of the first
    ``num_states`` of ``trees`` (the remaining trees, e.g. the params, are inputs
    only). Returns ``(updates, *new_state_trees)``.
    """
    leaves, treedef = jax.tree.flatten(updates)
    tree_leaves = [jax.tree.leaves(t) for t in trees]
    outs = [fn(geo, g, *[t[i] for t in tree_leaves])
            for i, (geo, g) in enumerate(zip(geometries, leaves))]
    regrouped = [treedef.unflatten([o[0] for o in outs])]
    for j in range(num_states):
        regrouped.append(jax.tree.structure(trees[j]).unflatten([o[j + 1] for o in outs]))
    return tuple(regrouped)


def _exact_zero(t: jax.Array, dtype: Any) -> jax.Array:
    """``0 * (t == t)`` in ``dtype``: exactly 0 for every ``t``, NaN and inf too, yet
    computed from ``t``, so whatever it is added to waits for ``t``.

    XLA does not fold a floating-point product with 0; the comparison is converted
    before the product because an integer product with 0 would be folded away.
    """
    return (t == t).astype(dtype) * 0


def _adams_moments(geometry: LeafGeometry, g: jax.Array, m: jax.Array, v: jax.Array,
                   b1: float, b2: float) -> tuple[jax.Array, jax.Array]:
    """AdamS's moment recursions on one leaf: ``m`` elementwise, ``v`` per channel."""
    return ((b1 * m + (1 - b1) * g).astype(m.dtype),
            (b2 * v + (1 - b2) * channels.channel_inner(g, g, geometry)).astype(v.dtype))


def _momentum_buffer(g: jax.Array, b: jax.Array, momentum: float,
                     dampening: float) -> jax.Array:
    """The heavy-ball recursion with PyTorch's dampening on one leaf."""
    return (momentum * b + (1 - dampening) * g).astype(b.dtype)


# ---------------------------------------------------------------------------------
# AdamS: the per-channel second moment


def _zero_moments(channel_dims: ChannelDimsSpec, params: Any) -> tuple[Any, Any]:
    """Zero first moments at full shape and second moments at per-channel shape."""
    geometries = channels.resolve_channel_dims(channel_dims, params)
    mu = jax.tree.map(jnp.zeros_like, params)
    nu = channels.map_with_geometry(
        lambda g, p: jnp.zeros(channels.channel_shape(jnp.shape(p), g), jnp.asarray(p).dtype),
        geometries, params)
    return mu, nu


class ScaleByAdamSState(NamedTuple):
    """State of :func:`scale_by_adams`; ``nu`` has one entry per channel."""

    count: chex.Array  # int32
    mu: optax.Updates
    nu: optax.Updates  # per-channel shape: reduced axes kept with size 1


def scale_by_adams(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   channel_dims: ChannelDimsSpec = None) -> optax.GradientTransformation:
    r"""Adam with a per-channel second moment (AdamS's direction).

    .. math::
      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) \langle g_t, g_t \rangle \\
      u_t &= \sqrt{d}\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    ``v`` is the per-channel *sum* of squares, stored at per-channel shape; the
    :math:`\sqrt d` factor makes the step size per element match Adam's. With
    ``channel_dims=None`` (every element its own channel, ``d = 1``) this is
    ``optax.scale_by_adam``. The learning rate is not applied here.

    Args:
      b1, b2: moment decay rates in ``[0, 1)``.
      eps: added to the denominator.
      channel_dims: per-leaf channel spec (tree, single record, or callable).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamSState`.
    """
    hyperparams.check_adam_hyperparams("scale_by_adams", b1, b2, eps)

    def init_fn(params):
        return ScaleByAdamSState(jnp.zeros([], jnp.int32),
                                 *_zero_moments(channel_dims, params))

    def update_fn(updates, state, params=None):
        del params
        geometries = channels.resolve_channel_dims(channel_dims, updates)
        count = optax.safe_increment(state.count)
        bias1 = 1 - b1 ** count
        bias2 = 1 - b2 ** count

        def leaf(geo, g, m, v):
            m, v = _adams_moments(geo, g, m, v, b1, b2)
            scale = geo.group_size ** 0.5
            return (scale * (m / bias1) / (jnp.sqrt(v / bias2) + eps)).astype(g.dtype), m, v

        new_updates, mu, nu = _map_leaves(leaf, geometries, updates, state.mu, state.nu,
                                          num_states=2)
        return new_updates, ScaleByAdamSState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------
# SGD momentum with dampening (the buffer SGDMRT transports)


class ScaleByMomentumState(NamedTuple):
    """State of :func:`scale_by_momentum`."""

    momentum: optax.Updates


def scale_by_momentum(momentum: float = 0.9, dampening: float = 0.0,
                      ) -> optax.GradientTransformation:
    r"""Heavy-ball momentum with PyTorch's dampening; the buffer starts at zero.

    .. math::
      b_t = \mu\, b_{t-1} + (1 - \text{dampening})\, g_t, \qquad u_t = b_t

    With ``dampening=0`` this is ``optax.trace(decay=momentum)``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByMomentumState`.
    """
    hyperparams.check_unit_interval("scale_by_momentum", "momentum", momentum,
                                    include_one=True)
    hyperparams.check_unit_interval("scale_by_momentum", "dampening", dampening,
                                    include_one=True)

    def init_fn(params):
        return ScaleByMomentumState(jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        buf = jax.tree.map(lambda g, b: _momentum_buffer(g, b, momentum, dampening),
                           updates, state.momentum)
        return jax.tree.map(lambda b, g: b.astype(g.dtype), buf, updates), \
            ScaleByMomentumState(buf)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------
# RT: transport of the moments onto the new tangent space


def transport_first_moment(m: jax.Array, x_prev: jax.Array, x_new: jax.Array,
                           geometry: LeafGeometry, eps: float = 0.0) -> jax.Array:
    r"""Moves a first moment from the tangent space at ``x_prev`` to the one at ``x_new``.

    .. math::
      m \leftarrow \frac{m \langle x_{prev}, x_{new}\rangle - \langle m, x_{new}\rangle\,
      x_{prev}}{\langle x_{new}, x_{new}\rangle + \epsilon}

    The result is orthogonal to ``x_new`` in every channel (when ``eps = 0``).
    A channel whose new norm is zero keeps its moment (the reference would divide by
    zero there).
    """
    m32, xp, xn = _wide(m), _wide(x_prev), _wide(x_new)
    denom = channels.channel_inner(xn, xn, geometry) + eps
    safe = jnp.where(denom > 0, denom, 1.0)
    moved = (m32 * channels.channel_inner(xp, xn, geometry)
             - channels.channel_inner(m32, xn, geometry) * xp) / safe
    return jnp.where(denom > 0, moved, m32).astype(m.dtype)


def transport_second_moment(v: jax.Array, x_prev: jax.Array, x_new: jax.Array,
                            geometry: LeafGeometry, eps: float = 0.0) -> jax.Array:
    r"""Rescales a per-channel second moment by the change of the channel's squared norm.

    .. math::
      v \leftarrow v\, \frac{\langle x_{prev}, x_{prev}\rangle}
      {\langle x_{new}, x_{new}\rangle + \epsilon}
    """
    xp, xn = _wide(x_prev), _wide(x_new)
    denom = channels.channel_inner(xn, xn, geometry) + eps
    safe = jnp.where(denom > 0, denom, 1.0)
    ratio = jnp.where(denom > 0, channels.channel_inner(xp, xp, geometry) / safe, 1.0)
    return (_wide(v) * ratio).astype(v.dtype)


class SphericalTransportState(NamedTuple):
    """State of :func:`spherical_transport`: a step counter and the inner state."""

    count: chex.Array  # int32, for the learning-rate schedule
    inner_state: optax.OptState


def spherical_transport(inner: optax.GradientTransformation,
                        learning_rate: optax.ScalarOrSchedule,
                        channel_dims: ChannelDimsSpec = None, *,
                        eps: float = 1e-8,
                        first_moments: Sequence[str] = ("mu",),
                        second_moments: Sequence[str] = ("nu",),
                        ) -> optax.GradientTransformation:
    r"""The "RT" of AdamSRT/SGDMRT: apply ``-lr * inner`` and transport ``inner``'s moments.

    With :math:`x_{prev} = p` and :math:`x_{new} = p - \eta\, u` (``u`` the inner
    direction), on every leaf whose channels hold more than one element
    (``d > 1``) the named first moments are moved to the tangent space at
    :math:`x_{new}` by :func:`transport_first_moment` and the named second
    moments are rescaled by :func:`transport_second_moment`. Leaves with ``d = 1``
    (Euclidean) are left as the inner transform made them.

    This transform needs the post-update parameters, so it **owns the learning
    rate**: its output is the final update (``-lr * u``); do not follow it with
    ``optax.scale_by_learning_rate``.

    Args:
      inner: a transform whose state is a NamedTuple with the fields named below
        (e.g. :func:`scale_by_adams`, :func:`scale_by_momentum`).
      learning_rate: a float or an optax schedule of the step count.
      channel_dims: per-leaf channel spec.
      eps: added to :math:`\langle x_{new}, x_{new} \rangle` in the transports.
      first_moments: names of the inner state's fields transported as vectors.
      second_moments: names of the inner state's fields rescaled as squared norms.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SphericalTransportState`.
    """
    hyperparams.check_non_negative("spherical_transport", "learning_rate", learning_rate)
    fields = tuple(first_moments) + tuple(second_moments)

    def init_fn(params):
        channels.resolve_channel_dims(channel_dims, params)
        inner_state = inner.init(params)
        missing = [f for f in fields if not hasattr(inner_state, f)]
        if missing:
            raise TypeError(
                f"spherical_transport: the inner state {type(inner_state).__name__} has no "
                f"field(s) {missing}; expected a NamedTuple with fields {list(fields)}.")
        return SphericalTransportState(jnp.zeros([], jnp.int32), inner_state)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        geometries = channels.resolve_channel_dims(channel_dims, params)
        direction, inner_state = inner.update(updates, state.inner_state, params)
        lr = _learning_rate_at(learning_rate, state.count)
        new_updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), direction)
        x_new = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, new_updates)

        def transported(transport):
            def leaf(geo, moment, xp, xn):
                return transport(moment, xp, xn, geo, eps) if geo.is_spherical else moment
            return leaf

        replaced = {}
        for name in first_moments:
            replaced[name] = channels.map_with_geometry(
                transported(transport_first_moment), geometries, getattr(inner_state, name),
                params, x_new)
        for name in second_moments:
            replaced[name] = channels.map_with_geometry(
                transported(transport_second_moment), geometries,
                getattr(inner_state, name), params, x_new)
        inner_state = inner_state._replace(**replaced)
        return new_updates, SphericalTransportState(optax.safe_increment(state.count),
                                                    inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------
# Fused RT steps: the transport from three per-channel inner products


class _StepAlongMoment(NamedTuple):
    """Per-channel inner products of a step ``x_new = x_prev - s m`` (``s`` per channel)."""

    prev_prev: jax.Array  # <x_prev, x_prev>
    moment_new: jax.Array  # <m, x_new>
    new_new: jax.Array  # <x_new, x_new>


def _step_along_moment(m: jax.Array, x_prev: jax.Array, s: jax.Array,
                       geometry: LeafGeometry) -> _StepAlongMoment:
    r"""The inner products of the transport for ``x_new = x_prev - s m``, without ``x_new``.

    .. math::
      \langle m, x_n\rangle = \langle x_p, m\rangle - s\langle m, m\rangle, \qquad
      \langle x_n, x_n\rangle = \langle x_p, x_p\rangle - s\langle x_p, m\rangle
          - s\langle m, x_n\rangle

    Three reductions of arrays that already exist. The cancellation in
    ``<x_new, x_new>`` costs relative accuracy only when one step removes almost
    all of a channel's norm.
    """
    inner = lambda a, b: channels.channel_inner(a, b, geometry)  # noqa: E731
    prev_prev = inner(x_prev, x_prev)
    prev_moment = inner(x_prev, m)
    moment_new = prev_moment - s * inner(m, m)
    return _StepAlongMoment(prev_prev, moment_new, prev_prev - s * prev_moment - s * moment_new)


def _step_and_transport(m: jax.Array, v: jax.Array | None, p: jax.Array, s: jax.Array,
                        geometry: LeafGeometry, eps: float, update_dtype: Any,
                        ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""The update ``-s m`` and the moments transported to ``x_new = p - s m``.

    Because the step is along ``m``, :func:`transport_first_moment` is a
    projection onto the tangent space at ``x_new``:

    .. math::
      \frac{m \langle x_p, x_n\rangle - \langle m, x_n\rangle x_p}{\langle x_n, x_n\rangle
      + \epsilon} = \frac{m \langle x_n, x_n\rangle - \langle m, x_n\rangle x_n}
      {\langle x_n, x_n\rangle + \epsilon}

    Written this way, XLA can run the step without a temporary or a copy of any
    leaf when params and state are donated: the reductions read the old ``p``
    and ``m``; then ``x_new`` is written over ``p`` (it is the same expression as
    ``optax.apply_updates``'s, which XLA computes once); then the transported
    moment is written over ``m`` from ``m`` and ``x_new``. The update depends on
    the reductions through an exact zero so that XLA cannot overwrite ``p``
    before they have read it.
    """
    m32, xp = _wide(m), _wide(p)
    dots = _step_along_moment(m32, xp, s, geometry)
    denom = dots.new_new + eps
    ok = denom > 0  # a channel whose new norm is zero keeps its moments
    inv = 1.0 / jnp.where(ok, denom, 1.0)
    update = (-(s + _exact_zero(denom, denom.dtype)) * m32).astype(update_dtype)
    x_new = _wide((p + update).astype(p.dtype))
    moved = jnp.where(ok, m32 * (dots.new_new * inv) - x_new * (dots.moment_new * inv), m32)
    if v is not None:
        v = (_wide(v) * jnp.where(ok, dots.prev_prev * inv, 1.0)).astype(v.dtype)
    return update, moved.astype(m.dtype), v


def scale_by_adamsrt(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9,
                     b2: float = 0.999, eps: float = 1e-8,
                     channel_dims: ChannelDimsSpec = None) -> optax.GradientTransformation:
    r"""AdamS followed by the RT transport of its moments, fused; **owns the learning rate**.

    The same update and state as ``spherical_transport(scale_by_adams(b1, b2, eps,
    channel_dims), learning_rate, channel_dims, eps=eps)`` (equal to rounding,
    tested). AdamS's step is :math:`x_{new} = x_{prev} - s\, m` with a per-channel

    .. math::
      s = \eta\, \frac{\sqrt d}{(1-\beta_1^t)\,(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)}

    so every inner product of the transport follows from
    :math:`\langle x_{prev}, x_{prev}\rangle`, :math:`\langle x_{prev}, m\rangle` and
    :math:`\langle m, m\rangle`, and :math:`x_{new}` is never materialised apart
    from the new parameters themselves. This is what :func:`sing_jax.adamsrt` uses.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SphericalTransportState`
      around a :class:`ScaleByAdamSState`.
    """
    hyperparams.check_non_negative("scale_by_adamsrt", "learning_rate", learning_rate)
    hyperparams.check_adam_hyperparams("scale_by_adamsrt", b1, b2, eps)

    def init_fn(params):
        # Two distinct count buffers: a state must not alias itself (donation).
        return SphericalTransportState(
            jnp.zeros([], jnp.int32),
            ScaleByAdamSState(jnp.zeros([], jnp.int32), *_zero_moments(channel_dims, params)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        geometries = channels.resolve_channel_dims(channel_dims, params)
        lr = _learning_rate_at(learning_rate, state.count)
        inner = state.inner_state
        count = optax.safe_increment(inner.count)
        bias1 = 1 - b1 ** count
        bias2 = 1 - b2 ** count

        def leaf(geo, g, m, v, p):
            m, v = _adams_moments(geo, g, m, v, b1, b2)
            # The step is s * m with s per channel (elementwise on Euclidean leaves).
            s = lr * (geo.group_size ** 0.5 / (bias1 * (jnp.sqrt(_wide(v) / bias2) + eps)))
            if not geo.is_spherical:
                return (-s * m).astype(g.dtype), m, v
            return _step_and_transport(m, v, p, s, geo, eps, g.dtype)

        new_updates, mu, nu = _map_leaves(leaf, geometries, updates, inner.mu, inner.nu,
                                          params, num_states=2)
        return new_updates, SphericalTransportState(
            optax.safe_increment(state.count), ScaleByAdamSState(count, mu, nu))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_sgdmrt(learning_rate: optax.ScalarOrSchedule = 0.1, momentum: float = 0.0,
                    dampening: float = 0.0, channel_dims: ChannelDimsSpec = None,
                    ) -> optax.GradientTransformation:
    r"""SGD momentum followed by the RT transport of its buffer, fused; **owns the learning rate**.

    The same update and state as ``spherical_transport(scale_by_momentum(momentum,
    dampening), learning_rate, channel_dims, eps=0.0, first_moments=("momentum",),
    second_moments=())`` (equal to rounding, tested), computed from three per-channel
    inner products as in :func:`scale_by_adamsrt` (the step is
    :math:`x_{new} = x_{prev} - \eta\, b`). This is what :func:`sing_jax.sgdmrt` uses.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SphericalTransportState`
      around a :class:`ScaleByMomentumState`.
    """
    hyperparams.check_non_negative("scale_by_sgdmrt", "learning_rate", learning_rate)
    hyperparams.check_unit_interval("scale_by_sgdmrt", "momentum", momentum,
                                    include_one=True)
    hyperparams.check_unit_interval("scale_by_sgdmrt", "dampening", dampening,
                                    include_one=True)

    def init_fn(params):
        channels.resolve_channel_dims(channel_dims, params)
        return SphericalTransportState(
            jnp.zeros([], jnp.int32),
            ScaleByMomentumState(jax.tree.map(jnp.zeros_like, params)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        geometries = channels.resolve_channel_dims(channel_dims, params)
        lr = _learning_rate_at(learning_rate, state.count)

        def leaf(geo, g, b, p):
            b = _momentum_buffer(g, b, momentum, dampening)
            if not geo.is_spherical:
                return (-lr * b).astype(g.dtype), b
            update, moved, _ = _step_and_transport(b, None, p, lr, geo, 0.0, g.dtype)
            return update, moved

        new_updates, buf = _map_leaves(leaf, geometries, updates,
                                       state.inner_state.momentum, params, num_states=1)
        return new_updates, SphericalTransportState(optax.safe_increment(state.count),
                                                    ScaleByMomentumState(buf))

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------
# AdamG


class ScaleByAdamGState(NamedTuple):
    """State of :func:`scale_by_adamg`."""

    count: chex.Array  # int32
    mu: optax.Updates
    nu: optax.Updates  # per-channel on sphere leaves, elementwise elsewhere


def scale_by_adamg(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8,
                   channel_dims: ChannelDimsSpec = None,
                   single_element_spheres: bool = False) -> optax.GradientTransformation:
    r"""AdamG: Adam on the unit sphere of each channel (the seed 001 baseline).

    On a leaf with a channel spec (the *sphere* branch), with per-channel
    ``<.,.>``:

    .. math::
      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2)\langle g_t, g_t\rangle \\
      x_{new} &= p - \eta\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} \\
      m_t &\leftarrow \frac{m_t \langle p, x_{new}\rangle - \langle m_t, x_{new}\rangle\, p}
      {\sqrt{\langle p, p\rangle \langle x_{new}, x_{new}\rangle} + \epsilon} \\
      p &\leftarrow x_{new} / (\sqrt{\langle x_{new}, x_{new}\rangle} + \epsilon)

    so every channel is put back on the unit sphere after each step. Euclidean
    leaves (spec ``None``, or channel groups of one element, ``d = 1``, where a
    sphere would be the two points +-1) take a plain Adam step (the alias
    :func:`sing_jax.adamg` adds coupled L2 to those leaves only). It needs the
    post-update parameters, so it **owns the learning rate**: its output is the
    final update.

    Difference from the reference: the reference's ``channel_wise=True`` selects
    its *Adam* branch and ``channel_wise=False`` the sphere branch (the opposite of
    AdamS/AdamSRT), and its training script passes ``channel_wise=True`` for the
    conv kernels, so there the kernels get plain Adam. Here a ``ChannelDims`` spec
    always means the sphere branch, which is the paper's intent.

    To run the reference script as written, give the conv kernels ``None`` and every
    other leaf ``ChannelDims((-1,))`` with ``single_element_spheres=True``: the
    reference's sphere branch also takes leaves whose channels hold one element
    (BatchNorm scales and biases, the classifier bias), each element put back on its
    sphere :math:`\{-1, +1\}`.

    Args:
      learning_rate: the learning rate or schedule.
      b1, b2, eps: Adam's constants.
      channel_dims: the channel spec (``None``: every leaf Euclidean).
      single_element_spheres: leaves with a spec whose channels hold one element
        (``d = 1``) take the sphere branch too, instead of Adam.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamGState`.
    """
    hyperparams.check_non_negative("scale_by_adamg", "learning_rate", learning_rate)
    hyperparams.check_adam_hyperparams("scale_by_adamg", b1, b2, eps)

    def init_fn(params):
        return ScaleByAdamGState(jnp.zeros([], jnp.int32),
                                 *_zero_moments(channel_dims, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        geometries = channels.resolve_channel_dims(channel_dims, params)
        count = optax.safe_increment(state.count)
        lr = _learning_rate_at(learning_rate, state.count)
        bias1 = 1 - b1 ** count
        bias2 = 1 - b2 ** count

        def leaf(geo, g, m, v, p):
            m, v = _adams_moments(geo, g, m, v, b1, b2)
            # Adam's step is s * m, s per channel on sphere leaves.
            s = lr * (1.0 / (bias1 * (jnp.sqrt(_wide(v) / bias2) + eps)))
            if not _on_sphere(geo, single_element_spheres):
                # d = 1 (spec section 2): a one-element sphere is Euclidean, so the
                # leaf takes AdamG's Euclidean parent, Adam, instead of snapping to +-1.
                return (-s * m).astype(g.dtype), m, v
            # As in the fused RT steps: inner products from existing arrays only, and
            # x_new recovered from the new params, so that XLA needs no copy of p.
            m32, xp = _wide(m), _wide(p)
            dots = _step_along_moment(m32, xp, s, geo)
            new_sq = jnp.maximum(dots.new_new, 0.0)
            norm = jnp.sqrt(new_sq) + eps
            update = ((xp - s * m32) / norm - xp).astype(g.dtype)
            x_new = _wide((p + update).astype(p.dtype)) * norm
            # m <x_prev, x_new> - <m, x_new> x_prev = m <x_new, x_new> - <m, x_new> x_new
            moved = ((m32 * new_sq - x_new * dots.moment_new)
                     / (jnp.sqrt(dots.prev_prev * new_sq) + eps))
            return update, moved.astype(m.dtype), v

        new_updates, mu, nu = _map_leaves(leaf, geometries, updates, state.mu, state.nu,
                                          params, num_states=2)
        return new_updates, ScaleByAdamGState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _on_sphere(geometry: LeafGeometry, single_element_spheres: bool) -> bool:
    return geometry.is_spherical or (single_element_spheres
                                     and geometry.group_axes is not None)


def euclidean_mask(channel_dims: ChannelDimsSpec,
                   single_element_spheres: bool = False) -> Any:
    """A callable ``params -> bool tree``: True where the leaf is Euclidean.

    Euclidean means a ``None`` spec or channel groups of one element (``d = 1``),
    the leaves where the channel optimizers reduce to their Euclidean parents
    (with ``single_element_spheres``, only a ``None`` spec: see :func:`scale_by_adamg`).
    """

    def mask(params):
        geometries = channels.resolve_channel_dims(channel_dims, params)
        return channels.map_with_geometry(
            lambda g, _: not _on_sphere(g, single_element_spheres), geometries, params)

    return mask
