r"""Which Flax NNX layers SINGD preconditions, and how their kernels map to matrices.

A layer is a linear map :math:`s = W x (+ b)` applied at every position of its
input. SINGD sees its kernel as a matrix :math:`W^\top \in \mathbb{R}^{d_i \times
d_o}` (Flax layout): the kernel axes contracted with the input (``in_axes``, their
order gives the order of the :math:`d_i` input features) against the kernel axes that
appear in the output (``out_axes``, likewise :math:`d_o`). Every other axis of the
input is a position: the first one is the batch axis, the others are "sequence"
axes for ``kfac_approx`` and ``loss_average``.

================================  ==================================================
``nnx.Linear``                    ``in_axes=(0,)``, ``out_axes=(1,)``
``nnx.LinearGeneral``             ``in_features`` against ``out_features`` (any
                                  ``axis``; no ``batch_axis``)
``nnx.Einsum``                    an equation ``x,k->y`` whose kernel letters each
                                  appear in exactly one of ``x`` (input features) and
                                  ``y`` (output features), and whose other letters
                                  appear in both ``x`` and ``y`` (positions)
2-D ``nnx.Conv``                  ``in_axes=(2, 0, 1)`` (PyTorch's
                                  ``weight.flatten(1)`` order), ``out_axes=(3,)``
================================  ==================================================

Subclasses count as their base class. A layer built under ``nnx.vmap`` (a stack of
blocks for ``nnx.scan``) has leading *stacked* kernel axes (``num_stacked``): it gets
one pair of factors per stacked layer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax._src.paths import path_str

Array = jax.Array

SUPPORTED_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static description of one preconditioned layer (hashable; pytree aux data).

    ``kernel_shape`` is the whole kernel, stacked axes first; ``in_axes`` and
    ``out_axes`` index the kernel without its ``num_stacked`` stacked axes.
    ``module`` is the layer's class name. The convolution fields are set for
    ``kind == "conv"`` only; ``equation`` is an ``nnx.Einsum``'s, and ``axis`` an
    ``nnx.LinearGeneral``'s (or ``nnx.Linear``'s ``(-1,)``) input axes.
    """

    path: str
    kind: str  # "linear" or "conv"
    kernel_shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    has_bias: bool
    num_stacked: int = 0
    module: str = ""
    axis: tuple[int, ...] = ()
    equation: str = ""
    strides: tuple[int, ...] = ()
    padding: Any = ()  # "SAME", "VALID" or ((lo, hi), (lo, hi))
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[:self.num_stacked]

    @property
    def unstacked_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[self.num_stacked:]

    @property
    def dim_in(self) -> int:
        """:math:`d_i`, the number of input features (without the bias column)."""
        return math.prod(self.unstacked_shape[a] for a in self.in_axes)

    @property
    def dim_out(self) -> int:
        """:math:`d_o`, the number of output features."""
        return math.prod(self.unstacked_shape[a] for a in self.out_axes)

    def layout(self) -> tuple[Any, ...]:
        """What the optimizer state depends on: shapes, axes and bias."""
        return (self.kernel_shape, self.in_axes, self.out_axes, self.num_stacked,
                self.has_bias)


def layout_from_kernel(path: str, kernel_shape: tuple[int, ...], has_bias: bool
                       ) -> LayerInfo | None:
    """The layout of a kernel leaf by the shape convention used without
    :func:`singd_layers`: 2-D is an ``nnx.Linear``, 4-D a 2-D ``nnx.Conv``."""
    if len(kernel_shape) == 2:
        return LayerInfo(path, "linear", kernel_shape, (0,), (1,), has_bias, axis=(-1,))
    if len(kernel_shape) == 4:
        return LayerInfo(path, "conv", kernel_shape, (2, 0, 1), (3,), has_bias)
    return None


# -- kernels as matrices --------------------------------------------------------------
def vmap_stacked(fn: Callable, num_stacked: int) -> Callable:
    """``fn`` of one layer slice, mapped over ``num_stacked`` leading stacked axes."""
    for _ in range(num_stacked):
        fn = jax.vmap(fn)
    return fn


