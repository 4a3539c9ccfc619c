"""Names a config can use for models and datasets, and how each is built."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from flax import nnx

# Datasets of sing_jax.data (TFDS data_source + grain); 'svhn' is an alias.
DATASET_ALIASES = {"svhn": "svhn_cropped", "imagenet": "imagenet2012"}


def dataset_names() -> list[str]:
    from sing_jax.data import DATASETS

    return sorted(set(DATASETS) | set(DATASET_ALIASES))


def resolve_dataset(name: str) -> str:
    """The sing_jax.data name of ``name``; a ValueError lists the valid names."""
    from sing_jax.data import DATASETS

    name = DATASET_ALIASES.get(name, name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {dataset_names()}")
    return name


def _models() -> dict[str, Callable[..., nnx.Module]]:
    from sing_jax.nn import models

    def mlp(num_classes, input_shape, **kw):
        return models.MLP(in_features=math.prod(input_shape), num_classes=num_classes, **kw)

    def small_cnn(num_classes, input_shape, **kw):
        return models.SmallCNN(num_classes, in_channels=input_shape[-1], **kw)

    def cnn1d(num_classes, input_shape, **kw):
        return models.CNN1D(num_classes, length=input_shape[0], in_channels=input_shape[-1],
                            **kw)

    def resnet20(num_classes, input_shape, **kw):
        return models.resnet20(num_classes, in_channels=input_shape[-1], **kw)

    def resnet18(num_classes, input_shape, **kw):
        return models.resnet18(num_classes, in_channels=input_shape[-1], **kw)

    def vgg16(num_classes, input_shape, **kw):
        return models.vgg16(num_classes, in_channels=input_shape[-1], **kw)

    def vit(num_classes, input_shape, **kw):
        return models.ViT(num_classes, image_size=input_shape[0], in_channels=input_shape[-1],
                          **kw)

    wrapped = {"mlp": (mlp, models.MLP), "small_cnn": (small_cnn, models.SmallCNN),
               "cnn1d": (cnn1d, models.CNN1D), "resnet20": (resnet20, models.CifarResNet),
               "resnet18": (resnet18, models.ResNet18), "vgg16": (vgg16, models.VGG),
               "vit": (vit, models.ViT)}
    return wrapped


# Keyword arguments a model forwards to its norm factory (sing_jax.nn.make_norm).
NORM_KEYS = ("epsilon", "momentum", "use_bias", "use_scale", "use_running_average",
             "unbiased_running_var")

_EXTRA_MODELS: dict[str, tuple[Callable[..., nnx.Module], Callable[..., Any]]] = {}


def register_model(name: str, builder: Callable[..., nnx.Module],
                   signature_of: Callable[..., Any] | None = None) -> None:
    """Adds ``builder(num_classes, input_shape, rngs=..., **kwargs)`` under ``name``.

    ``signature_of`` (default ``builder``) is the callable whose keyword arguments
    a config's ``model`` section may set.
    """
    _EXTRA_MODELS[name] = (builder, signature_of or builder)


def model_names() -> list[str]:
    return sorted(set(_models()) | set(_EXTRA_MODELS))


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...],
                kwargs: dict[str, Any], seed: int) -> nnx.Module:
    """The model ``name`` with ``kwargs``; unknown names and keyword arguments are errors."""
    table = {**_models(), **_EXTRA_MODELS}
    if name not in table:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(table)}")
    builder, signature_of = table[name]
    # The valid keys are the constructor's keyword arguments (config.model is not a
    # locked ConfigDict: its keys depend on the model, and a list of them would repeat these).
    target = signature_of.__init__ if inspect.isclass(signature_of) else signature_of
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    fixed = {"num_classes", "input_shape", "rngs", "self", "in_features", "in_channels",
             "length", "image_size"}
    allowed = sorted(n for n, p in params.items() if n not in fixed
                     and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    unknown = sorted(k for k in kwargs if k not in allowed)
    # Models that forward **norm_kwargs still reject a misspelt key here: only norm options
    # (eps/momentum-like names) may pass through; anything else must be a named argument.
    if unknown and not (takes_any and all(k in NORM_KEYS for k in unknown)):
        raise ValueError(f"config.model: {name} takes no key(s) {unknown}; its keys are "
                         f"{allowed}")
    return builder(num_classes, tuple(input_shape), rngs=nnx.Rngs(seed), **kwargs)
