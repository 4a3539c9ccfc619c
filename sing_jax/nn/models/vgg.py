"""VGG-16 with normalisation after every conv and one linear classifier (seed 001).

13 3x3 conv-norm-ReLU layers (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
512 x3, M) and a single ``Linear(512, num_classes)``; 14.72M parameters for 10
classes with BatchNorm (14.7M as published). The features are averaged over
the remaining spatial positions, which is the plain flatten for 32x32 inputs
(1x1 after five max-pools) and lets other sizes through.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.init import check_model_init
from sing_jax.nn.layers import max_pool
from sing_jax.nn.models._common import (
    ConvNormAct,
    check_input_channels,
    check_positive_int,
    head,
)
from sing_jax.nn.norms import NormLike, check_norm_name

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG(nnx.Module):
    """A VGG from a config of channel counts and ``"M"`` (2x2 max-pool).

    Args:
      config: the layer list (:data:`VGG16_CONFIG` for VGG-16).
      num_classes: classifier outputs.
      norm: a :func:`~sing_jax.nn.make_norm` name or factory ("batch" is VGG-16-BN).
      in_channels: input channels.
      init: ``"by_activation"`` (He-normal convs, Glorot classifier, zero biases) or
        ``"pytorch_default"`` (PyTorch's ``nn.Conv2d``/``nn.Linear`` defaults).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: random streams.
    """

    def __init__(self, config: tuple = VGG16_CONFIG, num_classes: int = 10, *,
                 norm: NormLike = "batch", in_channels: int = 3, init: str = "by_activation",
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 **norm_kwargs: Any):
        check_norm_name(norm, "VGG")
        check_model_init(init, "VGG")
        check_positive_int("VGG", "num_classes", num_classes)
        check_positive_int("VGG", "in_channels", in_channels)
        layers: list[Any] = []
        features = in_channels
        for item in config:
            if item == "M":
                layers.append("M")
                continue
            check_positive_int("VGG", "config entry", item)
            layers.append(ConvNormAct(features, item, (3, 3), padding=((1, 1), (1, 1)),
                                      norm=norm, activation="relu", init=init, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs, **norm_kwargs))
            features = item
        self.in_channels = in_channels
        self.features = nnx.List(layers)
        self.head = head(features, num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input_channels("VGG", x, self.in_channels, 2)
        for layer in self.features:
            if isinstance(layer, str):
                x = max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = layer(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def vgg16(num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-16 (with BatchNorm by default) and one linear classifier."""
    return VGG(VGG16_CONFIG, num_classes, **kwargs)
