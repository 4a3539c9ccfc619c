"""Shared building blocks of the benchmark models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sing_jax.nn.init import check_model_init, layer_initializers
from sing_jax.nn.norms import NormLike, check_norm_name, make_norm


def check_input_channels(model_name: str, x: jax.Array, in_channels: int,
                         spatial_ndim: int) -> None:
    """Raises a ValueError when ``x`` is not ``(B, *spatial, in_channels)``."""
    if x.ndim != spatial_ndim + 2 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{model_name}: input of shape {x.shape} does not match in_channels="
            f"{in_channels}; expected (batch, {', '.join(['size'] * spatial_ndim)}, "
            f"{in_channels}) (channels last)."
        )


class ConvNormAct(nnx.Module):
    """``act(norm(conv(x)))``; the conv has a bias only when ``norm == "none"``.

    A conv that feeds a normalisation has no bias, as in the published
    architectures: the norm's shift makes it redundant and its presence would
    break the scale invariance that ``detect_channel_dims`` looks for.
    ``init``: ``"by_activation"`` (the activation's kernel init, zero bias) or
    ``"pytorch_default"`` (see :mod:`sing_jax.nn.init`).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: tuple[int, ...],
                 *, strides: int | tuple[int, ...] = 1, padding: Any = "SAME",
                 norm: NormLike = "batch", activation: str | None = "relu",
                 init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, type(self).__name__)
        check_model_init(init, type(self).__name__)
        fan_in = in_features * int(np.prod(kernel_size))
        kernel_init, bias_init = layer_initializers(init, activation or "none", fan_in)
        self.conv = nnx.Conv(
            in_features, out_features, kernel_size, strides=strides, padding=padding,
            use_bias=norm == "none", kernel_init=kernel_init, bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = make_norm(norm, out_features, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype, **norm_kwargs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(self.conv(x))
        if self.activation is not None:
            x = getattr(jax.nn, self.activation)(x)
        return x


def head(in_features: int, num_classes: int, *, dtype: Any, param_dtype: Any,
         rngs: nnx.Rngs, init: str = "by_activation") -> nnx.Linear:
    """The classifier: a linear map; ``init="by_activation"``: Glorot kernel (no activation
    after) and zero bias; ``"pytorch_default"``: ``nn.Linear``'s uniform kernel and bias."""
    kernel_init, bias_init = layer_initializers(init, "none", in_features)
    return nnx.Linear(in_features, num_classes, kernel_init=kernel_init, bias_init=bias_init,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable (``nnx.Param``) scalars of ``model``."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r}; expected a positive int.")
