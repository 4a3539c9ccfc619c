"""Small Flax NNX layers: :class:`LearnableScaler` and :class:`Identity`."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
InitializerLike = Union[str, Initializer]

_NAMED_SCALE_INITS: dict[str, Initializer] = {
    "normal": nnx.initializers.normal(stddev=1.0),
    "ones": nnx.initializers.ones,
    "zeros": nnx.initializers.zeros,
}


def _resolve_init(init: InitializerLike, argument: str) -> Initializer:
    if isinstance(init, str):
        if init not in _NAMED_SCALE_INITS:
            raise ValueError(
                f"LearnableScaler: {argument}={init!r} is not a known initializer; "
                f"expected one of {sorted(_NAMED_SCALE_INITS)} or a callable "
                "(key, shape, dtype) -> array."
            )
        return _NAMED_SCALE_INITS[init]
    if not callable(init):
        raise TypeError(
            f"LearnableScaler: {argument} must be a name or a callable "
            f"(key, shape, dtype) -> array, got {init!r}."
        )
    return init


def check_features(module_name: str, x: jax.Array, num_features: int) -> None:
    """Raises a ValueError when the last axis of ``x`` is not ``num_features``."""
    if x.ndim == 0 or x.shape[-1] != num_features:
        raise ValueError(
            f"{module_name}: the input's last (feature) axis has size "
            f"{x.shape[-1] if x.ndim else 'n/a'} (input shape {x.shape}), expected "
            f"num_features={num_features}."
        )


class LearnableScaler(nnx.Module):
    r"""A per-feature affine map, the normalisation-free replacement of LayerNorm/BatchNorm.

    .. math::

      y = a \odot x + b

    with ``a, b`` of shape ``(num_features,)`` broadcast over the last (feature)
    axis: tokens ``(B, N, D)`` and images ``(B, H, W, C)`` alike (Flax layouts).
    There are no statistics, so training and evaluation behave identically.

    The reference initialisation is ``a ~ Normal(0, 1)`` (the PyTorch reference
    fills a ones tensor with ``normal_``, which overwrites it) and ``b = 0``;
    ``scale_init="ones"`` gives the identity map at initialisation.

    Args:
      num_features: size of the feature axis.
      scale_init: initializer of ``a``: ``"normal"`` (reference, default),
        ``"ones"``, ``"zeros"`` or a callable ``(key, shape, dtype) -> array``.
      bias_init: initializer of ``b`` (zeros by default).
      use_bias: whether to learn ``b``.
      dtype: computation dtype (``None``: promote the input and parameters).
      param_dtype: dtype of ``a`` and ``b``.
      rngs: the random streams (``params`` is used).

    Example::

      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> scaler = LearnableScaler(4, scale_init="ones", rngs=nnx.Rngs(0))
      >>> scaler(jnp.ones((2, 3, 4))).shape
      (2, 3, 4)
    """

    def __init__(self, num_features: int, *, scale_init: InitializerLike = "normal",
                 bias_init: InitializerLike = "zeros", use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(
                f"LearnableScaler: num_features={num_features!r}; expected a positive int."
            )
        self.num_features = num_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scale = nnx.Param(
            _resolve_init(scale_init, "scale_init")(rngs.params(), (num_features,),
                                                    param_dtype))
        if use_bias:
            self.bias = nnx.Param(
                _resolve_init(bias_init, "bias_init")(rngs.params(), (num_features,),
                                                      param_dtype))
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features("LearnableScaler", x, self.num_features)
        scale = self.scale[...]
        bias = self.bias[...] if self.bias is not None else None
        x, scale, bias = nnx.nn.dtypes.promote_dtype((x, scale, bias), dtype=self.dtype)
        y = x * scale
        if bias is not None:
            y = y + bias
        return y


class Identity(nnx.Module):
    """The identity map (``norm="none"`` and folded-away BatchNorms)."""

    def __init__(self, num_features: int | None = None):
        self.num_features = num_features

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def max_pool(x: jax.Array, window_shape: tuple[int, ...],
             strides: tuple[int, ...] | None = None, padding: Any = "VALID") -> jax.Array:
    """``flax.nnx.max_pool``, with a faster form for non-overlapping windows.

    ``x`` is ``(batch, *spatial, features)`` and ``window_shape`` has one entry per
    spatial axis. When ``strides`` equals ``window_shape`` (or is None) and
    ``padding="VALID"``, the spatial axes are cropped to a multiple of the window
    (what VALID drops anyway), split into (blocks, window) and maxed: the same
    values as ``nnx.max_pool``, and the same derivatives (each window's first
    maximum takes it, ties included; tested), computed as an elementwise mask for
    windows of up to 16 elements.
    Why: ``reduce_window``'s gradient is XLA's select-and-scatter, which on XLA:CPU
    made a small CNN's whole train step 1.3x (default flags) to 1.9x (Eigen
    convolutions) slower, and ``jnp.max``'s own rule counts tied maxima with a
    reduction (the mask makes the same CNN step about 20% faster again). Every
    other window goes to ``nnx.max_pool``.
    """
    window_shape = tuple(window_shape)
    strides = window_shape if strides is None else tuple(strides)
    if (strides != window_shape or padding != "VALID" or x.ndim != len(window_shape) + 2
            or math.prod(window_shape) > _MAX_FIRST_MAX_WINDOW):
        return nnx.max_pool(x, window_shape, strides=strides, padding=padding)
    spatial = x.shape[1:-1]
    blocks = [n // w for n, w in zip(spatial, window_shape)]
    x = x[(slice(None),) + tuple(slice(0, b * w) for b, w in zip(blocks, window_shape))]
    split = [x.shape[0]]
    for b, w in zip(blocks, window_shape):
        split += [b, w]
    x = x.reshape(split + [x.shape[-1]])
    return _window_max(x, tuple(2 + 2 * i for i in range(len(window_shape))))


# Windows up to this many elements get the elementwise first-maximum derivative (the
# expression that finds the first maximum grows with the window); larger ones go to
# nnx.max_pool.
_MAX_FIRST_MAX_WINDOW = 16


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, window_axes: tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, window_axes)`` whose derivative goes to the first maximum of each
    window (in row-major window order), like ``nnx.max_pool``'s select-and-scatter.

    Unlike ``jnp.max``'s own rule (which shares it among tied maxima and so needs a
    reduction to count them), the first-maximum mask is elementwise: the gradient is
    one fused pass over the input.
    """
    return jnp.max(x, axis=window_axes)


