"""The normalisation family from one name, and swapping norms inside a built model.

``make_norm("batch" | "layer" | "rms" | "group" | "learnable_scaler" | "none", C)``
builds the module that normalises the last (feature) axis of size ``C``:

- ``"batch"``: :class:`BatchNorm`, an ``nnx.BatchNorm`` (statistics over every axis
  but the last; running averages with PyTorch's default momentum, 0.9 in Flax's
  convention) that can also update its running variance as PyTorch does
  (``unbiased_running_var=True``) and leave padded examples out of its statistics
  (:func:`batch_mask`).
- ``"layer"``: ``nnx.LayerNorm`` over the feature axis (per token / per pixel).
- ``"rms"``: ``nnx.RMSNorm`` over the feature axis.
- ``"group"``: ``nnx.GroupNorm`` (``num_groups`` defaults to ``gcd(32, C)``).
- ``"learnable_scaler"``: :class:`~sing_jax.nn.LearnableScaler` (``y = a x + b``).
- ``"none"``: :class:`~sing_jax.nn.Identity`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any, Union

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.layers import Identity, LearnableScaler

NORM_NAMES = ("batch", "layer", "rms", "group", "learnable_scaler", "none")

# The example mask of the batch being traced (see batch_mask); None: every example counts.
_BATCH_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "sing_jax_batch_mask", default=None)


@contextlib.contextmanager
def batch_mask(mask: jax.Array | None) -> Iterator[None]:
    """Inside the block, every :class:`BatchNorm` in training mode ignores masked examples.

    ``mask`` has the leading (batch) axes of the activations, ``1``/``True`` for a
    real example and ``0``/``False`` for padding (e.g. the padded last partial batch
    of an epoch). It is read while the model is traced, so enter the block inside
    the traced function that calls the model (the train step does).
    """
    token = _BATCH_MASK.set(mask)
    try:
        yield
    finally:
        _BATCH_MASK.reset(token)


class BatchNorm(nnx.BatchNorm):
    r"""``nnx.BatchNorm`` with masked cross-device statistics and PyTorch's running variance.

    In training mode, over the examples whose mask is set (all of them without a
    mask) on every device of ``axis_name``, with :math:`n` the number of values per
    feature:

    .. math::
      \mu = \frac{1}{n}\sum x, \qquad \sigma^2 = \frac{1}{n}\sum (x - \mu)^2, \qquad
      y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta \\
      \bar\mu \leftarrow m\,\bar\mu + (1 - m)\,\mu, \qquad
      \bar\sigma^2 \leftarrow m\,\bar\sigma^2 + (1 - m)\,\sigma^2\,
      \frac{n}{n - 1}\ \text{(only with unbiased_running_var)}

    ``unbiased_running_var=True`` is PyTorch's convention (``nn.BatchNorm2d``
    normalises with the biased variance but tracks the unbiased one); Flax tracks the
    biased one. The sums are ``psum``-ed over ``axis_name``, so a device holding
    fewer real examples (or none) weighs in by its count, unlike a mean of
    per-device means. The mask comes from ``mask=`` or the enclosing
    :func:`batch_mask`. Without a mask and with the Flax convention the layer is
    exactly ``nnx.BatchNorm``. The running statistics are float32, or ``param_dtype``
    when that is wider.
    """

    def __init__(self, num_features: int, *, unbiased_running_var: bool = False,
                 **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.unbiased_running_var = bool(unbiased_running_var)
        # Running statistics in float32 (as Flax's), or in param_dtype when it is wider
        # (a float64 model keeps float64 statistics, as PyTorch's .double()).
        stats_dtype = jnp.promote_types(kwargs.get("param_dtype", jnp.float32), jnp.float32)
        if stats_dtype != self.mean.dtype:
            self.mean = nnx.BatchStat(self.mean[...].astype(stats_dtype))
            self.var = nnx.BatchStat(self.var[...].astype(stats_dtype))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        if mask is None:
            mask = _BATCH_MASK.get()
        use_running = (self.use_running_average if use_running_average is None
                       else use_running_average)
        if use_running or (mask is None and not self.unbiased_running_var):
            return super().__call__(x, use_running_average)
        return self._normalize_with_batch_stats(x, mask)

    def _normalize_with_batch_stats(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        ndim = x.ndim
        axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
        feature_axes = tuple(sorted(a % ndim for a in axes))
        reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)
        stats_shape = [x.shape[a] if a in feature_axes else 1 for a in range(ndim)]
        # Statistics in at least float32 (float64 stays float64), as Flax's.
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = x.astype(stats_dtype)
        if mask is None:
            weights = None
            local_count = jnp.asarray(math.prod(x.shape[a] for a in reduction_axes),
                                      stats_dtype)
        else:
            mask = jnp.asarray(mask)
            if mask.shape != x.shape[:mask.ndim]:
                raise ValueError(
                    f"BatchNorm: mask of shape {mask.shape} does not match the leading "
                    f"axes of the input of shape {x.shape}; expected a mask of shape "
                    f"{x.shape[:max(mask.ndim, 1)]}.")
            weights = jnp.broadcast_to(
                mask.astype(stats_dtype).reshape(mask.shape + (1,) * (ndim - mask.ndim)),
                x.shape)
            local_count = jnp.sum(weights, axis=reduction_axes)

        def global_sum(*values):
            stacked = jnp.stack(jnp.broadcast_arrays(*values))
            if self.axis_name is not None:
                stacked = jax.lax.psum(stacked, self.axis_name,
                                       axis_index_groups=self.axis_index_groups)
            return tuple(stacked)

        def local_sum(values):
            if weights is not None:
                values = values * weights
            return jnp.sum(values, axis=reduction_axes)

        if self.use_fast_variance:
            count, total, total_sq = global_sum(local_count, local_sum(xs),
                                                local_sum(jnp.square(xs)))
            seen = jnp.maximum(count, 1.0)
            mean = total / seen
            var = jnp.maximum(total_sq / seen - jnp.square(mean), 0.0)
        else:
            count, total = global_sum(local_count, local_sum(xs))
            seen = jnp.maximum(count, 1.0)
            mean = total / seen
            (centred,) = global_sum(local_sum(jnp.square(xs - mean.reshape(stats_shape))))
            var = centred / seen
        tracked_var = var * (seen / jnp.maximum(seen - 1.0, 1.0)) \
            if self.unbiased_running_var else var
        momentum = self.momentum
        # Statistics over no example at all (a device holding only padding, when the
        # statistics are per device) leave the running averages as they were.
        any_seen = count > 0
        old_mean, old_var = self.mean[...], self.var[...]
        new_mean = momentum * old_mean + (1 - momentum) * mean.astype(old_mean.dtype)
        new_var = momentum * old_var + (1 - momentum) * tracked_var.astype(old_var.dtype)
        self.mean[...] = jax.lax.stop_gradient(jnp.where(any_seen, new_mean, old_mean))
        self.var[...] = jax.lax.stop_gradient(jnp.where(any_seen, new_var, old_var))
        multiplier = jax.lax.rsqrt(var + self.epsilon)
        out_args = [x]
        if self.scale is not None:
            scale = self.scale[...]
            out_args.append(scale)
            multiplier = multiplier * scale.astype(stats_dtype)
        y = (xs - mean.reshape(stats_shape)) * multiplier.reshape(stats_shape)
        if self.bias is not None:
            bias = self.bias[...]
            out_args.append(bias)
            y = y + bias.astype(stats_dtype).reshape(stats_shape)
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*out_args)
        return y.astype(out_dtype)


NORM_TYPES: dict[str, type] = {
    "batch": BatchNorm,
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
              scale_init: Any = "normal", use_running_average: bool = False,
              unbiased_running_var: bool = False) -> nnx.Module:
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
      unbiased_running_var: BatchNorm only: track the running variance with the
        unbiased batch variance (x n/(n-1)), PyTorch's convention (see :class:`BatchNorm`).

    Raises:
      ValueError: unknown ``norm`` name, ``num_groups`` not dividing ``num_features``,
        or ``unbiased_running_var`` for a norm other than BatchNorm.
    """
    check_norm_name(norm, "make_norm")
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(
            f"make_norm: num_features={num_features!r}; expected a positive int."
        )
    if unbiased_running_var and norm != "batch":
        raise ValueError(
            f"make_norm: unbiased_running_var=True is a BatchNorm option; norm={norm!r} "
            "keeps no running variance.")
    if callable(norm):
        return norm(num_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    eps = {} if epsilon is None else {"epsilon": epsilon}
    if norm == "batch":
        return BatchNorm(num_features, momentum=momentum,
                         use_running_average=use_running_average,
                         unbiased_running_var=unbiased_running_var, dtype=dtype,
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
