"""Adam with SING's softplus denominator."""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sing_jax._src import hyperparams


class ScaleBySoftplusAdamState(NamedTuple):
    """State of :func:`scale_by_softplus_adam`."""

    count: chex.Array  # int32, steps taken
    mu: optax.Updates
    nu: optax.Updates


# log1p(t) / t on [0, 1], interpolated at 200 Chebyshev nodes with a degree-9 polynomial
# (coefficients in the monomial basis, lowest first). Its error, 3.4e-9 in float64, is
# far below float32's rounding, so ``t * poly(t)`` is as accurate as ``log1p(t)``.
_LOG1P_OVER_T = (0.999999995384853, -0.4999990399276453, 0.3333000403523737,
                 -0.24954558871241778, 0.19678117257162436, -0.1531186310459056,
                 0.10614264691236108, -0.05706420080456706, 0.019907160950107996,
                 -0.0032563784785039464)


def _polynomial(coefficients: tuple[float, ...], x: jax.Array) -> jax.Array:
    """``sum_i coefficients[i] x^i`` (lowest first) by Horner's rule, in ``x``'s dtype."""
    acc = jnp.asarray(coefficients[-1], x.dtype)
    for coefficient in coefficients[-2::-1]:
        acc = acc * x + jnp.asarray(coefficient, x.dtype)
    return acc


def _log1p_unit_interval(t: jax.Array) -> jax.Array:
    """``log1p(t)`` for ``t`` in ``[0, 1]``: exact in float64, a polynomial otherwise."""
    if t.dtype == jnp.float64:
        return jnp.log1p(t)
    return t * _polynomial(_LOG1P_OVER_T, t)


# exp(-r) on [-ln2/2, ln2/2], interpolated at 300 Chebyshev nodes with a degree-6
# polynomial (monomial basis, lowest first); relative error 2.6e-9 in float64.
_EXP_NEG_NEAR_ZERO = (0.9999999999595476, -1.0000000377274512, 0.500000010774963,
                      -0.16666415477230495, 0.04166621827397424, -0.00837512889074607,
                      0.0013948580838681632)
# Largest z for which 2^-round(z / ln2) is a normal float32 (exponent field >= 1).
_EXP_NEG_FLOAT32_MAX_Z = 87.0
# ln2 split as hi + lo (Cody and Waite), hi a multiple of 2^-16: k * hi is exact in
# float32 for the k <= 126 used here, so r = z - k ln2 loses nothing to rounding.
_LN2_HI = 0.693145751953125
_LN2_LO = math.log(2) - _LN2_HI
_ROUNDING_SHIFT = 1.5 * 2.0**23
_ROUNDING_SHIFT_BITS = int(np.float32(_ROUNDING_SHIFT).view(np.int32))


def _exp_of_negative(z: jax.Array, z_max: float) -> jax.Array:
    """``exp(-z)`` for float32 ``z`` in ``[0, z_max]``, by ``2^-k exp(-r)``, ``z = k ln2 + r``.

    Knowing the range saves XLA's ``exp`` its clamps; ``k`` is rounded by a float
    addition rather than converted (XLA's float-to-int conversion guards against NaN
    and overflow), and ``2^-k`` is written straight into the exponent bits. As
    accurate as ``jnp.exp`` (1e-7 relative, tested against float64). Other dtypes,
    and ranges whose ``2^-k`` would not be a normal float32, use ``jnp.exp``.
    """
    if z.dtype != jnp.float32 or not 0 <= z_max <= _EXP_NEG_FLOAT32_MAX_Z:
        return jnp.exp(-z)
    # Adding 1.5 * 2^23 rounds z / ln2 to an integer k held in the low mantissa bits.
    # k is read from those bits, not as shifted - 1.5 * 2^23, which XLA would
    # simplify back to z / ln2.
    shifted = z * (1 / math.log(2)) + _ROUNDING_SHIFT
    k_int = jax.lax.bitcast_convert_type(shifted, jnp.int32) - _ROUNDING_SHIFT_BITS
    k = k_int.astype(z.dtype)
    r = (z - k * _LN2_HI) - k * _LN2_LO
    exponent_bits = (127 - k_int) << 23  # the float32 2^-k
    return _polynomial(_EXP_NEG_NEAR_ZERO, r) * jax.lax.bitcast_convert_type(
        exponent_bits, jnp.float32)


def softplus_denominator(d: jax.Array, beta: float, threshold: float = 20.0) -> jax.Array:
    r"""PyTorch's ``softplus(d, beta, threshold)`` for ``d >= 0``.

    The identity where ``beta * d > threshold``, else

    .. math::
      \operatorname{softplus}_\beta(d) = \tfrac{1}{\beta} \log(1 + e^{\beta d})
      = d + \tfrac{1}{\beta} \log(1 + e^{-\beta d})

    The second form only ever takes ``log1p`` of ``t = e^{-beta d}`` in ``(0, 1]``,
    which a short polynomial gets to float32 precision, and ``t`` itself is an
    ``exp`` over the known range ``[0, threshold]`` (:func:`_exp_of_negative`). On
    XLA:CPU, where this softplus is compute-bound, it costs about a quarter of
    ``log1p(exp(.))`` (11M float32 elements: 2.4 ms beyond a plain copy, against
    10 ms); the results agree to float32 rounding (tested against float64 over the
    whole range). float64 takes ``jnp.log1p(jnp.exp(.))``.
    """
    d = jnp.asarray(d)
    z = beta * d
    tail = _log1p_unit_interval(_exp_of_negative(jnp.minimum(z, threshold), threshold))
    return jnp.where(z > threshold, d, d + tail * (1 / beta))


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
            d = jnp.sqrt(v) * inv_sqrt_bias2
            if softplus_beta is None:
                d = d + eps
            else:
                d = softplus_denominator(d, softplus_beta, softplus_threshold)
            return (m * inv_bias1 / d).astype(g.dtype)

        new_updates = jax.tree.map(direction, updates, mu, nu)
        return new_updates, ScaleBySoftplusAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
