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


# softplus(z) = z + log1p(exp(-z)) for z >= 0. On [0, 16] the tail log1p(exp(-z)) is
# P(z) / Q(z) (monomial coefficients, lowest first), fitted by
# experiments/fit_softplus_tail.py for the least maximum error relative to softplus:
# 1.1e-8 in float64, 1.7e-7 evaluated in float32. Every Q coefficient is positive, so
# Q >= 1 on z >= 0. Past 16 the tail (< 1.2e-7) is below float32's rounding of z.
_SOFTPLUS_TAIL_P = (0.6931471728800349, -0.2204641651562231, 0.02914367746227404,
                    -0.001999146747375811, 7.101103902732194e-05, -1.0413320321083965e-06)
_SOFTPLUS_TAIL_Q = (1.0, 0.4032840906863387, 0.15262731599561244, 0.0344362641803016,
                    0.005047635325289364, 0.0003091395717198564, 7.809416788450572e-05)
_SOFTPLUS_TAIL_RANGE = 16.0


def _polynomial(coefficients: tuple[float, ...], x: jax.Array) -> jax.Array:
    """``sum_i coefficients[i] x^i`` (lowest first) by Horner's rule, in ``x``'s dtype."""
    acc = jnp.asarray(coefficients[-1], x.dtype)
    for coefficient in coefficients[-2::-1]:
        acc = acc * x + jnp.asarray(coefficient, x.dtype)
    return acc


def _softplus_textbook(d: jax.Array, beta: float, threshold: float) -> jax.Array:
    z = beta * d
    return jnp.where(z > threshold, d, jnp.logaddexp(z, 0.0) / beta)


def _softplus_rational(d: jax.Array, beta: float, threshold: float) -> jax.Array:
    """The float32 softplus for XLA:CPU: ``(z Q(z) + P(z)) / (beta Q(z))``, ``z = beta d``.

    XLA:CPU's ``exp`` and ``log1p`` make SING's update compute-bound (48.9 against
    17.9 ms a step on ResNet-18's tree, ``bench_optimizers.py``); this is a dozen
    multiply-adds and one division, as accurate as the textbook form in float32
    (both within 2.6e-7 of the float64 rule, tested).
    """
    z = beta * d
    clipped = jnp.minimum(z, _SOFTPLUS_TAIL_RANGE)
    q = _polynomial(_SOFTPLUS_TAIL_Q, clipped)
    tail = jnp.where(z > threshold, 0.0, _polynomial(_SOFTPLUS_TAIL_P, clipped))
    return (z * q + tail) / (beta * q)


def softplus_denominator(d: jax.Array, beta: float, threshold: float = 20.0) -> jax.Array:
    r"""PyTorch's ``softplus(d, beta, threshold)``: ``d`` where ``beta d > threshold``, else

    .. math::
      \operatorname{softplus}_\beta(d) = \tfrac{1}{\beta} \log(1 + e^{\beta d})

    computed as ``logaddexp(beta d, 0) / beta`` in ``d``'s dtype, widened to float32
    for narrower floats. For ``d >= 0`` (a root of a second moment). On a CPU backend
    float32 uses a rational tail instead of ``exp``/``log1p`` (chosen with
    ``jax.lax.platform_dependent`` when the computation is lowered; equal to the
    textbook form to float32 rounding).
    """
    d = jnp.asarray(d)
    wide = d.astype(jnp.promote_types(d.dtype, jnp.float32))
    if wide.dtype == jnp.float64:
        return _softplus_textbook(wide, beta, threshold).astype(d.dtype)
    softplus = jax.lax.platform_dependent(
        wide, cpu=lambda x: _softplus_rational(x, beta, threshold),
        default=lambda x: _softplus_textbook(x, beta, threshold))
    return softplus.astype(d.dtype)


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
