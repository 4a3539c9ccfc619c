r"""SINGD's curvature: the statistics of the captured rows each factor needs, and
:math:`H_K = P_K(K^\top A^\top A K)`, :math:`H_C = P_C(C^\top G^\top G C)` from them.

From a layer's :class:`~sing_jax._src.singd.capture.LayerCapture` (all its calls):

.. math::

   A = \frac{1}{\sqrt{r}}\,[\,\tilde x \mid 1\,] \in \mathbb{R}^{r \times d_K},\qquad
   G = \sqrt{c}\;\widetilde{\partial\ell/\partial s} \in \mathbb{R}^{r' \times d_C},

where :math:`\tilde x` are the input rows (KFAC-expand: every position of every call
is a row; KFAC-reduce: one row per example, the average over its positions and
calls; convolutions unfold their input into patches first), the column of ones is
present when the layer has a bias, the output-gradient rows are taken the same way
(KFAC-reduce: summed over positions and calls), and :math:`c` is the number of loss
terms the loss averages over (``"batch"``: :math:`B`; ``"batch+sequence"``:
:math:`B S` with :math:`S` the positions of one call; ``None``: 1). For a layer
called :math:`k` times (shared weights) this is the KFAC of Eschenhagen et al. 2023:
"expand" treats the calls as :math:`k` times more positions, "reduce" averages the
inputs and sums the output gradients over them.

Each structure names the one statistic of the rows it needs
(:attr:`~sing_jax._src.singd.structures.StructuredMatrix.input_statistic`): the
column sums of squares (diagonal), the diagonal blocks of the Gram matrix (block
diagonal), or the Gram matrix :math:`A^\top A` itself, taken from the rows when
there are few of them. Conv patches are :math:`(C_{in}, k_H, k_W)`-ordered (PyTorch's
``weight.flatten(1)``); grouped convolutions average the input channels over groups
(one :math:`K` for all groups). The Gram matrix of a stride-1 KFAC-expand
convolution is taken without unfolding (:func:`conv_gram_by_offsets`); a
block-diagonal factor takes it that way where that costs fewer multiply-adds than
its blocks from the unfolded patches. These choices count multiply-adds; the one
backend-specific step, summing over chunks of images on CPU
(:func:`sum_over_images`), gives the same sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sing_jax._src.singd.capture import LayerCapture
from sing_jax._src.singd.layers import LayerInfo, vmap_stacked
from sing_jax._src.singd.structures import StructuredMatrix
from sing_jax._src.singd.structures.block_diagonal import row_gram_blocks

Array = jax.Array

SUPPORTED_LOSS_AVERAGE = (None, "batch", "batch+sequence")
SUPPORTED_KFAC_APPROX = ("expand", "reduce")


def check_options(kfac_approx: str, loss_average: str | None) -> None:
    """A ValueError naming the bad option and the accepted ones."""
    if kfac_approx not in SUPPORTED_KFAC_APPROX:
        raise ValueError(f"kfac_approx={kfac_approx!r}; expected one of {SUPPORTED_KFAC_APPROX}")
    if loss_average not in SUPPORTED_LOSS_AVERAGE:
        raise ValueError(
            f"loss_average={loss_average!r}; expected one of {SUPPORTED_LOSS_AVERAGE}"
        )


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LayerCurvature:
    r"""Accumulated :math:`H_K, H_C` of one layer over ``count`` (micro-)batches
    (stacked layers: one per slice, stacked)."""

    h_k: StructuredMatrix
    h_c: StructuredMatrix
    count: Array

    def tree_flatten(self):
        return (self.h_k, self.h_c, self.count), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


# -- convolutions -------------------------------------------------------------------------
def _explicit_padding(info: LayerInfo, in_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    if not isinstance(info.padding, str):
        return info.padding
    kh, kw = info.unstacked_shape[:2]
    dilated = [(k - 1) * d + 1 for k, d in zip((kh, kw), info.dilation, strict=True)]
    return tuple(jax.lax.padtype_to_pads(in_hw, dilated, info.strides, info.padding))


def _conv_output_hw(info: LayerInfo, in_hw: tuple[int, int]) -> tuple[int, int]:
    """The conv's output height and width for an ``in_hw`` input."""
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(info, in_hw)
    (kh, kw), (sh, sw), (dh, dw) = info.unstacked_shape[:2], info.strides, info.dilation
    return ((in_hw[0] + plo_h + phi_h - (kh - 1) * dh - 1) // sh + 1,
            (in_hw[1] + plo_w + phi_w - (kw - 1) * dw - 1) // sw + 1)


def _conv_input(x: Array, info: LayerInfo) -> Array:
    """A call's ``(B, H, W, C_in)`` input with the groups averaged: ``(B, H, W, C_in/g)``."""
    if info.groups > 1:
        x = x.reshape(x.shape[:3] + (info.groups, info.unstacked_shape[2])).mean(axis=3)
    return x


def _conv_taps(x: Array, info: LayerInfo) -> list[Array]:
    """One ``(B, O1, O2, C)`` strided slice of the padded input per kernel tap, in
    (kernel row, kernel column) order."""
    kh, kw = info.unstacked_shape[:2]
    out_h, out_w = _conv_output_hw(info, x.shape[1:3])
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(info, x.shape[1:3])
    x = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
    (sh, sw), (dh, dw) = info.strides, info.dilation
    return [jax.lax.slice(
                x, (0, i * dh, j * dw, 0),
                (x.shape[0], i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1,
                 x.shape[3]),
                (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv_patches(x: Array, info: LayerInfo) -> Array:
    """A call's input unfolded, ``(B, O1, O2, C_in/groups * kH * kW)``, groups averaged.

    The feature order is (input channel, kernel row, kernel column), the same as
    ``jax.lax.conv_general_dilated_patches`` and PyTorch's ``weight.flatten(1)``.
    """
    patches = jnp.stack(_conv_taps(_conv_input(x, info), info), axis=-1)  # (B,O1,O2,C,taps)
    return patches.reshape(patches.shape[:3] + (-1,))


def _half_plane_offsets(kh: int, kw: int) -> tuple[tuple[int, int], ...]:
    """Tap offsets (rows, columns) of one half-plane: every ``o_u - o_t`` with ``u >= t``
    in tap-major order."""
    return tuple((a, b) for a in range(kh) for b in range(1 - kw, kw) if a > 0 or b >= 0)


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
    kh, kw = info.unstacked_shape[:2]
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(info, in_hw)
    dh, dw = info.dilation
    height, width = in_hw
    out_h, out_w = _conv_output_hw(info, in_hw)  # stride 1 here

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


# On CPU the statistics that are sums over images (a stride-1 convolution's Gram by
# offsets, the Gram or diagonal blocks of unfolded patches) are summed a few images at
# a time, in a lax.scan over chunks of the batch whose shifted or unfolded input stays
# in cache; other backends take the whole batch at once (bench_singd's CNN, T=1, one
# quiet 2-core VM, interleaved: block-diagonal 70 against 95 ms a step).
CPU_CHUNK_BYTES = 6 * 2**20


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(k for k in range(1, min(n, max(bound, 1)) + 1) if n % k == 0)


def _chunked_sum(chunk_sum: Callable[[Array], Any], x: Array, per_image_bytes: int) -> Any:
    """``chunk_sum(x)`` (additive over the batch axis) summed over chunks of at most
    :data:`CPU_CHUNK_BYTES` of work each, where the batch divides into such chunks."""
    batch = x.shape[0]
    images = _largest_divisor_at_most(batch, CPU_CHUNK_BYTES // max(per_image_bytes, 1))
    if images == batch:
        return chunk_sum(x)
    chunks = x.reshape((batch // images, images) + x.shape[1:])
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(chunk_sum, chunks[0]))

    def add_chunk(acc, xc):
        return jax.tree.map(jnp.add, acc, chunk_sum(xc)), None

    return jax.lax.scan(add_chunk, total, chunks)[0]


def sum_over_images(chunk_sum: Callable[[Array], Any], x: Array,
                    per_image_bytes: int) -> Any:
    """``chunk_sum(x)`` for a ``chunk_sum`` additive over the batch (first) axis: in one
    piece (the textbook form), on CPU over chunks of the batch (the same sum)."""
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _chunked_sum(chunk_sum, x, per_image_bytes), default=chunk_sum)


def conv_gram_by_offsets(x: Array, info: LayerInfo, scale: float) -> Array:
    r"""``scale**2`` times the Gram matrix of the ``[patches | 1]`` rows of a stride-1
    convolution's ``(B, H, W, C)`` input (groups averaged), without unfolding.

    With tap offsets :math:`o_t` and zero padding, the block of taps :math:`t, u` is

    .. math::

       \sum_{q \in R_t} x_q\, x_{q + o_u - o_t}^\top,

    a sum over the rectangle :math:`R_t` of input positions that tap :math:`t` reads.
    It depends on the taps only through :math:`R_t` and the offset
    :math:`\delta = o_u - o_t`, and block :math:`(u, t)` is block :math:`(t, u)`
    transposed. So, for a partition of the input into cells on which every
    :math:`R_t` is a union of cells, one product per cell gives :math:`\sum_{q \in
    \text{cell}} [x_q\,|\,1] [x_{q+\delta}]_\delta^\top` for all :math:`\approx 2 k_H
    k_W` offsets of one half-plane at once, and the blocks are sums of cells: about
    :math:`2 k_H k_W C^2` multiply-adds per position (:math:`13 C^2` for 3x3) instead
    of the :math:`(k_H k_W C)^2` (:math:`81 C^2`) of the unfolded Gram matrix. The
    ones column gives the bias row.
    """
    x = _conv_input(x, info)
    batch, height, width, channels = x.shape
    kh, kw = info.unstacked_shape[:2]
    dh, dw = info.dilation
    plan = _offset_gram_plan(info, (height, width))
    num_offsets = len(plan.offsets)

    def cell_sums(x):  # one product per cell, over these images
        x = x * jnp.asarray(scale, x.dtype)
        # zeros past the input: every shifted position is a slice of this
        padded = jnp.pad(x, ((0, 0), (0, (kh - 1) * dh), ((kw - 1) * dw,) * 2, (0, 0)))
        shifted = jnp.concatenate(
            [padded[:, a * dh:a * dh + height, (kw - 1 + b) * dw:(kw - 1 + b) * dw + width]
             for a, b in plan.offsets], axis=-1)
        left = x
        if info.has_bias:
            left = jnp.concatenate([x, jnp.full(x.shape[:3] + (1,), scale, x.dtype)], axis=-1)
        return jnp.stack([
            left[:, y0:y1, x0:x1].reshape(-1, left.shape[-1]).T
            @ shifted[:, y0:y1, x0:x1].reshape(-1, num_offsets * channels)
            for y0, y1, x0, x1 in plan.cells])

    cells = sum_over_images(cell_sums, x, height * width * num_offsets * channels
                            * x.dtype.itemsize)
    rects = jnp.einsum("tk,kf->tf", jnp.asarray(plan.tap_cells, x.dtype),
                       cells.reshape(cells.shape[0], -1))
    num_taps = len(plan.tap_cells)
    rects = rects.reshape(num_taps, -1, num_offsets, channels)
    blocks = rects[plan.block_tap, :channels, plan.block_offset, :]  # (t, u, C, C)
    blocks = jnp.where(plan.block_transposed[:, :, None, None],
                       jnp.swapaxes(blocks, -1, -2), blocks)
    # (t, u, c, c') -> the (channel, tap) order of the patches' columns
    gram = blocks.transpose(2, 0, 3, 1).reshape(channels * num_taps, channels * num_taps)
    if not info.has_bias:
        return gram
    zero = plan.offsets.index((0, 0))
    bias = rects[:, channels, zero, :].T.reshape(-1)  # each patch column's sum
    corner = jnp.full((1, 1), batch * plan.num_rows * scale * scale, x.dtype)
    return jnp.block([[gram, bias[:, None]], [bias[None, :], corner]])


def _conv_square_sums(x: Array, info: LayerInfo) -> Array:
    """The column sums of squares of a call's unfolded input, without unfolding:
    every patch entry is one input entry, so they are sums of the batch-summed squared
    input over each tap's strided window, in (channel, tap) order."""
    x = _conv_input(x, info)
    taps = _conv_taps(jnp.sum(x * x, axis=0, keepdims=True), info)
    return jnp.stack([jnp.sum(t, axis=(0, 1, 2)) for t in taps], axis=-1).reshape(-1)


def _conv_output_positions(x_shape: tuple[int, ...], info: LayerInfo) -> int:
    out_h, out_w = _conv_output_hw(info, x_shape[1:3])
    return out_h * out_w


# -- the matrices A and G --------------------------------------------------------------------
def _in_dtype(x: Array, dtype: Any) -> Array:
    return x if dtype is None else x.astype(dtype)


def _with_bias_column(rows: Array, info: LayerInfo) -> Array:
    if not info.has_bias:
        return rows
    return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def _call_input_rows(x: Array, info: LayerInfo, dtype: Any) -> Array:
    """``(B, positions, d_i)`` of one call (conv: its patches)."""
    x = _in_dtype(x, dtype)
    if info.kind == "conv":
        x = conv_patches(x, info)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def num_input_rows(capture: LayerCapture, kfac_approx: str) -> int:
    """The rows of :math:`A` of an unstacked layer."""
    shapes = [x.shape for x in capture.inputs]
    if kfac_approx == "reduce":
        return shapes[0][0]
    if capture.info.kind == "conv":
        return sum(s[0] * _conv_output_positions(s, capture.info) for s in shapes)
    return sum(math.prod(s[:-1]) for s in shapes)


def input_matrix(capture: LayerCapture, kfac_approx: str = "expand",
                 dtype: Any = None) -> Array:
    r"""The matrix :math:`A` (rows x :math:`d_K`) of one (unstacked) layer."""
    info = capture.info
    calls = [_call_input_rows(x, info, dtype) for x in capture.inputs]
    if kfac_approx == "expand":
        rows = jnp.concatenate([c.reshape(-1, c.shape[-1]) for c in calls], axis=0)
    else:  # every example's average over its positions and calls
        rows = sum(c.mean(axis=1) for c in calls[1:]) + calls[0].mean(axis=1)
        rows = rows / len(calls)
    rows = _with_bias_column(rows, info)
    return rows / jnp.sqrt(jnp.asarray(rows.shape[0], rows.dtype))


def output_grad_matrix(capture: LayerCapture, kfac_approx: str = "expand",
                       loss_average: str | None = "batch", dtype: Any = None) -> Array:
    r"""The matrix :math:`G` (rows x :math:`d_C`) of one (unstacked) layer."""
    calls = [_in_dtype(g, dtype) for g in capture.output_grads]
    calls = [g.reshape(g.shape[0], -1, g.shape[-1]) for g in calls]
    batch, positions = calls[0].shape[:2]
    num_terms = {None: 1, "batch": batch, "batch+sequence": batch * positions}[loss_average]
    if kfac_approx == "expand":
        rows = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in calls], axis=0)
    else:  # every example's sum over its positions and calls
        rows = sum(g.sum(axis=1) for g in calls[1:]) + calls[0].sum(axis=1)
    return rows * jnp.sqrt(jnp.asarray(num_terms, rows.dtype))


def _gram_by_offsets(info: LayerInfo, kfac_approx: str) -> bool:
    """Whether :math:`A^\top A` comes from :func:`conv_gram_by_offsets`."""
    return (info.kind == "conv" and kfac_approx == "expand"
            and all(s == 1 for s in info.strides))


def _patch_statistic(capture: LayerCapture, kfac_approx: str, dtype: Any,
                     statistic: Callable[[Array], Any]) -> Any:
    """``statistic(A)`` of a KFAC-expand convolution, for a statistic that is a sum
    over the rows of :math:`A` (the unfolded patches), image by image summable."""
    info = capture.info
    scale = 1.0 / math.sqrt(num_input_rows(capture, kfac_approx))

    def of_images(x):
        rows = _with_bias_column(_call_input_rows(x, info, None).reshape(
            -1, info.unstacked_shape[2] * math.prod(info.unstacked_shape[:2])), info)
        return statistic(rows * jnp.asarray(scale, rows.dtype))

    totals = []
    for x in capture.inputs:
        x = _in_dtype(x, dtype)
        per_image = jax.eval_shape(lambda x: conv_patches(x[:1], info), x)
        totals.append(sum_over_images(of_images, x, math.prod(per_image.shape)
                                      * x.dtype.itemsize))
    return jax.tree.map(lambda *t: sum(t[1:], t[0]), *totals)


def input_gram(capture: LayerCapture, kfac_approx: str = "expand",
               dtype: Any = None) -> Array:
    r""":math:`A^\top A` of one (unstacked) layer."""
    info = capture.info
    if _gram_by_offsets(info, kfac_approx):
        scale = 1.0 / math.sqrt(num_input_rows(capture, kfac_approx))
        grams = [conv_gram_by_offsets(_in_dtype(x, dtype), info, scale)
                 for x in capture.inputs]
        return sum(grams[1:], grams[0])
    if info.kind == "conv" and kfac_approx == "expand":
        return _patch_statistic(capture, kfac_approx, dtype, lambda a: a.T @ a)
    a = input_matrix(capture, kfac_approx, dtype)
    return a.T @ a


def input_gram_blocks(capture: LayerCapture, block_size: int, kfac_approx: str = "expand",
                      dtype: Any = None) -> tuple[Array, Array]:
    r"""The diagonal blocks of :math:`A^\top A` (blocks of ``block_size``, and the
    remainder block) of one (unstacked) layer."""
    if capture.info.kind == "conv" and kfac_approx == "expand":
        return _patch_statistic(capture, kfac_approx, dtype,
                                lambda a: row_gram_blocks(a, block_size))
    return row_gram_blocks(input_matrix(capture, kfac_approx, dtype), block_size)


def input_square_sums(capture: LayerCapture, kfac_approx: str = "expand",
                      dtype: Any = None) -> Array:
    r"""The column sums of squares of :math:`A`, :math:`\sum_r A_{ri}^2`: all a diagonal
    factor needs (for KFAC-expand convolutions without unfolding the input)."""
    info = capture.info
    if info.kind != "conv" or kfac_approx != "expand":
        a = input_matrix(capture, kfac_approx, dtype)
        return jnp.sum(a * a, axis=0)
    rows = num_input_rows(capture, kfac_approx)
    sums = [_conv_square_sums(_in_dtype(x, dtype), info) for x in capture.inputs]
    sums = sum(sums[1:], sums[0])
    if info.has_bias:
        sums = jnp.concatenate([sums, jnp.full((1,), rows, sums.dtype)])
    return sums / jnp.asarray(rows, sums.dtype)


# -- the curvature ----------------------------------------------------------------------------
def _offsets_cost_per_row(info: LayerInfo) -> int:
    """Multiply-adds per output position of :func:`conv_gram_by_offsets`."""
    channels = info.unstacked_shape[2]
    return (len(_half_plane_offsets(*info.unstacked_shape[:2])) * channels
            * (channels + int(info.has_bias)))


def _input_curvature(factor: StructuredMatrix, capture: LayerCapture, kfac_approx: str,
                     dtype: Any) -> StructuredMatrix:
    statistic = factor.input_statistic
    if statistic == "square_sums":
        return factor.from_square_sums(input_square_sums(capture, kfac_approx, dtype))
    info = capture.info
    if statistic == "block_gram":
        # Its diagonal blocks take d b multiply-adds per row of unfolded patches: the
        # whole Gram by offsets only where that takes fewer.
        by_offsets = _gram_by_offsets(info, kfac_approx) and (
            _offsets_cost_per_row(info) <= factor.dim * factor.block_size)
    else:
        by_offsets = _gram_by_offsets(info, kfac_approx)
    if by_offsets or (statistic == "gram"
                      and factor.uses_gram(num_input_rows(capture, kfac_approx))):
        return factor.from_gram(input_gram(capture, kfac_approx, dtype))
    if statistic == "block_gram":
        return factor.from_gram_blocks(*input_gram_blocks(capture, factor.block_size,
                                                          kfac_approx, dtype))
    return factor.from_inner_rows(input_matrix(capture, kfac_approx, dtype))


def _output_curvature(factor: StructuredMatrix, capture: LayerCapture, kfac_approx: str,
                      loss_average: str | None, dtype: Any) -> StructuredMatrix:
    g = output_grad_matrix(capture, kfac_approx, loss_average, dtype)
    if factor.input_statistic == "square_sums":
        return factor.from_square_sums(jnp.sum(g * g, axis=0))
    if factor.input_statistic == "gram" and factor.uses_gram(g.shape[0]):
        return factor.from_gram(g.T @ g)
    return factor.from_inner_rows(g)


def _unstacked_curvature(k: StructuredMatrix, c: StructuredMatrix, capture: LayerCapture,
                         kfac_approx: str, loss_average: str | None
                         ) -> tuple[StructuredMatrix, StructuredMatrix]:
    h_k = _input_curvature(k, capture, kfac_approx, k.dtype)
    h_c = _output_curvature(c, capture, kfac_approx, loss_average, c.dtype)
    return h_k, h_c


def layer_curvature(k: StructuredMatrix, c: StructuredMatrix, capture: LayerCapture,
                    kfac_approx: str, loss_average: str | None,
                    axis_names: tuple[str, ...] = ()) -> LayerCurvature:
    r""":math:`H_K = P_K(K^\top A^\top A K)`, :math:`H_C = P_C(C^\top G^\top G C)` of one
    captured layer with the factors ``k``, ``c`` (one per slice of a stacked layer,
    stacked), in the factors' dtypes; averaged over the mapped ``axis_names`` (summed
    for ``loss_average=None``) and over the capture's own axis name."""
    info = capture.info
    fn = vmap_stacked(functools.partial(_unstacked_curvature, kfac_approx=kfac_approx,
                                        loss_average=loss_average), info.num_stacked)
    unstacked = dataclasses.replace(info, kernel_shape=info.unstacked_shape, num_stacked=0)
    h_k, h_c = fn(k, c, dataclasses.replace(capture, info=unstacked))
    axes = tuple(dict.fromkeys(
        a for a in (*axis_names, capture.axis_name) if a is not None))
    if axes:
        reduce = jax.lax.pmean if loss_average is not None else jax.lax.psum
        h_k, h_c = reduce((h_k, h_c), axes)
    return LayerCurvature(h_k, h_c, jnp.ones((), jnp.float32))