def kernel_matrix(kernel: Array, info: LayerInfo) -> Array:
    """Kernel -> ``stack + (d_i, d_o)`` with rows in the layer's input-feature order."""
    n = info.num_stacked
    order = (*range(n), *(n + a for a in info.in_axes), *(n + a for a in info.out_axes))
    return jnp.transpose(kernel, order).reshape(info.stack_shape + (info.dim_in, info.dim_out))


def kernel_from_matrix(mat: Array, info: LayerInfo) -> Array:
    """The inverse of :func:`kernel_matrix`."""
    n, unstacked = info.num_stacked, info.unstacked_shape
    axes = info.in_axes + info.out_axes
    permuted = mat.reshape(info.stack_shape + tuple(unstacked[a] for a in axes))
    order = (*range(n), *(n + a for a in axes))
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return jnp.transpose(permuted, inverse)


# -- describing modules ---------------------------------------------------------------
def _as_tuple(value: Any, n: int, what: str, path: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"layer {path!r}: {what}={value} must have {n} entries")
    return value


def _conv_padding(padding: Any, path: str) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(
            f"layer {path!r}: padding={padding!r} is not supported by SINGD's capture; "
            "expected 'SAME', 'VALID', an int or explicit (low, high) pairs"
        )
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pads = []
    for p in padding:
        if isinstance(p, int):
            pads.append((p, p))
        else:
            lo, hi = p
            pads.append((int(lo), int(hi)))
    if len(pads) == 1:
        pads = pads * 2
    if len(pads) != 2:
        raise ValueError(f"layer {path!r}: padding={padding!r} must describe 2 spatial dims")
    return tuple(pads)


def einsum_parts(equation: str, path: str) -> tuple[str, str, str]:
    """``(input, kernel, output)`` subscripts of an ``nnx.Einsum`` equation that is a
    linear map SINGD can precondition; a ValueError naming the layer otherwise."""
    eq = equation.replace(" ", "")

    def bad(why: str) -> ValueError:
        return ValueError(
            f"layer {path!r}: nnx.Einsum equation {equation!r} {why}; SINGD preconditions "
            "equations 'x,k->y' where each kernel letter appears in exactly one of x "
            "(an input feature) and y (an output feature) and every other letter of x "
            "appears in y (a position), e.g. 'btd,dhk->bthk'. Exclude the layer with "
            f"layer_overrides={{{path!r}: None}} to train it with `other`.")

    if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
        raise bad("is not of the form 'input,kernel->output'")
    lhs, out = eq.split("->")
    inp, ker = lhs.split(",")
    if "..." in ker:
        raise bad("has an ellipsis in the kernel")
    for subscripts in (inp.replace("...", ""), ker, out.replace("...", "")):
        if len(set(subscripts)) != len(subscripts):
            raise bad(f"repeats a letter in {subscripts!r}")
    shared = [c for c in ker if c in inp and c in out]
    if shared:
        raise bad(f"has kernel letters {shared} in both input and output (a batched kernel)")
    summed = [c for c in ker if c not in inp and c not in out]
    if summed:
        raise bad(f"sums over kernel letters {summed}")
    dropped = [c for c in inp.replace("...", "") if c not in ker and c not in out]
    if dropped:
        raise bad(f"sums over input letters {dropped}")
    foreign = [c for c in out.replace("...", "") if c not in ker and c not in inp]
    if foreign:
        raise bad(f"has output letters {foreign} in neither operand")
    if ("..." in inp) != ("..." in out):
        raise bad("has an ellipsis on one side only")
    return inp, ker, out


def _canonical_ndim(module: nnx.Module, path: str) -> int:
    if isinstance(module, nnx.Conv):
        return len(_as_tuple(module.kernel_size, len(module.kernel_size), "kernel_size", path)) + 2
    if isinstance(module, nnx.LinearGeneral):
        return len(module.in_features) + len(module.out_features)
    if isinstance(module, nnx.Einsum):
        return len(tuple(module.kernel_shape))
    return 2


