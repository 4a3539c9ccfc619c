r"""Layer statistics for SINGD from one forward and one backward pass of an NNX model.

For every ``nnx.Linear`` and 2-D ``nnx.Conv`` the capture records the layer input
:math:`x` and the gradient of the loss w.r.t. the layer output :math:`\partial\ell/\partial
s`, without modifying the model: during the traced forward pass the layers' ``__call__``
is wrapped so that each output gets a zero "perturbation" :math:`s + \epsilon`, and the
gradient w.r.t. :math:`\epsilon` is the output gradient. The processed matrices are

.. math::

   A = \frac{1}{\sqrt{r}}\,[\,\tilde x \mid 1\,] \in \mathbb{R}^{r \times d_K},\qquad
   G = \sqrt{c}\;\widetilde{\partial\ell/\partial s} \in \mathbb{R}^{r' \times d_C},

where :math:`\tilde x` are the rows of the (unfolded, for conv) input (KFAC-expand:
every position is a row; KFAC-reduce: averaged over shared positions), the column of
ones is present when the layer has a bias, and :math:`c` is the number of loss terms
the loss averages over (``"batch"``: :math:`B`; ``"batch+sequence"``: :math:`B S`;
``None``: 1). Conv patches are what ``jax.lax.conv_general_dilated_patches`` returns
(gathered here with strided slices, fast inside ``lax.cond`` on CPU), with the
feature order (input channel, kernel row, kernel column), i.e. PyTorch's
``weight.flatten(1)``, matching the kernel reshaped to :math:`(C_{out}, C_{in}/g\,
k_H k_W)`; grouped convolutions average the input channels over groups.
Statistics that are sums over the rows of :math:`A` (Gram matrices and their
blocks) can be taken over a few images at a time, :func:`input_gram_statistic`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

SUPPORTED_LOSS_AVERAGE = (None, "batch", "batch+sequence")
SUPPORTED_KFAC_APPROX = ("expand", "reduce")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static description of a captured layer (hashable; pytree aux data)."""

    path: str
    kind: str  # "linear" or "conv"
    has_bias: bool
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    padding: Any = ()  # "SAME", "VALID" or ((lo, hi), (lo, hi))
    dilation: tuple[int, ...] = ()
    groups: int = 1


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LayerCapture:
    """The raw statistics of one layer: its input and the gradient w.r.t. its output.

    ``axis_name``: the mapped axis (``shard_map``/``pmap``) these per-device captures
    were taken under; the curvature built from them is averaged over it.
    """

    inputs: Array
    output_grads: Array
    info: LayerInfo
    axis_name: str | None = None

    def tree_flatten(self):
        return (self.inputs, self.output_grads), (self.info, self.axis_name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        info, axis_name = aux
        return cls(children[0], children[1], info, axis_name)


def path_to_str(path: Sequence[Any]) -> str:
    """``('layers', 0, 'kernel')`` or a jax key path -> ``'layers/0/kernel'``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            key = key.key
        elif isinstance(key, jax.tree_util.SequenceKey):
            key = key.idx
        elif isinstance(key, jax.tree_util.GetAttrKey):
            key = key.name
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            key = key.key
        parts.append(str(key))
    return "/".join(parts)


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


def layer_info(module: nnx.Module, path: str) -> LayerInfo:
    """The static description of a supported layer; a clear error otherwise."""
    if isinstance(module, nnx.Linear):
        return LayerInfo(path, "linear", module.bias is not None,
                         tuple(module.kernel.shape))
    if isinstance(module, nnx.Conv):
        kshape = tuple(module.kernel.shape)
        if len(kshape) != 4:
            raise ValueError(
                f"layer {path!r}: SINGD supports 2-D nnx.Conv only, got kernel shape {kshape}"
            )
        if _as_tuple(module.input_dilation, 2, "input_dilation", path) != (1, 1):
            raise ValueError(f"layer {path!r}: input_dilation != 1 is not supported by SINGD")
        if module.mask is not None:
            raise ValueError(f"layer {path!r}: masked convolutions are not supported by SINGD")
        return LayerInfo(
            path,
            "conv",
            module.bias is not None,
            kshape,
            strides=_as_tuple(module.strides, 2, "strides", path),
            padding=_conv_padding(module.padding, path),
            dilation=_as_tuple(module.kernel_dilation, 2, "kernel_dilation", path),
            groups=int(module.feature_group_count),
        )
    raise TypeError(f"layer {path!r} of type {type(module).__name__} is not supported by SINGD")


# -- processing into A and G -------------------------------------------------------------
def _check_options(kfac_approx: str, loss_average: str | None) -> None:
    if kfac_approx not in SUPPORTED_KFAC_APPROX:
        raise ValueError(f"kfac_approx={kfac_approx!r}; expected one of {SUPPORTED_KFAC_APPROX}")
    if loss_average not in SUPPORTED_LOSS_AVERAGE:
        raise ValueError(
            f"loss_average={loss_average!r}; expected one of {SUPPORTED_LOSS_AVERAGE}"
        )


def _explicit_padding(info: LayerInfo, in_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    if not isinstance(info.padding, str):
        return info.padding
    kh, kw = info.kernel_shape[:2]
    dilated = [(k - 1) * d + 1 for k, d in zip((kh, kw), info.dilation, strict=True)]
    return tuple(jax.lax.padtype_to_pads(in_hw, dilated, info.strides, info.padding))


def _conv_input(x: Array, info: LayerInfo) -> Array:
    """The conv input as ``(B, H, W, C_in/groups)``: leading axes flattened, groups averaged."""
    if x.ndim < 4:
        raise ValueError(f"layer {info.path!r}: conv input must be (..., H, W, C), got {x.shape}")
    x = x.reshape((-1,) + x.shape[-3:])
    if info.groups > 1:
        x = x.reshape(x.shape[:3] + (info.groups, info.kernel_shape[2])).mean(axis=3)
    return x


def _conv_taps(x: Array, info: LayerInfo) -> list[Array]:
    """One ``(B, O1, O2, C)`` strided slice of the padded ``(B, H, W, C)`` input per tap.

    Taps are in (kernel row, kernel column) order.
    """
    kh, kw = info.kernel_shape[:2]
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(info, x.shape[1:3])
    x = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
    (sh, sw), (dh, dw) = info.strides, info.dilation
    out_h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    return [jax.lax.slice(
                x, (0, i * dh, j * dw, 0),
                (x.shape[0], i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1,
                 x.shape[3]),
                (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv_patches(x: Array, info: LayerInfo) -> Array:
    """Unfolded conv input, ``(B, O1, O2, C_in/groups * kH * kW)``, groups averaged.

    The feature order is (input channel, kernel row, kernel column), the same as
    ``jax.lax.conv_general_dilated_patches`` and PyTorch's ``weight.flatten(1)``; the
    patches are gathered with strided slices (no convolution), which stays fast on CPU
    inside ``lax.cond``.
    """
    return _patches(_conv_input(x, info), info)


def _patches(x: Array, info: LayerInfo) -> Array:
    """:func:`conv_patches` of an input already in :func:`_conv_input`'s form."""
    patches = jnp.stack(_conv_taps(x, info), axis=-1)  # (B, O1, O2, C, kh*kw)
    return patches.reshape(patches.shape[:3] + (-1,))


def _in_dtype(x: Array, dtype: Any) -> Array:
    return x if dtype is None else x.astype(dtype)


def input_matrix(capture: LayerCapture, kfac_approx: str = "expand",
                 dtype: Any = None) -> Array:
    r"""The matrix :math:`A` (rows x :math:`d_K`) of a layer, scaled by :math:`1/\sqrt{r}`."""
    info, x = capture.info, _in_dtype(capture.inputs, dtype)
    if info.kind == "conv":
        x = conv_patches(x, info)  # (B, O1, O2, d_i)
    d_in = x.shape[-1]
    if kfac_approx == "expand":
        rows = x.reshape(-1, d_in)
    else:
        rows = x.reshape(x.shape[0], -1, d_in).mean(axis=1)
    rows = _with_bias_column(rows, info)
    return rows / jnp.sqrt(jnp.asarray(rows.shape[0], rows.dtype))


def _with_bias_column(rows: Array, info: LayerInfo) -> Array:
    if not info.has_bias:
        return rows
    return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(k for k in range(1, min(n, max(bound, 1)) + 1) if n % k == 0)


def _gram_halves(first: Array, second: Array) -> Array:
    r""":math:`[F\,S]^\top [F\,S]` from three of its four blocks (it is symmetric)."""
    if first.shape[1] == 0:
        return second.T @ second
    cross = first.T @ second
    return jnp.block([[first.T @ first, cross], [cross.T, second.T @ second]])


def _sum_over_batch_chunks(chunk_sum: Callable[[Array], Any], x: Array,
                           per_image_bytes: int, max_chunk_bytes: int | None) -> Any:
    """``chunk_sum(x)`` for a ``chunk_sum`` additive over the batch (first) axis, summed
    over a ``lax.scan`` of batch chunks of at most ``max_chunk_bytes`` of work each
    (``None``: one chunk)."""
    batch = x.shape[0]
    images = batch if max_chunk_bytes is None else _largest_divisor_at_most(
        batch, max_chunk_bytes // max(per_image_bytes, 1))
    if images == batch:
        return chunk_sum(x)
    chunks = x.reshape((batch // images, images) + x.shape[1:])
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(chunk_sum, chunks[0]))

    def add_chunk(acc, xc):
        return jax.tree.map(jnp.add, acc, chunk_sum(xc)), None

    return jax.lax.scan(add_chunk, total, chunks)[0]


def input_gram_statistic(capture: LayerCapture, kfac_approx: str, dtype: Any,
                         statistic: Callable[[Array], Any] | None = None,
                         max_chunk_bytes: int | None = None) -> Any:
    r"""``statistic(A)`` for a statistic that is a sum over the rows of :math:`A`
    (``None``: the Gram matrix :math:`A^\top A`), without holding all of :math:`A`.

    For KFAC-expand convolutions :math:`A` has one row per output position, many
    times the size of the input. With ``max_chunk_bytes`` the patches are unfolded
    and summed a few images at a time (a ``lax.scan`` over chunks of the batch that
    are each at most that size, when the batch divides into such chunks): the sum is
    the same, but each chunk stays in cache instead of the whole patch matrix
    going through memory (on CPU about 2x faster for a CIFAR-size CNN). ``None``
    unfolds everything at once, as :func:`input_matrix` does.

    The Gram matrix of a stride-1 convolution is not unfolded at all: see
    :func:`conv_gram_by_offsets`. For other strides it is taken from three of its
    four blocks (it is symmetric) of patches unfolded tap by tap, which is cheaper to
    gather, and put into the (channel, tap) feature order at the end.
    """
    info = capture.info
    gram_only = statistic is None
    if gram_only:
        statistic = _gram_halves_of_rows
    if info.kind != "conv" or kfac_approx != "expand":
        return statistic(input_matrix(capture, kfac_approx, dtype))
    x = _conv_input(_in_dtype(capture.inputs, dtype), info)
    if gram_only and _gram_by_offsets(info):
        return conv_gram_by_offsets(x, info, max_chunk_bytes)
    if max_chunk_bytes is None:
        return statistic(input_matrix(capture, kfac_approx, dtype))
    one_image = jax.eval_shape(lambda: _patches(x[:1], info))
    num_rows = x.shape[0] * math.prod(one_image.shape[1:3])
    per_image_bytes = math.prod(one_image.shape) * one_image.dtype.itemsize
    scale = 1.0 / math.sqrt(num_rows)  # input_matrix's 1/sqrt(r), r = all rows

    def chunk_statistic(xc):
        if not gram_only:
            patches = _patches(xc, info)
            rows = _with_bias_column(patches.reshape(-1, patches.shape[-1]), info)
            return statistic(rows * jnp.asarray(scale, rows.dtype))
        taps = _conv_taps(xc, info)  # tap-major columns: (tap, channel)
        half = len(taps) // 2

        def columns(group):
            if not group:
                return jnp.zeros((math.prod(taps[0].shape[:3]), 0), xc.dtype)
            stacked = jnp.stack(group, axis=-2)
            return stacked.reshape(-1, stacked.shape[-2] * stacked.shape[-1])

        second = _with_bias_column(columns(taps[half:]), info)
        return _gram_halves(columns(taps[:half]) * jnp.asarray(scale, xc.dtype),
                            second * jnp.asarray(scale, xc.dtype))

    total = _sum_over_batch_chunks(chunk_statistic, x, per_image_bytes, max_chunk_bytes)
    if not gram_only:
        return total
    # tap-major (tap, channel) -> the (channel, tap) order of input_matrix's columns
    num_taps, channels = math.prod(info.kernel_shape[:2]), x.shape[-1]
    order = np.arange(num_taps * channels).reshape(num_taps, channels).T.reshape(-1)
    if info.has_bias:
        order = np.append(order, num_taps * channels)
    return total[order][:, order]


def _gram_by_offsets(info: LayerInfo) -> bool:
    """Whether the whole Gram of a KFAC-expand conv comes from :func:`conv_gram_by_offsets`."""
    return all(s == 1 for s in info.strides)


def _half_plane_offsets(kh: int, kw: int) -> tuple[tuple[int, int], ...]:
    """Tap offsets (rows, columns) of one half-plane: every ``o_u - o_t`` with ``u >= t``
    in tap-major order."""
    return tuple((a, b) for a in range(kh) for b in range(1 - kw, kw) if a > 0 or b >= 0)


def gram_cost_per_row(info: LayerInfo, kfac_approx: str) -> float:
    r"""Multiply-adds per row of :math:`A` that :func:`input_gram_statistic` spends on
    the whole Gram matrix :math:`A^\top A`."""
    kh, kw = info.kernel_shape[:2] if info.kind == "conv" else (1, 1)
    dim = kh * kw * info.kernel_shape[-2] + int(info.has_bias)
    if info.kind != "conv" or kfac_approx != "expand":
        return float(dim * dim)
    if _gram_by_offsets(info):
        channels = info.kernel_shape[2]
        return float(len(_half_plane_offsets(kh, kw)) * channels
                     * (channels + int(info.has_bias)))
    return 0.75 * dim * dim  # three of the four blocks


@dataclasses.dataclass(frozen=True)
class _OffsetGramPlan:
    """Static bookkeeping of :func:`conv_gram_by_offsets` for one input size."""

    offsets: tuple[tuple[int, int], ...]  # (dy, dx) in input pixels, upper half-plane
    cells: tuple[tuple[int, int, int, int], ...]  # (y0, y1, x0, x1) partition of the input
    tap_cells: np.ndarray  # (taps, cells) 0/1: cell inside the positions the tap reads
    block_tap: np.ndarray  # (taps, taps): whose rectangle gives block (t, u)
    block_offset: np.ndarray  # (taps, taps): index into offsets
    block_transposed: np.ndarray  # (taps, taps): block (t, u) is block (u, t) transposed
    num_rows: int


def _offset_gram_plan(info: LayerInfo, in_hw: tuple[int, int]) -> _OffsetGramPlan:
    kh, kw = info.kernel_shape[:2]
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(info, in_hw)
    dh, dw = info.dilation
    height, width = in_hw
    out_h = height + plo_h + phi_h - (kh - 1) * dh
    out_w = width + plo_w + phi_w - (kw - 1) * dw

    def read_range(tap, dilation, pad_lo, out, size):  # unpadded positions a tap reads
        lo, hi = tap * dilation - pad_lo, tap * dilation - pad_lo + out
        return min(max(lo, 0), size), min(max(hi, 0), size)

    rows_read = [read_range(i, dh, plo_h, out_h, height) for i in range(kh)]
    cols_read = [read_range(j, dw, plo_w, out_w, width) for j in range(kw)]

    def segments(ranges, size):
        ends = sorted({0, size} | {e for r in ranges for e in r})
        return list(zip(ends[:-1], ends[1:]))

    cells = tuple((y0, y1, x0, x1) for y0, y1 in segments(rows_read, height)
                  for x0, x1 in segments(cols_read, width))
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    tap_cells = np.array([[rows_read[i][0] <= y0 and y1 <= rows_read[i][1]
                           and cols_read[j][0] <= x0 and x1 <= cols_read[j][1]
                           for y0, y1, x0, x1 in cells] for i, j in taps])
    offsets = _half_plane_offsets(kh, kw)
    index = {o: n for n, o in enumerate(offsets)}
    shape = (len(taps), len(taps))
    block_tap, block_offset = np.zeros(shape, int), np.zeros(shape, int)
    block_transposed = np.zeros(shape, bool)
    for t, (row_t, col_t) in enumerate(taps):
        for u, (row_u, col_u) in enumerate(taps):
            offset = (row_u - row_t, col_u - col_t)
            if u >= t:  # tap-major order puts o_u - o_t in the upper half-plane
                block_tap[t, u], block_offset[t, u] = t, index[offset]
            else:
                block_tap[t, u], block_offset[t, u] = u, index[(-offset[0], -offset[1])]
                block_transposed[t, u] = True
    return _OffsetGramPlan(offsets, cells, tap_cells, block_tap, block_offset,
                           block_transposed, out_h * out_w)


def conv_gram_by_offsets(x: Array, info: LayerInfo,
                         max_chunk_bytes: int | None = None) -> Array:
    r"""The Gram matrix :math:`A^\top A` of a stride-1 KFAC-expand convolution
    (``x`` in :func:`_conv_input`'s form), without unfolding patches.

    With tap offsets :math:`o_t` and zero padding, the block of taps :math:`t, u` is

    .. math::

       (A^\top A)_{tu} = \frac{1}{r} \sum_{q \in R_t} x_q\, x_{q + o_u - o_t}^\top,

    a sum over the rectangle :math:`R_t` of input positions that tap :math:`t` reads.
    It depends on the taps only through :math:`R_t` and the offset
    :math:`\delta = o_u - o_t`, and :math:`(A^\top A)_{ut} = (A^\top A)_{tu}^\top`.
    So, for a partition of the input into cells on which every :math:`R_t` is a union
    of cells, one product per cell gives :math:`\sum_{q \in \text{cell}} [x_q\,|\,1]
    [x_{q+\delta}]_\delta^\top` for all :math:`\approx 2 k_H k_W` offsets of one
    half-plane at once, and the blocks are sums of cells. That is about
    :math:`2 k_H k_W C^2` multiply-adds per position (13 :math:`C^2` for 3x3)
    instead of the :math:`\tfrac34 (k_H k_W C)^2` of three quarters of the unfolded
    Gram (61 :math:`C^2`); the ones column gives the bias row. Chunks of the batch of
    at most ``max_chunk_bytes`` of shifted input are summed in a ``lax.scan``
    (``None``: one chunk).
    """
    batch, height, width, channels = x.shape
    kh, kw = info.kernel_shape[:2]
    dh, dw = info.dilation
    plan = _offset_gram_plan(info, (height, width))
    scale = 1.0 / math.sqrt(batch * plan.num_rows)  # input_matrix's 1/sqrt(r)
    num_offsets = len(plan.offsets)

    def chunk_sum(xc):
        xc = xc * jnp.asarray(scale, xc.dtype)
        # zeros past the input: every shifted position is a slice of this
        padded = jnp.pad(xc, ((0, 0), (0, (kh - 1) * dh), ((kw - 1) * dw,) * 2, (0, 0)))
        shifted = jnp.concatenate(
            [padded[:, a * dh:a * dh + height, (kw - 1 + b) * dw:(kw - 1 + b) * dw + width]
             for a, b in plan.offsets], axis=-1)
        left = xc
        if info.has_bias:
            left = jnp.concatenate(
                [xc, jnp.full(xc.shape[:3] + (1,), scale, xc.dtype)], axis=-1)
        return jnp.stack([
            left[:, y0:y1, x0:x1].reshape(-1, left.shape[-1]).T
            @ shifted[:, y0:y1, x0:x1].reshape(-1, num_offsets * channels)
            for y0, y1, x0, x1 in plan.cells])

    per_image_bytes = height * width * num_offsets * channels * x.dtype.itemsize
    cells = _sum_over_batch_chunks(chunk_sum, x, per_image_bytes, max_chunk_bytes)
    rects = jnp.einsum("tk,kf->tf", jnp.asarray(plan.tap_cells, x.dtype),
                       cells.reshape(cells.shape[0], -1))
    num_taps = len(plan.tap_cells)
    rects = rects.reshape(num_taps, -1, num_offsets, channels)
    blocks = rects[plan.block_tap, :channels, plan.block_offset, :]  # (t, u, C, C)
    blocks = jnp.where(plan.block_transposed[:, :, None, None],
                       jnp.swapaxes(blocks, -1, -2), blocks)
    # (t, u, c, c') -> the (channel, tap) order of input_matrix's columns
    gram = blocks.transpose(2, 0, 3, 1).reshape(channels * num_taps, channels * num_taps)
    if not info.has_bias:
        return gram
    zero = plan.offsets.index((0, 0))
    bias = rects[:, channels, zero, :].T.reshape(-1)  # sum of each patch column / r
    corner = jnp.full((1, 1), batch * plan.num_rows * scale * scale, x.dtype)
    return jnp.block([[gram, bias[:, None]], [bias[None, :], corner]])


def _gram_halves_of_rows(rows: Array) -> Array:
    half = rows.shape[1] // 2
    return _gram_halves(rows[:, :half], rows[:, half:])


def output_grad_matrix(capture: LayerCapture, kfac_approx: str = "expand",
                       loss_average: str | None = "batch", dtype: Any = None) -> Array:
    r"""The matrix :math:`G` (rows x :math:`d_C`) of a layer, scaled by :math:`\sqrt{c}`."""
    info, g = capture.info, _in_dtype(capture.output_grads, dtype)
    if info.kind == "conv":
        g = g.reshape((-1,) + g.shape[-3:])
    batch = g.shape[0]
    shared = math.prod(g.shape[1:-1])
    num_terms = {None: 1, "batch": batch, "batch+sequence": batch * shared}[loss_average]
    d_out = g.shape[-1]
    if kfac_approx == "expand":
        rows = g.reshape(-1, d_out)
    else:
        rows = g.reshape(batch, -1, d_out).sum(axis=1)
    return rows * jnp.sqrt(jnp.asarray(num_terms, rows.dtype))


def input_square_sums(capture: LayerCapture, kfac_approx: str = "expand",
                      dtype: Any = None) -> Array:
    r"""The column sums of squares of :math:`A`, :math:`\sum_r A_{ri}^2`: all a diagonal
    factor needs. For KFAC-expand convolutions they come from the strided input
    slices directly, without unfolding the input into patches."""
    info = capture.info
    if info.kind != "conv" or kfac_approx != "expand":
        a = input_matrix(capture, kfac_approx, dtype)
        return jnp.sum(a * a, axis=0)
    x = _conv_input(_in_dtype(capture.inputs, dtype), info)
    # Every patch entry is one input entry, so the sums over patches are sums of the
    # batch-summed squared input over each tap's strided window.
    taps = _conv_taps(jnp.sum(x * x, axis=0, keepdims=True), info)
    # (C, kh*kw) flattened: the (input channel, kernel row, kernel column) feature order.
    sums = jnp.stack([jnp.sum(t, axis=(0, 1, 2)) for t in taps], axis=-1).reshape(-1)
    rows = x.shape[0] * math.prod(taps[0].shape[1:3])
    if info.has_bias:
        sums = jnp.concatenate([sums, jnp.full((1,), rows, sums.dtype)])
    return sums / jnp.asarray(rows, sums.dtype)


# -- the capture itself ------------------------------------------------------------------
SUPPORTED_LAYERS = (nnx.Linear, nnx.Conv)


class _Recorder:
    def __init__(self, paths: dict[int, str], perturbations: dict[str, Array] | None):
        self.paths = paths
        self.perturbations = perturbations
        self.inputs: dict[str, Array] = {}
        self.infos: dict[str, LayerInfo] = {}
        self.out_shapes: dict[str, jax.ShapeDtypeStruct] = {}


_ACTIVE: list[_Recorder] = []


def _wrapped_call(original: Callable) -> Callable:
    def call(self, x, *args, **kwargs):
        out = original(self, x, *args, **kwargs)
        if not _ACTIVE:
            return out
        rec = _ACTIVE[-1]
        path = rec.paths.get(id(self))
        if path is None:
            return out
        if path in rec.inputs:
            raise ValueError(
                f"layer {path!r} was called more than once in one forward pass; SINGD's "
                "Kronecker statistics assume one call per layer (exclude the layer with an "
                "override mapping its path to None, which trains it with `other`)"
            )
        rec.inputs[path] = x
        rec.infos[path] = layer_info(self, path)
        if rec.perturbations is None:
            rec.out_shapes[path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
            return out
        return out + rec.perturbations[path].astype(out.dtype)

    return call


_ORIGINAL_CALLS = {cls: cls.__call__ for cls in SUPPORTED_LAYERS}


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    # The layer classes are wrapped only while a capture traces the forward pass.
    if not _ACTIVE:
        for cls, original in _ORIGINAL_CALLS.items():
            cls.__call__ = _wrapped_call(original)
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.pop()
        if not _ACTIVE:
            for cls, original in _ORIGINAL_CALLS.items():
                cls.__call__ = original


def supported_layer_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Paths (``'a/0/b'``) of the ``nnx.Linear``/``nnx.Conv`` layers of a model."""
    return {
        path_to_str(path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, SUPPORTED_LAYERS)
    }


def unsupported_parameter_owners(model: nnx.Module) -> dict[str, list[str]]:
    """Modules other than Linear/Conv that directly hold ``nnx.Param``s (path -> names)."""
    owners: dict[str, list[str]] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, SUPPORTED_LAYERS):
            continue
        names = [k for k, v in vars(module).items() if isinstance(v, nnx.Param)]
        if names:
            owners[path_to_str(path)] = names
    return owners


_WARNED: set[tuple[int, str]] = set()


def _warn_unsupported(model: nnx.Module) -> None:
    owners = unsupported_parameter_owners(model)
    for path, names in owners.items():
        key = (id(type(model)), path)
        if key in _WARNED:
            continue
        _WARNED.add(key)
        warnings.warn(
            f"SINGD: module {path!r} holds parameters {names} but is not an nnx.Linear or "
            "2-D nnx.Conv; its parameters get no Kronecker preconditioner (the `other` "
            "transform trains them)",
            stacklevel=3,
        )


def _forward(loss_fn: Callable, has_aux: bool, args: tuple, kwargs: dict,
             model: nnx.Module, perturbations: dict[str, Array] | None,
             only: Collection[str] | None = None):
    # Layers outside `only` (e.g. excluded from SINGD by an override) run untouched: a
    # shared layer called twice, or an unsupported kind of Conv, is then no error.
    paths = {id(m): p for p, m in supported_layer_paths(model).items()
             if only is None or p in only}
    rec = _Recorder(paths, perturbations)
    with _recording(rec):
        result = loss_fn(model, *args, **kwargs)
    loss, aux = result if has_aux else (result, None)
    return loss, aux, rec


def functional_value_and_grad(loss_fn: Callable, graphdef: Any, params: Any, rest: Any,
                              args: tuple, kwargs: dict, *, has_aux: bool = False,
                              capture: bool = True, only: Collection[str] | None = None):
    """Pure core of :func:`capture_value_and_grad` on a split model.

    Returns ``(value, grads, captures, new_rest)``; ``captures`` is empty when
    ``capture`` is False (a plain ``value_and_grad``, no capture work at all). With
    ``only``, just the layers with those paths are captured.
    """
    if not capture:
        def plain(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            result = loss_fn(m, *args, **kwargs)
            loss, aux = result if has_aux else (result, None)
            return loss, (aux, nnx.state(m, nnx.Not(nnx.Param)))

        (loss, (aux, new_rest)), grads = jax.value_and_grad(plain, has_aux=True)(params, rest)
        return ((loss, aux) if has_aux else loss), grads, {}, new_rest

    holder: dict[str, Any] = {}

    def probe(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        _, _, rec = _forward(loss_fn, has_aux, args, kwargs, m, None, only)
        holder["infos"] = rec.infos
        return {k: jnp.zeros(v.shape, v.dtype) for k, v in rec.out_shapes.items()}

    def objective(params, perts, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        loss, aux, rec = _forward(loss_fn, has_aux, args, kwargs, m, perts, only)
        return loss, (aux, rec.inputs, nnx.state(m, nnx.Not(nnx.Param)))

    try:
        # abstract trace: which layers run and their output shapes (no compute)
        out_shapes = jax.eval_shape(probe, params, rest)
        infos: dict[str, LayerInfo] = holder["infos"]
        perturbations = {k: jnp.zeros(v.shape, v.dtype) for k, v in out_shapes.items()}
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        (loss, (aux, inputs, new_rest)), (grads, pert_grads) = grad_fn(
            params, perturbations, rest)
        captures = {}
        for k in sorted(inputs):
            x, g = inputs[k], pert_grads[k]
            # x.ndim comes first: on an input leaked out of a vmap it raises, here.
            if x.ndim == 1 and infos[k].kind == "linear":
                # One unbatched example: a batch of one (the last axis holds the features).
                x, g = x[None], g[None]
            captures[k] = LayerCapture(x, g, infos[k])
    except jax.errors.UnexpectedTracerError as err:
        raise ValueError(
            "SINGD's capture saw a layer called inside a JAX transform of the forward pass "
            "(jax.vmap, lax.scan, ...): its inputs cannot leave that transform. Call the "
            "nnx.Linear/nnx.Conv layers on the whole batch, or exclude them with "
            "layer_overrides={path: None} (and layers=[...] for raw captures)."
        ) from err
    return ((loss, aux) if has_aux else loss), grads, captures, new_rest


def capture_value_and_grad(loss_fn: Callable, model: nnx.Module, *args: Any,
                           has_aux: bool = False, layers: Collection[str] | None = None,
                           **kwargs: Any):
    """Loss, parameter gradients and per-layer captures from one forward/backward pass.

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``) on any unmodified NNX model.
      model: the NNX model; its non-parameter state (batch stats, RNG counters) is
        updated in place like ``nnx.value_and_grad`` does.
      layers: paths of the layers to capture (default: every ``nnx.Linear`` and
        ``nnx.Conv``); the others run untouched.

    Returns:
      ``(value, grads, captures)``: ``value`` is ``loss`` or ``(loss, aux)``, ``grads``
      an ``nnx.State`` of the parameters, ``captures`` maps layer paths to
      :class:`LayerCapture`.
    """
    _warn_unsupported(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value, grads, captures, new_rest = functional_value_and_grad(
        loss_fn, graphdef, params, rest, args, kwargs, has_aux=has_aux, capture=True,
        only=layers)
    nnx.update(model, new_rest)
    return value, grads, captures
