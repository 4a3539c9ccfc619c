r"""Initialisation by activation (seed 003's table), with zero biases.

=======================  ==========================================  ======================
scheme                   activations                                 :math:`\sigma^2` (normal)
=======================  ==========================================  ======================
Glorot (Xavier)          none, tanh, sigmoid, softmax                :math:`1 / \mathrm{fan}_{avg}`
He (Kaiming)             ReLU, leaky ReLU, ELU, GELU, Swish, Mish,   :math:`2 / \mathrm{fan}_{in}`
                         SwiGLU, ReLU², RReLU, PReLU
LeCun                    SELU                                        :math:`1 / \mathrm{fan}_{in}`
=======================  ==========================================  ======================

with :math:`\mathrm{fan}_{avg} = (\mathrm{fan}_{in} + \mathrm{fan}_{out}) / 2`. For a
leaky slope ``a`` (leaky ReLU, RReLU, PReLU) He's variance is divided by
:math:`1 + a^2`. The uniform variant draws from :math:`[-r, r]` with
:math:`r = \sqrt{3 \sigma^2}`. Fans follow Flax layouts: a ``Conv`` kernel
``(*window, in, out)`` has ``fan_in = in * prod(window)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

GLOROT_ACTIVATIONS = ("none", "linear", "identity", "tanh", "sigmoid", "softmax")
HE_ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "swish", "silu", "mish",
                  "swiglu", "relu_squared", "rrelu", "prelu")
LECUN_ACTIVATIONS = ("selu",)
DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")

# default leaky slopes (PyTorch defaults) used for the 1 + a^2 correction
_DEFAULT_SLOPES = {"leaky_relu": 0.01, "prelu": 0.25, "rrelu": (1 / 8 + 1 / 3) / 2}


def init_scheme(activation: str) -> str:
    """The scheme of seed 003's table for ``activation``: 'glorot', 'he' or 'lecun'."""
    name = activation.lower()
    if name in GLOROT_ACTIVATIONS:
        return "glorot"
    if name in HE_ACTIVATIONS:
        return "he"
    if name in LECUN_ACTIVATIONS:
        return "lecun"
    raise ValueError(
        f"init_for_activation: activation={activation!r} is not in the table; allowed: "
        f"{sorted(GLOROT_ACTIVATIONS + HE_ACTIVATIONS + LECUN_ACTIVATIONS)}."
    )


def init_for_activation(activation: str, *, distribution: str = "normal",
                        negative_slope: float | None = None) -> Initializer:
    r"""The kernel initializer that seed 003's table gives for ``activation``.

    Returns a ``jax.nn.initializers.variance_scaling`` initializer with
    variance :math:`1/\mathrm{fan}_{avg}` (Glorot), :math:`2/((1+a^2)\,\mathrm{fan}_{in})`
    (He, ``a`` the leaky slope, 0 for plain ReLU-type) or :math:`1/\mathrm{fan}_{in}`
    (LeCun).

    Args:
      activation: the activation that follows the layer (``"none"`` for a head).
      distribution: ``"normal"`` (exact variance), ``"uniform"`` or
        ``"truncated_normal"`` (the variance is still the table's).
      negative_slope: leaky slope ``a``; defaults to PyTorch's for
        leaky_relu/prelu/rrelu and 0 otherwise.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"init_for_activation: distribution={distribution!r}; allowed: {DISTRIBUTIONS}."
        )
    scheme = init_scheme(activation)
    if scheme == "glorot":
        scale, mode = 1.0, "fan_avg"
    elif scheme == "lecun":
        scale, mode = 1.0, "fan_in"
    else:
        slope = negative_slope
        if slope is None:
            slope = _DEFAULT_SLOPES.get(activation.lower(), 0.0)
        scale, mode = 2.0 / (1.0 + slope * slope), "fan_in"
    return jax.nn.initializers.variance_scaling(scale, mode, distribution)


def reinit_by_activation(model: nnx.Module, activation: str, *, rngs: nnx.Rngs,
                         distribution: str = "normal",
                         negative_slope: float | None = None,
                         layer_types: tuple[type, ...] = (nnx.Linear, nnx.Conv)) -> int:
    """Re-initialises, in place, every ``layer_types`` kernel of ``model`` for ``activation``.

    Kernels get :func:`init_for_activation`, biases are set to zero (seed 003:
    random biases bring nothing). Returns the number of layers re-initialised.
    """
    init = init_for_activation(activation, distribution=distribution,
                               negative_slope=negative_slope)
    count = 0
    for _, module in nnx.iter_modules(model):
        if not isinstance(module, layer_types):
            continue
        kernel = module.kernel
        kernel[...] = init(rngs.params(), kernel.shape, kernel.dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias[...] = jnp.zeros(bias.shape, bias.dtype)
        count += 1
    return count