@_window_max.defjvp
def _window_max_jvp(window_axes, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = jnp.max(x, axis=window_axes)
    mask = _first_max_mask(x, jnp.expand_dims(y, window_axes), window_axes)
    return y, jnp.sum(jnp.where(mask, x_dot, jnp.zeros_like(x_dot)), axis=window_axes)


def _first_max_mask(x: jax.Array, y: jax.Array, window_axes: tuple[int, ...]) -> jax.Array:
    """True where ``x`` equals its window's maximum ``y`` (kept dims) and no earlier
    element of the window does."""
    is_max = x == y
    sizes = [x.shape[a] for a in window_axes]
    position = jnp.zeros((), jnp.int32)  # each element's row-major place in its window
    for axis, size in zip(window_axes, sizes, strict=True):
        position = position * size + jax.lax.broadcasted_iota(
            jnp.int32, [x.shape[a] if a == axis else 1 for a in range(x.ndim)], axis)
    seen = jnp.zeros(y.shape, bool)  # a maximum before the current window place
    max_before = jnp.zeros(x.shape, bool)
    for place, index in enumerate(itertools.product(*(range(n) for n in sizes))):
        max_before = jnp.where(position == place, seen, max_before)
        at = [slice(None)] * x.ndim
        for axis, i in zip(window_axes, index, strict=True):
            at[axis] = slice(i, i + 1)
        seen = seen | is_max[tuple(at)]
    return is_max & ~max_before
