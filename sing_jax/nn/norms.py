"""The normalisation family from one name, and swapping norms inside a built model.

``make_norm("batch" | "layer" | "rms" | "group" | "learnable_scaler" | "none", C)``
builds the module that normalises the last (feature) axis of size ``C``:

- ``"batch"``: ``nnx.BatchNorm`` (statistics over every axis but the last; running
  averages with PyTorch's default momentum, 0.9 in Flax's convention).
- ``"layer"``: ``nnx.LayerNorm`` over the feature axis (per token / per pixel).
- ``"rms"``: ``nnx.RMSNorm`` over the feature axis.
- ``"group"``: ``nnx.GroupNorm`` (``num_groups`` defaults to ``gcd(32, C)``).
- ``"learnable_scaler"``: :class:`~sing_jax.nn.LearnableScaler` (``y = a x + b``).
- ``"none"``: :class:`~sing_jax.nn.Identity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.layers import Identity, LearnableScaler

NORM_NAMES = ("batch", "layer", "rms", "group", "learnable_scaler", "none")
NORM_TYPES: dict[str, type] = {
    "batch": nnx.BatchNorm,
    "layer": nnx.LayerNorm,
    "rms": nnx.RMSNorm,
    "group": nnx.GroupNorm,
    "learnable_scaler": LearnableScaler,
    "none": Identity,
}

NormFactory = Callable[..., nnx.Module]
NormLike = Union[str, NormFactory]


def check_norm_name(norm: NormLike, owner: str = "norm") -> None:
    """Raises a ValueError naming ``owner`` when ``norm`` is neither a known name nor callable."""
    if isinstance(norm, str):
        if norm not in NORM_NAMES:
            raise ValueError(
                f"{owner}: norm={norm!r} is not a known normalisation; allowed values: "
                f"{NORM_NAMES} (or a callable (num_features, *, rngs, dtype, param_dtype) "
                "-> Module)."
            )
    elif not callable(norm):
        raise TypeError(
            f"{owner}: norm must be one of {NORM_NAMES} or a callable, got {norm!r}."
        )


def make_norm(norm: NormLike, num_features: int, *, rngs: nnx.Rngs, dtype: Any = None,
              param_dtype: Any = jnp.float32, epsilon: float | None = None,
              momentum: float = 0.9, num_groups: int | None = None,
              scale_init: Any = "normal", use_running_average: bool = False
              ) -> nnx.Module:
    """Builds the normalisation layer named ``norm`` for ``num_features`` channels.

    Args:
      norm: one of :data:`NORM_NAMES`, or a callable
        ``(num_features, *, rngs, dtype, param_dtype) -> Module``.
      num_features: size of the normalised (last) axis.
      rngs: random streams (``params``).
      dtype, param_dtype: computation and parameter dtypes.
      epsilon: the norm's epsilon; ``None`` keeps each layer's default
        (1e-5 for BatchNorm, 1e-6 for the others, as in Flax).
      momentum: BatchNorm running-average momentum (Flax convention:
        ``new = momentum * old + (1 - momentum) * batch``).
      num_groups: GroupNorm groups; must divide ``num_features``; default
        ``gcd(32, num_features)``.
      scale_init: LearnableScaler's ``a`` initializer (``"normal"`` is the reference).
      use_running_average: initial BatchNorm mode (``model.train()`` /
        ``model.eval()`` switch it).

    Raises:
      ValueError: unknown ``norm`` name, or ``num_groups`` not dividing ``num_features``.
    """
    check_norm_name(norm, "make_norm")
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(
            f"make_norm: num_features={num_features!r}; expected a positive int."
        )
    if callable(norm):
        return norm(num_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    eps = {} if epsilon is None else {"epsilon": epsilon}
    if norm == "batch":
        return nnx.BatchNorm(num_features, momentum=momentum,
                             use_running_average=use_running_average, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs, **eps)
    if norm == "layer":
        return nnx.LayerNorm(num_features, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs, **eps)
    if norm == "rms":
        return nnx.RMSNorm(num_features, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs, **eps)
    if norm == "group":
        groups = math.gcd(32, num_features) if num_groups is None else num_groups
        if groups <= 0 or num_features % groups:
            raise ValueError(
                f"make_norm: num_groups={groups} does not divide num_features="
                f"{num_features}; pick a divisor of {num_features}."
            )
        return nnx.GroupNorm(num_features, num_groups=groups, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs, **eps)
    if norm == "learnable_scaler":
        return LearnableScaler(num_features, scale_init=scale_init, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    return Identity(num_features)


def _resolve_parent(root: Any, path: tuple) -> Any:
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, str(key))
    return node


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, nnx.List) or isinstance(key, int):
        parent[int(key)] = value
    elif isinstance(parent, (dict, nnx.Dict)):
        parent[key] = value
    else:
        setattr(parent, str(key), value)


def module_paths(model: nnx.Module, module_type: type | tuple[type, ...]
                 ) -> list[tuple[tuple, nnx.Module]]:
    """Every ``(path, module)`` of ``model`` (the root excluded) that is a ``module_type``."""
    return [(path, module) for path, module in nnx.iter_modules(model)
            if path and isinstance(module, module_type)]


def replace_norms(model: nnx.Module, old_type: type | tuple[type, ...],
                  new_factory: Callable[[nnx.Module], nnx.Module] | str, *,
                  rngs: nnx.Rngs | None = None, **norm_kwargs: Any) -> int:
    """Replaces, in place, every ``old_type`` submodule of ``model`` by ``new_factory(old)``.

    Every other module and weight is left untouched (the reference's
    ``replace_layers``). A module shared at several paths is replaced once and
    the new module is shared at the same paths.

    Args:
      model: the NNX model, changed in place.
      old_type: the class (or tuple of classes) to replace, e.g. ``nnx.LayerNorm``.
      new_factory: ``old_module -> new_module``, or a norm name of
        :func:`make_norm` (then ``rngs`` is required and the feature count is
        read from ``old.num_features``).
      rngs: random streams for a named ``new_factory``.
      **norm_kwargs: extra arguments of :func:`make_norm` for a named factory.

    Returns:
      The number of modules replaced.

    Raises:
      ValueError: ``new_factory`` returns a module whose ``num_features``
        differs from the old one's, or an unknown norm name.
    """
    if isinstance(new_factory, str):
        name = new_factory
        check_norm_name(name, "replace_norms")
        if rngs is None:
            raise ValueError(
                f"replace_norms: new_factory={name!r} is a norm name, so rngs= is required."
            )

        def new_factory(old: nnx.Module) -> nnx.Module:
            kwargs = {"dtype": getattr(old, "dtype", None),
                      "param_dtype": getattr(old, "param_dtype", jnp.float32)}
            kwargs.update(norm_kwargs)
            return make_norm(name, old.num_features, rngs=rngs, **kwargs)
    elif not callable(new_factory):
        raise TypeError(
            f"replace_norms: new_factory must be a callable old_module -> new_module or "
            f"one of {NORM_NAMES}, got {new_factory!r}."
        )
    found = module_paths(model, old_type)
    replacements: dict[int, nnx.Module] = {}
    for path, old in found:
        if id(old) not in replacements:
            new = new_factory(old)
            if not isinstance(new, nnx.Module):
                raise TypeError(
                    f"replace_norms: new_factory returned {type(new).__name__} for "
                    f"{'/'.join(map(str, path))}; expected an nnx.Module."
                )
            old_features = getattr(old, "num_features", None)
            new_features = getattr(new, "num_features", None)
            if None not in (old_features, new_features) and old_features != new_features:
                raise ValueError(
                    f"replace_norms: at {'/'.join(map(str, path))} the new "
                    f"{type(new).__name__} has num_features={new_features}, but the "
                    f"{type(old).__name__} it replaces has {old_features}."
                )
            replacements[id(old)] = new
    # parents are set after all paths are collected, so traversal is not disturbed
    for path, old in found:
        _set_child(_resolve_parent(model, path[:-1]), path[-1], replacements[id(old)])
    return len(replacements)
