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

``"pytorch_default"`` is the other scheme every model offers (``init=``): PyTorch's
defaults for ``nn.Conv2d``/``nn.Linear``, a kernel :math:`U(-b, b)` with
:math:`b = 1/\sqrt{\mathrm{fan}_{in}}` (``kaiming_uniform_(a=sqrt(5))``), a bias
from the same interval, and norms with scale 1 and bias 0. It is what a port of a
PyTorch recipe needs: for a kernel that feeds a BatchNorm the initial norm sets the
effective learning rate, and He-normal starts such a kernel about
:math:`\sqrt{6} \approx 2.45` times larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[..., jax.Array]

GLOROT_ACTIVATIONS = ("none", "linear", "identity", "tanh", "sigmoid", "softmax")
HE_ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "swish", "silu", "mish",
                  "swiglu", "relu_squared", "rrelu", "prelu")
LECUN_ACTIVATIONS = ("selu",)
DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")
# The initialisation schemes a model's ``init=`` accepts.
MODEL_INITS = ("by_activation", "pytorch_default")

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


# ---------------------------------------------------------------------------------
# PyTorch's default initialisation


def pytorch_default_kernel_init() -> Initializer:
    r"""PyTorch's default ``nn.Conv*``/``nn.Linear`` weight init, in Flax layouts.

    .. math:: W \sim U\left(-1/\sqrt{\mathrm{fan}_{in}},\ 1/\sqrt{\mathrm{fan}_{in}}\right)

    (``kaiming_uniform_(a=sqrt(5))``: gain :math:`\sqrt{2/(1+5)}`, bound
    :math:`\mathrm{gain}\sqrt{3/\mathrm{fan}_{in}}`), i.e. a variance of
    :math:`1/(3\,\mathrm{fan}_{in})`. ``fan_in`` is every axis but the last (a Flax
    ``Conv`` kernel ``(*window, in / groups, out)``, a ``Linear`` kernel ``(in, out)``),
    which is PyTorch's ``in / groups * prod(window)``.
    """
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pytorch_default_bias_init(fan_in: int) -> Initializer:
    r"""PyTorch's default bias init of a layer with ``fan_in`` inputs.

    .. math:: b \sim U\left(-1/\sqrt{\mathrm{fan}_{in}},\ 1/\sqrt{\mathrm{fan}_{in}}\right)
    """
    if not isinstance(fan_in, (int, np.integer)) or fan_in < 0:
        raise ValueError(f"pytorch_default_bias_init: fan_in={fan_in!r}; expected an int >= 0.")
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_model_init(init: str, owner: str) -> None:
    """Raises a ValueError naming ``owner`` when ``init`` is not one of :data:`MODEL_INITS`."""
    if init not in MODEL_INITS:
        raise ValueError(f"{owner}: init={init!r}; allowed values: {MODEL_INITS}.")


def layer_initializers(init: str, activation: str, fan_in: int
                       ) -> tuple[Initializer, Initializer]:
    """``(kernel_init, bias_init)`` of a conv/linear layer under a model's ``init`` scheme.

    ``"by_activation"``: :func:`init_for_activation` and zero biases (seed 003);
    ``"pytorch_default"``: :func:`pytorch_default_kernel_init` and
    :func:`pytorch_default_bias_init` (the activation plays no part).
    """
    check_model_init(init, "layer_initializers")
    if init == "pytorch_default":
        return pytorch_default_kernel_init(), pytorch_default_bias_init(fan_in)
    return init_for_activation(activation), nnx.initializers.zeros


def _fan_in(module: nnx.Module) -> int:
    if isinstance(module, nnx.LinearGeneral):
        return int(np.prod(module.in_features))
    return int(np.prod(module.kernel.shape[:-1]))


def reinit_pytorch_default(model: nnx.Module, *, rngs: nnx.Rngs,
                           layer_types: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral,
                                                            nnx.Conv),
                           norm_types: tuple[type, ...] = (nnx.BatchNorm, nnx.LayerNorm,
                                                           nnx.GroupNorm, nnx.RMSNorm)) -> int:
    """Re-initialises ``model`` in place with PyTorch's defaults; returns the layers touched.

    Every ``layer_types`` kernel gets :func:`pytorch_default_kernel_init` and its bias
    :func:`pytorch_default_bias_init` (``fan_in`` from the kernel: all axes but the
    output ones); every ``norm_types`` layer gets scale 1 and bias 0. Other
    parameters (embeddings, tokens, LearnableScaler) are left alone: PyTorch has no
    single default for them. Use it on a model built by another recipe, e.g. a ViT
    whose patch-embedding conv should start as PyTorch's ``nn.Conv2d`` does.
    """
    count = 0
    kernel_init = pytorch_default_kernel_init()
    for _, module in nnx.iter_modules(model):
        if isinstance(module, layer_types):
            # U(+-1/sqrt(fan_in)) for the bias, and for a LinearGeneral kernel, whose
            # several input axes variance_scaling's fans would not count as fan_in
            uniform = pytorch_default_bias_init(_fan_in(module))
            kernel = module.kernel
            if isinstance(module, nnx.LinearGeneral):
                kernel[...] = uniform(rngs.params(), kernel.shape, kernel.dtype)
            else:
                kernel[...] = kernel_init(rngs.params(), kernel.shape, kernel.dtype)
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[...] = uniform(rngs.params(), bias.shape, bias.dtype)
            count += 1
        elif isinstance(module, norm_types):
            for name, value in (("scale", 1), ("bias", 0)):
                variable = getattr(module, name, None)
                if variable is not None:
                    variable[...] = jnp.full(variable.shape, value, variable.dtype)
            count += 1
    return count