def describe_layer(module: nnx.Module, path: str) -> LayerInfo:
    """The :class:`LayerInfo` of a supported layer; a ValueError naming the layer and
    what is not supported otherwise."""
    if not isinstance(module, SUPPORTED_LAYERS):
        raise TypeError(
            f"layer {path!r} of type {type(module).__name__} is not supported by SINGD")
    kernel_shape = tuple(module.kernel.shape)
    has_bias = getattr(module, "bias", None) is not None
    name = type(module).__name__
    canonical = _canonical_ndim(module, path)
    num_stacked = len(kernel_shape) - canonical
    if num_stacked < 0:
        raise ValueError(f"layer {path!r}: kernel shape {kernel_shape} has fewer axes than "
                         f"its {name} needs ({canonical})")
    common = dict(kernel_shape=kernel_shape, has_bias=has_bias, num_stacked=num_stacked,
                  module=name)
    if isinstance(module, nnx.Conv):
        if canonical != 4:
            raise ValueError(f"layer {path!r}: SINGD supports 2-D nnx.Conv only, got kernel "
                             f"shape {kernel_shape}")
        if _as_tuple(module.input_dilation, 2, "input_dilation", path) != (1, 1):
            raise ValueError(f"layer {path!r}: input_dilation != 1 is not supported by SINGD")
        if module.mask is not None:
            raise ValueError(f"layer {path!r}: masked convolutions are not supported by SINGD")
        return LayerInfo(
            path, "conv", in_axes=(2, 0, 1), out_axes=(3,),
            strides=_as_tuple(module.strides, 2, "strides", path),
            padding=_conv_padding(module.padding, path),
            dilation=_as_tuple(module.kernel_dilation, 2, "kernel_dilation", path),
            groups=int(module.feature_group_count), **common)
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(
                f"layer {path!r}: nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} "
                "has one kernel per batch index; SINGD does not precondition it (exclude "
                f"it with layer_overrides={{{path!r}: None}})")
        n_in, n_out = len(module.in_features), len(module.out_features)
        return LayerInfo(path, "linear", in_axes=tuple(range(n_in)),
                         out_axes=tuple(range(n_in, n_in + n_out)),
                         axis=tuple(int(a) for a in module.axis), **common)
    if isinstance(module, nnx.Einsum):
        inp, ker, out = einsum_parts(module.einsum_str, path)
        in_axes = tuple(ker.index(c) for c in ker if c in inp)
        out_axes = tuple(ker.index(c) for c in out if c in ker)
        if has_bias and math.prod(module.bias.shape) != math.prod(
                kernel_shape[num_stacked + a] for a in out_axes) * math.prod(
                kernel_shape[:num_stacked]):
            raise ValueError(f"layer {path!r}: nnx.Einsum bias of shape {module.bias.shape} "
                             "does not hold one number per output feature")
        return LayerInfo(path, "linear", in_axes=in_axes, out_axes=out_axes,
                         equation=module.einsum_str.replace(" ", ""), **common)
    return LayerInfo(path, "linear", in_axes=(0,), out_axes=(1,), axis=(-1,), **common)


def supported_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Path (``'a/0/b'``) -> module, for every module of a kind SINGD supports."""
    return {path_str(path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, SUPPORTED_LAYERS)}


def singd_layers(model: nnx.Module) -> dict[str, LayerInfo]:
    r"""The layers of an NNX model that :func:`~sing_jax.singd` can precondition.

    Pass the result as ``singd(..., layers=singd_layers(model))``: then every
    ``nnx.Linear``, ``nnx.LinearGeneral``, linear-map ``nnx.Einsum`` and 2-D
    ``nnx.Conv`` (subclasses included, stacked ones of ``nnx.vmap``/``nnx.scan``
    blocks too) gets Kronecker factors laid out from the module itself. Without it,
    :func:`~sing_jax.singd` goes by the kernel's shape alone: 2-D kernels are
    ``nnx.Linear``, 4-D ones 2-D ``nnx.Conv``.

    A layer of a supported kind that SINGD cannot precondition (a 1-D convolution,
    an einsum that is no plain linear map, ...) is left out with a warning saying
    why: its parameters go to the ``other`` optimizer.

    Returns:
      ``{layer path: LayerInfo}``, the layer path as in ``'blocks/0/attn/query'``.
    """
    layers = {}
    for path, module in supported_modules(model).items():
        try:
            layers[path] = describe_layer(module, path)
        except ValueError as err:
            warnings.warn(f"SINGD leaves out {err}; its parameters go to `other`",
                          stacklevel=2)
    return layers
