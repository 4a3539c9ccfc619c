"""ResNets: the CIFAR ResNet-20 family (He et al. 2016, §4.2) and ResNet-18.

ResNet-18 comes with the CIFAR stem (3x3, no max-pool) and the ImageNet stem.

Channel-last (NHWC) inputs; every model takes ``norm=`` (see
:func:`sing_jax.nn.make_norm`). Convolutions that feed a norm have no bias.
Parameter counts for 10 classes with BatchNorm: ResNet-20 269,722 (0.27M) with
the paper's zero-padded shortcuts (``shortcut="pad"``, option A) and 272,474 with
1x1 conv + norm projections (``shortcut="projection"``, option B, the seed 001
reference's block); ResNet-18 CIFAR 11,173,962 (11.17M); ResNet-18 ImageNet with 1000
classes 11,689,512 (11.69M), as in torchvision.

``init="pytorch_default"`` starts every conv and the classifier as PyTorch's
``nn.Conv2d``/``nn.Linear`` do (see :mod:`sing_jax.nn.init`); the default,
``"by_activation"``, uses He-normal kernels before ReLU and Glorot for the rest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.init import check_model_init
from sing_jax.nn.models._common import (
    ConvNormAct,
    check_input_channels,
    check_positive_int,
    head,
)
from sing_jax.nn.norms import NormLike, check_norm_name

_PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1 (SAME would pad stride-2 convs asymmetrically)


class BasicBlock(nnx.Module):
    """Two 3x3 conv-norm layers and a residual: ``relu(norm2(conv2(relu(norm1(conv1 x)))) + s(x))``.

    The shortcut ``s`` is the identity when shapes agree; otherwise ``"projection"``
    (1x1 conv + norm, ResNet-18 / option B) or ``"pad"`` (option A of the CIFAR
    ResNets: subsample by 2 and zero-pad the new channels, no parameters).
    """

    def __init__(self, in_features: int, out_features: int, stride: int, *,
                 norm: NormLike, shortcut: str, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs, init: str = "by_activation", **norm_kwargs: Any):
        common = dict(norm=norm, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      **norm_kwargs)
        self.conv_norm1 = ConvNormAct(in_features, out_features, (3, 3), strides=stride,
                                      padding=_PAD1, activation="relu", **common)
        # the residual branch's last conv is followed by the add, then the ReLU
        self.conv_norm2 = ConvNormAct(out_features, out_features, (3, 3), padding=_PAD1,
                                      activation=None, **common)
        self.stride = stride
        self.in_features = in_features
        self.out_features = out_features
        needs_shortcut = stride != 1 or in_features != out_features
        self.shortcut_kind = shortcut if needs_shortcut else "identity"
        if self.shortcut_kind == "projection":
            self.shortcut = ConvNormAct(in_features, out_features, (1, 1), strides=stride,
                                        padding="VALID", activation=None, **common)
        else:
            self.shortcut = nnx.data(None)

    def _shortcut(self, x: jax.Array) -> jax.Array:
        if self.shortcut_kind == "identity":
            return x
        if self.shortcut_kind == "projection":
            return self.shortcut(x)
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.out_features - self.in_features
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv_norm2(self.conv_norm1(x))
        return jax.nn.relu(y + self._shortcut(x))


def _make_stage(in_features: int, out_features: int, num_blocks: int, stride: int,
                **kwargs: Any) -> nnx.List:
    blocks = [BasicBlock(in_features, out_features, stride, **kwargs)]
    blocks += [BasicBlock(out_features, out_features, 1, **kwargs)
               for _ in range(num_blocks - 1)]
    return nnx.List(blocks)


class CifarResNet(nnx.Module):
    """The CIFAR ResNet of depth ``6n + 2`` (ResNet-20, -32, -44, -56, -110).

    3x3 stem with 16 channels, three stages of ``n`` basic blocks with 16, 32, 64
    channels (stride 2 at the start of stages 2 and 3), global average pooling,
    one linear classifier. ``shortcut="pad"`` is the paper's option A (269,722
    parameters for ResNet-20); ``"projection"`` uses 1x1 conv (stride s, no bias) +
    norm wherever the stride or the width changes (option B: 272,474 parameters, the
    block of the seed 001 reference).

    Args:
      depth: ``6n + 2``.
      num_classes: classifier outputs.
      norm: a :func:`~sing_jax.nn.make_norm` name or factory.
      shortcut: ``"pad"`` or ``"projection"``.
      in_channels: input channels (3 for CIFAR).
      width: channels of the first stage (16).
      init: ``"by_activation"`` or ``"pytorch_default"`` (:data:`sing_jax.nn.init.MODEL_INITS`).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: random streams.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, *, norm: NormLike = "batch",
                 shortcut: str = "pad", in_channels: int = 3, width: int = 16,
                 init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, "CifarResNet")
        check_model_init(init, "CifarResNet")
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CifarResNet: depth={depth!r}; expected 6n + 2 with n >= 1 "
                "(20, 32, 44, 56, 110, ...)."
            )
        if shortcut not in ("pad", "projection"):
            raise ValueError(
                f"CifarResNet: shortcut={shortcut!r}; allowed values: ('pad', 'projection')."
            )
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("width", width)):
            check_positive_int("CifarResNet", name, value)
        n = (depth - 2) // 6
        common = dict(norm=norm, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      **norm_kwargs)
        self.in_channels = in_channels
        self.stem = ConvNormAct(in_channels, width, (3, 3), padding=_PAD1,
                                activation="relu", **common)
        widths = (width, 2 * width, 4 * width)
        self.stages = nnx.List([
            _make_stage(widths[max(i - 1, 0)], w, n, 1 if i == 0 else 2,
                        shortcut=shortcut, **common)
            for i, w in enumerate(widths)])
        self.head = head(widths[-1], num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input_channels("CifarResNet", x, self.in_channels, 2)
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def resnet20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters for 10 classes with BatchNorm; pass
    ``shortcut="projection"`` for the seed 001 reference's block, 272,474)."""
    return CifarResNet(20, num_classes, **kwargs)


class ResNet18(nnx.Module):
    """ResNet-18: four stages of two basic blocks (64, 128, 256, 512 channels).

    ``variant="cifar"``: 3x3 stride-1 stem and no max-pool (11.17M parameters for
    10 classes); ``variant="imagenet"``: 7x7 stride-2 stem and a 3x3 stride-2
    max-pool (11.69M for 1000 classes). Shortcuts that change shape are 1x1
    conv + norm projections. ``width`` (64) is the first stage's channel count;
    the stages have ``width * (1, 2, 4, 8)``. ``init``: ``"by_activation"`` or
    ``"pytorch_default"``.
    """

    def __init__(self, num_classes: int = 10, *, variant: str = "cifar",
                 norm: NormLike = "batch", in_channels: int = 3, width: int = 64,
                 init: str = "by_activation", dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **norm_kwargs: Any):
        check_norm_name(norm, "ResNet18")
        check_model_init(init, "ResNet18")
        if variant not in ("cifar", "imagenet"):
            raise ValueError(
                f"ResNet18: variant={variant!r}; allowed values: ('cifar', 'imagenet')."
            )
        check_positive_int("ResNet18", "num_classes", num_classes)
        check_positive_int("ResNet18", "in_channels", in_channels)
        check_positive_int("ResNet18", "width", width)
        common = dict(norm=norm, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      **norm_kwargs)
        self.in_channels = in_channels
        self.variant = variant
        if variant == "cifar":
            self.stem = ConvNormAct(in_channels, width, (3, 3), padding=_PAD1,
                                    activation="relu", **common)
        else:
            self.stem = ConvNormAct(in_channels, width, (7, 7), strides=2,
                                    padding=((3, 3), (3, 3)), activation="relu", **common)
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.stages = nnx.List([
            _make_stage(widths[max(i - 1, 0)], w, 2, 1 if i == 0 else 2,
                        shortcut="projection", **common)
            for i, w in enumerate(widths)])
        self.head = head(widths[-1], num_classes, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input_channels("ResNet18", x, self.in_channels, 2)
        x = self.stem(x)
        if self.variant == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def resnet18(num_classes: int = 10, **kwargs: Any) -> ResNet18:
    """ResNet-18 (``variant="cifar"`` by default; pass ``variant="imagenet"``)."""
    return ResNet18(num_classes, **kwargs)
