"""Adam with SING's softplus denominator."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sing_jax._src import hyperparams


class ScaleBySoftplusAdamState(NamedTuple):
    """State of :func:`scale_by_softplus_adam`."""

    count: chex.Array  # int32, steps taken
    mu: optax.Updates
    nu: optax.Updates


def softplus_denominator(d: jax.Array, beta: float, threshold: float = 20.0) -> jax.Array:
    r"""PyTorch's ``softplus(d, beta, threshold)``: ``d`` where ``beta d > threshold``, else

    .. math::
      \operatorname{softplus}_\beta(d) = \tfrac{1}{\beta} \log(1 + e^{\beta d})

    computed as ``logaddexp(beta d, 0) / beta`` in ``d``'s dtype, widened to float32
    for narrower floats.
    """
    d = jnp.asarray(d)
    wide = d.astype(jnp.promote_types(d.dtype, jnp.float32))
    z = beta * wide
    return jnp.where(z > threshold, wide, jnp.logaddexp(z, 0.0) / beta).astype(d.dtype)


def scale_by_softplus_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                           softplus_beta: float | None = 50.0,
                           softplus_threshold: float = 20.0,
                           mu_dtype: jnp.dtype | None = None,
                           ) -> optax.GradientTransformation:
    r"""Adam whose denominator goes through a softplus (SING steps 3, 5 and 6).

    .. math::
      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
      d_t &= \operatorname{softplus}_\beta\!\Big(\sqrt{v_t} / \sqrt{1 - \beta_2^t}\Big)
      \quad\text{or, with } \beta = \text{None,}\quad
      d_t = \sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon \\
      u_t &= \frac{m_t}{1 - \beta_1^t} \Big/ d_t

    The softplus keeps the step bounded when ``v`` is tiny (``d >= log(2)/beta``),
    and like PyTorch it is the identity where ``beta * d > softplus_threshold``.
    The learning rate is not applied here.

    Args:
      b1, b2: decay rates of the first and second moments, in ``[0, 1)``.
      eps: added to the denominator when ``softplus_beta`` is None.
      softplus_beta: sharpness of the softplus; ``None`` uses ``d + eps`` instead.
      softplus_threshold: ``beta * d`` above which the softplus is the identity.
      mu_dtype: dtype of the first moment (default: the parameter's).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoftplusAdamState`.
    """
    hyperparams.check_adam_hyperparams("scale_by_softplus_adam", b1, b2, eps)
    if softplus_beta is not None:
        # softplus(beta * d) / beta divides by beta: 0 would give NaN updates.
        hyperparams.check_positive("scale_by_softplus_adam", "softplus_beta", softplus_beta)

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or jnp.asarray(p).dtype),
                          params)
        nu = jax.tree.map(jnp.zeros_like, params)
        return ScaleBySoftplusAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates,
                          state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
        inv_bias1 = 1 / (1 - b1 ** count)
        inv_sqrt_bias2 = jax.lax.rsqrt(1 - b2 ** count)

        def direction(g, m, v):
            d = jnp.sqrt(v.astype(jnp.promote_types(v.dtype, jnp.float32))) * inv_sqrt_bias2
            d = d + eps if softplus_beta is None else softplus_denominator(
                d, softplus_beta, softplus_threshold)
            return (m * inv_bias1 / d).astype(g.dtype)

        new_updates = jax.tree.map(direction, updates, mu, nu)
        return new_updates, ScaleBySoftplusAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
