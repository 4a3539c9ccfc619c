"""Activations that ``jax.nn`` / ``flax.nnx`` lack: ReLU², SwiGLU, RReLU.

Everything else is reused: ``jax.nn.relu``, ``gelu``, ``silu`` (Swish), ``mish``
is ``x * tanh(softplus(x))``, ``selu``, ``leaky_relu``, and ``flax.nnx.PReLU``
(re-exported here as :data:`PReLU`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PReLU = nnx.PReLU


def relu_squared(x: jax.Array) -> jax.Array:
    r"""ReLU²: :math:`\max(0, x)^2`."""
    return jnp.square(jax.nn.relu(x))


def mish(x: jax.Array) -> jax.Array:
    r"""Mish: :math:`x \tanh(\operatorname{softplus}(x))`."""
    return x * jnp.tanh(jax.nn.softplus(x))


def swiglu(z: jax.Array, beta: float | jax.Array = 1.0) -> jax.Array:
    r"""SwiGLU of a doubled feature axis ``z = [z1, z2]``.

    :math:`\mathrm{swish}_\beta(z_1) \odot z_2`, where

    .. math::

      \mathrm{swish}_\beta(z_1) = z_1 \, \sigma(\beta z_1)
    """
    if z.shape[-1] % 2:
        raise ValueError(
            f"swiglu: the last axis of z has odd size {z.shape[-1]} (shape {z.shape}); "
            "expected an even size [z1, z2]."
        )
    z1, z2 = jnp.split(z, 2, axis=-1)
    return z1 * jax.nn.sigmoid(beta * z1) * z2


class SwiGLU(nnx.Module):
    r"""The SwiGLU gate as a module: one linear map to ``2 * hidden_features``, then :func:`swiglu`.

    .. math::

      y = \mathrm{swish}_\beta(x W_1 + b_1) \odot (x W_2 + b_2)

    ``W_1, W_2`` are stored as one kernel ``(in_features, 2 * hidden_features)``.
    He initialisation (seed 003 lists SwiGLU with the ReLU family), zero bias.

    Args:
      in_features: input feature size.
      hidden_features: output size of the gate.
      beta: the Swish slope; ``learnable_beta=True`` makes it a parameter.
      use_bias: whether the linear map has a bias.
    """

    def __init__(self, in_features: int, hidden_features: int, *, beta: float = 1.0,
                 learnable_beta: bool = False, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        from sing_jax.nn.init import init_for_activation

        self.proj = nnx.Linear(in_features, 2 * hidden_features, use_bias=use_bias,
                               kernel_init=init_for_activation("swiglu"),
                               bias_init=nnx.initializers.zeros, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.beta = (nnx.Param(jnp.asarray(beta, param_dtype)) if learnable_beta
                     else beta)

    def __call__(self, x: jax.Array) -> jax.Array:
        beta = self.beta[...] if isinstance(self.beta, nnx.Param) else self.beta
        return swiglu(self.proj(x), beta)


class RReLU(nnx.Module):
    r"""Randomised leaky ReLU (Xu et al. 2015).

    .. math::

      y = x \text{ for } x \ge 0, \qquad y = a x \text{ for } x < 0,

    with ``a ~ Uniform(lower, upper)`` drawn per element in training
    (``deterministic=False``) and ``a = (lower + upper) / 2`` in evaluation,
    like PyTorch's ``nn.RReLU``. ``model.train()`` / ``model.eval()`` switch it
    through the ``deterministic`` attribute, as for ``nnx.Dropout``.

    Args:
      lower, upper: the slope range, ``0 <= lower <= upper``.
      deterministic: evaluation mode when True.
      rng_collection: the stream the slopes are drawn from.
      rngs: random streams; required for training mode unless passed at call.
    """

    def __init__(self, lower: float = 1.0 / 8.0, upper: float = 1.0 / 3.0, *,
                 deterministic: bool = False, rng_collection: str = "dropout",
                 rngs: nnx.Rngs | None = None):
        if not 0.0 <= lower <= upper:
            raise ValueError(
                f"RReLU: lower={lower}, upper={upper}; expected 0 <= lower <= upper."
            )
        self.lower = lower
        self.upper = upper
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = rngs[rng_collection].fork() if rngs is not None else nnx.data(None)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            slope = jnp.asarray((self.lower + self.upper) / 2.0, x.dtype)
        else:
            stream = rngs[self.rng_collection] if rngs is not None else self.rngs
            if stream is None:
                raise ValueError(
                    "RReLU: training mode (deterministic=False) needs random slopes but "
                    "no rngs were given at construction or call."
                )
            slope = jax.random.uniform(stream(), x.shape, jnp.float32, self.lower,
                                       self.upper).astype(x.dtype)
        return jnp.where(x >= 0, x, slope * x)
