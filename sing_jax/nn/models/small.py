"""Small models for the embedded datasets.

An MLP and a CNN for 8x8 digits, a 1-D CNN for MNIST-1D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.init import check_model_init, layer_initializers
from sing_jax.nn.layers import max_pool
from sing_jax.nn.models._common import (
    ConvNormAct,
    check_input_channels,
    check_positive_int,
    head,
)
from sing_jax.nn.norms import NormLike, check_norm_name, make_norm


class MLP(nnx.Module):
    """``Linear -> norm -> activation -> dropout`` per hidden layer, then a linear classifier.

    Inputs of any shape ``(B, ...)`` are flattened to ``(B, in_features)`` (8x8
    digits: ``in_features=64``). Hidden linears that feed a norm have no bias.

    Args:
      in_features: flattened input size.
      hidden: hidden widths.
      num_classes: classifier outputs.
      norm: a norm name/factory applied after each hidden linear ("none" by default).
      activation: a ``jax.nn`` activation name (kernels get its table initialiser).
      dropout_rate: dropout after each hidden activation (MC dropout uses it).
      init: ``"by_activation"`` or ``"pytorch_default"`` (:mod:`sing_jax.nn.init`).
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 128),
                 num_classes: int = 10, *, norm: NormLike = "none",
                 activation: str = "relu", dropout_rate: float = 0.0,
                 init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, "MLP")
        check_model_init(init, "MLP")
        check_positive_int("MLP", "in_features", in_features)
        check_positive_int("MLP", "num_classes", num_classes)
        if not hasattr(jax.nn, activation):
            raise ValueError(f"MLP: activation={activation!r} is not a jax.nn function.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"MLP: dropout_rate={dropout_rate!r}; expected 0 <= rate < 1.")
        self.in_features = in_features
        self.activation = activation
        linears, norms = [], []
        features = in_features
        for width in hidden:
            check_positive_int("MLP", "hidden width", width)
            kernel_init, bias_init = layer_initializers(init, activation, features)
            linears.append(nnx.Linear(features, width, use_bias=norm == "none",
                                      kernel_init=kernel_init, bias_init=bias_init,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            norms.append(make_norm(norm, width, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype, **norm_kwargs))
            features = width
        self.linears = nnx.List(linears)
        self.norms = nnx.List(norms)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = head(features, num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MLP: input flattens to {x.shape[-1]} features per example, expected "
                f"in_features={self.in_features}."
            )
        act = getattr(jax.nn, self.activation)
        for linear, norm in zip(self.linears, self.norms):
            x = self.dropout(act(norm(linear(x))))
        return self.head(x)


class SmallCNN(nnx.Module):
    """A small CNN for 8x8 digits: conv(32)-conv(32)-pool-conv(64)-pool, mean, linear.

    Takes ``(B, 8, 8, C)`` (or ``(B, 8, 8)``, read as one channel). ``init``:
    ``"by_activation"`` or ``"pytorch_default"``.
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1,
                 widths: tuple[int, int] = (32, 64), norm: NormLike = "batch",
                 dropout_rate: float = 0.0, init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, "SmallCNN")
        check_model_init(init, "SmallCNN")
        check_positive_int("SmallCNN", "num_classes", num_classes)
        check_positive_int("SmallCNN", "in_channels", in_channels)
        common = dict(norm=norm, activation="relu", init=init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, **norm_kwargs)
        self.in_channels = in_channels
        self.conv1 = ConvNormAct(in_channels, widths[0], (3, 3), **common)
        self.conv2 = ConvNormAct(widths[0], widths[0], (3, 3), **common)
        self.conv3 = ConvNormAct(widths[0], widths[1], (3, 3), **common)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = head(widths[1], num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        check_input_channels("SmallCNN", x, self.in_channels, 2)
        x = self.conv2(self.conv1(x))
        x = max_pool(x, (2, 2), strides=(2, 2))
        x = max_pool(self.conv3(x), (2, 2), strides=(2, 2))
        return self.head(self.dropout(jnp.mean(x, axis=(1, 2))))


class CNN1D(nnx.Module):
    """A 1-D CNN for MNIST-1D (length 40).

    Three stride-2 conv-norm-ReLU layers (kernels 5, 3, 3), flatten, linear.

    Takes ``(B, L)`` or ``(B, L, C)``; ``L`` must equal ``length``. ``init``:
    ``"by_activation"`` or ``"pytorch_default"``.
    """

    def __init__(self, num_classes: int = 10, *, length: int = 40, in_channels: int = 1,
                 width: int = 32, norm: NormLike = "batch", dropout_rate: float = 0.0,
                 init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, "CNN1D")
        check_model_init(init, "CNN1D")
        for name, value in (("num_classes", num_classes), ("length", length),
                            ("in_channels", in_channels), ("width", width)):
            check_positive_int("CNN1D", name, value)
        common = dict(norm=norm, activation="relu", strides=2, init=init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, **norm_kwargs)
        self.in_channels = in_channels
        self.length = length
        self.convs = nnx.List([
            ConvNormAct(in_channels, width, (5,), padding=((2, 2),), **common),
            ConvNormAct(width, width, (3,), padding=((1, 1),), **common),
            ConvNormAct(width, width, (3,), padding=((1, 1),), **common),
        ])
        out_length = length
        for kernel, pad in ((5, 2), (3, 1), (3, 1)):
            out_length = (out_length + 2 * pad - kernel) // 2 + 1
        if out_length <= 0:
            raise ValueError(f"CNN1D: length={length} is too short for three stride-2 convs.")
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = head(out_length * width, num_classes, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        check_input_channels("CNN1D", x, self.in_channels, 1)
        if x.shape[1] != self.length:
            raise ValueError(
                f"CNN1D: input length {x.shape[1]} (shape {x.shape}) differs from "
                f"length={self.length}."
            )
        for conv in self.convs:
            x = conv(x)
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


