r"""BatchNorm folding for inference (seed 003).

An eval-mode BatchNorm after a layer ``z = x W + b`` computes
:math:`\gamma \odot (z - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`, which is the
layer with

.. math::

  s = \gamma / \sqrt{\sigma^2 + \epsilon}, \qquad
  W' = W \odot s, \qquad b' = (b - \mu) \odot s + \beta

(``s`` scales the output-channel axis, the last axis of Flax ``Conv``/``Linear``
kernels; ``b = 0`` when the layer has no bias). :func:`fold_batch_norms`
finds which ``nnx.Conv``/``nnx.Linear`` directly feeds which ``nnx.BatchNorm`` by
tracing one forward pass, rewrites those kernels and biases, and replaces the
BatchNorms by :class:`~sing_jax.nn.Identity`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax._src.paths import path_str
from sing_jax.nn.layers import Identity
from sing_jax.nn.norms import _resolve_parent, _set_child, module_paths

FOLDABLE_TYPES = (nnx.Conv, nnx.Linear)


@contextlib.contextmanager
def _record_producers(pairs: list[tuple[nnx.Module, nnx.Module]]) -> Iterator[None]:
    """Temporarily wraps Conv/Linear/BatchNorm ``__call__`` to see which output feeds which norm.

    A layer feeds a BatchNorm when the norm receives the very array object
    the layer returned (nothing computed in between).
    """
    produced: dict[int, tuple[Any, nnx.Module]] = {}
    originals = {cls: cls.__call__ for cls in (*FOLDABLE_TYPES, nnx.BatchNorm)}

    def wrap_layer(cls):
        original = originals[cls]

        def call(self, x, *args, **kwargs):
            y = original(self, x, *args, **kwargs)
            produced[id(y)] = (y, self)  # keep y alive so its id stays unique
            return y
        return call

    def bn_call(self, x, *args, **kwargs):
        entry = produced.get(id(x))
        if entry is not None and entry[0] is x:
            pairs.append((entry[1], self))
        return originals[nnx.BatchNorm](self, x, *args, **kwargs)

    try:
        for cls in FOLDABLE_TYPES:
            cls.__call__ = wrap_layer(cls)
        nnx.BatchNorm.__call__ = bn_call
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def fold_batch_norms(model: nnx.Module, sample_input: Any, *, strict: bool = True
                     ) -> nnx.Module:
    """An eval-mode copy of ``model``, each BatchNorm folded into the layer feeding it.

    The original model is not changed. The folded model's outputs equal the
    original's in eval mode (``model.eval()``) up to float rounding: in float32
    about ``1e-5`` relative to the output scale (the test uses ``rtol=atol=1e-4``).

    Args:
      model: an NNX model whose BatchNorms follow ``nnx.Conv``/``nnx.Linear``
        layers directly (the layer's output feeds only that norm: a layer
        output also used elsewhere would change there too).
      sample_input: an example input (array or ``jax.ShapeDtypeStruct``) for the
        tracing pass that finds the (layer, norm) pairs; only its shape is used.
      strict: raise when a BatchNorm is not directly fed by a Conv/Linear
        (``False``: leave such BatchNorms in place).

    Returns:
      The folded copy, in eval mode, with no folded BatchNorm left.

    Raises:
      ValueError: with ``strict``, a BatchNorm that cannot be folded (path named),
        or a layer whose output channels differ from the norm's features.
    """
    folded = nnx.clone(model)
    folded.eval()
    pairs: list[tuple[nnx.Module, nnx.Module]] = []
    spec = jax.ShapeDtypeStruct(jnp.shape(sample_input), jnp.result_type(sample_input))
    with _record_producers(pairs):
        jax.eval_shape(lambda x: folded(x), spec)
    layer_of_norm = {id(norm): layer for layer, norm in pairs}
    norms = module_paths(folded, nnx.BatchNorm)
    unfoldable = [path_str(p) for p, bn in norms if id(bn) not in layer_of_norm]
    if unfoldable and strict:
        raise ValueError(
            "fold_batch_norms: these BatchNorms are not fed directly by an nnx.Conv or "
            f"nnx.Linear, so they cannot be folded: {unfoldable} (pass strict=False to "
            "keep them)."
        )
    folded_once: set[int] = set()
    for path, bn in norms:
        layer = layer_of_norm.get(id(bn))
        if layer is None:
            continue
        if id(bn) not in folded_once:
            _fold_pair(layer, bn, path_str(path))
            folded_once.add(id(bn))
        _set_child(_resolve_parent(folded, path[:-1]), path[-1], Identity(bn.num_features))
    return folded


def _fold_pair(layer: nnx.Module, bn: nnx.BatchNorm, name: str) -> None:
    kernel = layer.kernel[...]
    if kernel.shape[-1] != bn.num_features:
        raise ValueError(
            f"fold_batch_norms: {name} normalises {bn.num_features} features but the "
            f"layer feeding it has {kernel.shape[-1]} output channels."
        )
    mean = bn.mean[...].astype(jnp.float32)
    var = bn.var[...].astype(jnp.float32)
    gamma = bn.scale[...].astype(jnp.float32) if bn.scale is not None else 1.0
    beta = bn.bias[...].astype(jnp.float32) if bn.bias is not None else 0.0
    scale = gamma / jnp.sqrt(var + bn.epsilon)
    old_bias = (layer.bias[...].astype(jnp.float32) if layer.bias is not None
                else jnp.zeros_like(mean))
    new_kernel = (kernel.astype(jnp.float32) * scale).astype(kernel.dtype)
    new_bias = ((old_bias - mean) * scale + beta).astype(kernel.dtype)
    layer.kernel[...] = new_kernel
    if layer.bias is not None:
        layer.bias[...] = new_bias
    else:
        layer.bias = nnx.Param(new_bias)
        layer.use_bias = True
