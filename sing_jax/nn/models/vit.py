r"""Vision Transformer (Dosovitskiy et al. 2021) with a swappable norm.

It also computes the auxiliary losses of the LearnableScaler recipe.

Pre-norm blocks ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))`` over a class
token and learned position embeddings; ``norm="layer"`` (default) or
``"learnable_scaler"`` (seed 004), or any other :func:`~sing_jax.nn.make_norm` name.
ViT-Ti/16 (embed 192, depth 12, 3 heads, 224x224, 1000 classes) has 5,717,416
parameters, as timm's ``vit_tiny_patch16_224``.

``init="timm"`` is the reference initialisation of seed 004's runs (timm's
``init_weights_vit_timm``): every Linear kernel, the head's included, from
``N(0, 0.02^2)`` truncated to ``[-2, 2]`` (timm's bounds are absolute, about 100
standard deviations, so they never bind), Linear biases 0, the patch-embedding
conv with PyTorch's default ``U(+-1/sqrt(fan_in))`` for kernel and bias,
``cls_token ~ N(0, 1e-12)`` (std 1e-6) and ``pos_embed`` like the Linear kernels.
``init="default"`` keeps seed 003's table (Glorot/He normal by activation) and
``N(0, 0.02^2)`` embeddings. At depth 24 with LearnableScaler (``a ~ N(0, 1)``)
the default init compounds into a residual stream of RMS ~1e6 at initialisation;
the reference init keeps it O(1).

``matmul_dtype=jnp.bfloat16`` is PyTorch bf16 autocast: the matmuls (patch conv,
``qkv``, attention, ``proj``, MLP, head) run in bfloat16 while the residual
stream, the norms' (LayerNorm/LearnableScaler) affine maps, the softmax and the
loss stay in the parameters' float32. ``dtype`` instead puts every activation in
that dtype.

Auxiliary losses of the seed 004 training recipe (spec section 7), returned
with ``model(x, return_aux=True) -> (logits, aux)`` and not computed otherwise:

- ``aux["feature_decay"]``: for every residual-stream activation ``h`` (after
  each of the two residual adds of every block),
  ``d = |h|[|h| > t] - t`` (``t = feature_decay_threshold``, 200) and the term
  ``mean(d) + max(d)`` (0 when no element exceeds ``t``), summed over them.
- ``aux["attn_extra"]``: for each of the first ``attn_extra_loss_layers`` blocks,
  the max probability ``m`` of every attention row (all heads and queries); over
  the rows with ``m < attn_max_threshold`` (0.5), ``1 - mean(m)`` (0 when none),
  summed over those blocks.

:func:`learnable_scaler_aux_loss` scales and adds them with the *effective* weights
of the published command, 0.01 and 0.003: the reference multiplies the summed
terms by ``--train-feature-decay`` (0.1) and ``--attn-extra-loss`` (0.03) inside
the blocks and the blocks' total by ``--train-feature-decay`` again (spec section
7); :func:`reference_aux_loss_weights` turns the command's flags into these weights.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.init import (
    init_for_activation,
    pytorch_default_bias_init,
    pytorch_default_kernel_init,
)
from sing_jax.nn.models._common import check_input_channels, check_positive_int, head
from sing_jax.nn.norms import NormLike, check_norm_name, make_norm

VIT_INITS = ("default", "timm")
Initializer = Any


def timm_trunc_normal(std: float = 0.02) -> Initializer:
    r"""timm's ``trunc_normal_(std=std)``: ``N(0, std^2)`` limited to ``[-2, 2]``.

    timm's bounds ``a=-2, b=2`` are absolute, not in units of ``std``: at
    ``std = 0.02`` they sit 100 standard deviations out and never bind, so this
    is a normal draw clipped to ``[-2, 2]`` (``jax.nn.initializers.truncated_normal``
    would truncate at 2 standard deviations and shrink the spread by 12%).
    """

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return _clipped_normal(key, std, tuple(shape), jnp.dtype(dtype))

    return init


@functools.partial(jax.jit, static_argnums=(2, 3))  # one compile per shape, not per op
def _clipped_normal(key: jax.Array, std: float, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    draw = jax.random.normal(key, shape, jnp.float32) * std
    return jnp.clip(draw, -2.0, 2.0).astype(dtype)


def feature_decay_term(h: jax.Array, threshold: float = 200.0) -> jax.Array:
    r"""``mean(d) + max(d)`` with ``d = |h|[|h| > threshold] - threshold``; 0 when empty."""
    magnitude = jnp.abs(h.astype(jnp.promote_types(h.dtype, jnp.float32)))
    over = magnitude > threshold
    danger = jnp.where(over, magnitude - threshold, 0.0)
    count = jnp.sum(over)
    mean = jnp.sum(danger) / jnp.maximum(count, 1)
    # danger is 0 off the mask and > 0 on it, so the plain max is the masked max
    return jnp.where(count > 0, mean + jnp.max(danger), 0.0)


def attention_extra_term(probs: jax.Array, max_threshold: float = 0.5) -> jax.Array:
    r"""``1 - mean(m)`` over attention rows whose max probability ``m`` < threshold.

    0 when no row is below the threshold.
    """
    row_max = jnp.max(probs.astype(jnp.promote_types(probs.dtype, jnp.float32)), axis=-1)
    low = row_max < max_threshold
    count = jnp.sum(low)
    mean = jnp.sum(jnp.where(low, row_max, 0.0)) / jnp.maximum(count, 1)
    return jnp.where(count > 0, 1.0 - mean, 0.0)


def learnable_scaler_aux_loss(aux: dict[str, jax.Array], *, feature_decay: float = 0.01,
                              attn_extra: float = 0.003) -> jax.Array:
    """``feature_decay * aux["feature_decay"] + attn_extra * aux["attn_extra"]``.

    The weights are the effective ones; the defaults, 0.01 and 0.003, are those of
    seed 004's published command (see :func:`reference_aux_loss_weights`).
    """
    return feature_decay * aux["feature_decay"] + attn_extra * aux["attn_extra"]


def reference_aux_loss_weights(train_feature_decay: float = 0.1,
                               attn_extra_loss: float = 0.03) -> dict[str, float]:
    r"""Effective auxiliary-loss weights of the reference's command-line flags.

    .. math::
      w_{fd} = f^2, \qquad w_{attn} = f\,a \ \text{if } f > 0 \text{ else } 0

    with ``f = --train-feature-decay`` and ``a = --attn-extra-loss``: the reference
    scales each block's terms by ``f`` (feature decay) and ``a`` (attention), then
    the blocks' sum by ``f`` again, and computes the attention term only when
    feature decay is on. The published ``(0.1, 0.03)`` gives ``(0.01, 0.003)``.

    Returns:
      ``{"feature_decay": w_fd, "attn_extra": w_attn}``, the keyword arguments of
      :func:`learnable_scaler_aux_loss` (and the keys of ``config.aux_loss``).
    """
    for name, value in (("train_feature_decay", train_feature_decay),
                        ("attn_extra_loss", attn_extra_loss)):
        if not value >= 0:
            raise ValueError(f"reference_aux_loss_weights: {name}={value!r}; expected >= 0.")
    if train_feature_decay == 0:
        return {"feature_decay": 0.0, "attn_extra": 0.0}
    return {"feature_decay": train_feature_decay * train_feature_decay,
            "attn_extra": train_feature_decay * attn_extra_loss}


def _check_heads(layer: str, embed_dim: int, num_heads: int) -> None:
    if embed_dim % num_heads:
        raise ValueError(
            f"{layer}: num_heads={num_heads} does not divide embed_dim={embed_dim}; "
            f"allowed num_heads are the divisors of {embed_dim}."
        )


class MultiHeadSelfAttention(nnx.Module):
    """Self-attention with a fused ``qkv`` projection; can return the attention probabilities."""

    def __init__(self, embed_dim: int, num_heads: int, *, dtype: Any = None,
                 param_dtype: Any = jnp.float32, kernel_init: Initializer | None = None,
                 rngs: nnx.Rngs):
        _check_heads("MultiHeadSelfAttention", embed_dim, num_heads)
        linear = dict(kernel_init=kernel_init or init_for_activation("none"),
                      bias_init=nnx.initializers.zeros, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv = nnx.Linear(embed_dim, 3 * embed_dim, **linear)
        self.proj = nnx.Linear(embed_dim, embed_dim, **linear)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
        # softmax in float32 at least (bf16 autocast runs it in float32)
        probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                               axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return self.proj(out.reshape(batch, tokens, -1)), probs


class FlaxMultiHeadSelfAttention(nnx.Module):
    """Self-attention from Flax's ``nnx.MultiHeadAttention`` (separate ``query``,
    ``key``, ``value`` and ``out`` ``nnx.LinearGeneral`` projections, which SINGD
    preconditions). It does not expose the attention probabilities: returns ``None``
    for them."""

    def __init__(self, embed_dim: int, num_heads: int, *, dtype: Any = None,
                 param_dtype: Any = jnp.float32, kernel_init: Initializer | None = None,
                 rngs: nnx.Rngs):
        _check_heads("FlaxMultiHeadSelfAttention", embed_dim, num_heads)
        self.mha = nnx.MultiHeadAttention(
            num_heads, embed_dim, qkv_features=embed_dim, out_features=embed_dim,
            kernel_init=kernel_init or init_for_activation("none"),
            bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
            decode=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        return self.mha(x), None


ATTENTION_KINDS = {"fused": MultiHeadSelfAttention, "mha": FlaxMultiHeadSelfAttention}


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``h += attn(norm1(h)); h += mlp(norm2(h))``.

    ``matmul_dtype`` (default ``dtype``) is the dtype of the four Linear layers;
    the norms run in ``dtype`` and the residual adds in the stream's dtype.
    ``kernel_init`` (default: Glorot, He before the GELU) initialises every Linear
    kernel. The MLP's GELU is exact (erf) unless ``gelu_approximate``.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, *,
                 norm: NormLike, dropout_rate: float, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs, matmul_dtype: Any = None,
                 kernel_init: Initializer | None = None, gelu_approximate: bool = False,
                 attention: str = "fused", **norm_kwargs: Any):
        norm_args = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, **norm_kwargs)
        matmul_dtype = dtype if matmul_dtype is None else matmul_dtype
        hidden = int(embed_dim * mlp_ratio)
        self.gelu_approximate = gelu_approximate
        self.norm1 = make_norm(norm, embed_dim, **norm_args)
        self.attn = ATTENTION_KINDS[attention](embed_dim, num_heads, dtype=matmul_dtype,
                                               param_dtype=param_dtype,
                                               kernel_init=kernel_init, rngs=rngs)
        self.norm2 = make_norm(norm, embed_dim, **norm_args)
        self.fc1 = nnx.Linear(embed_dim, hidden,
                              kernel_init=kernel_init or init_for_activation("gelu"),
                              bias_init=nnx.initializers.zeros, dtype=matmul_dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, embed_dim,
                              kernel_init=kernel_init or init_for_activation("none"),
                              bias_init=nnx.initializers.zeros, dtype=matmul_dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The stream after the MLP add, the stream after the attention add, the probs."""
        attn_out, probs = self.attn(self.norm1(h))
        # the add promotes a bf16 branch output to the stream's float32, as autocast does
        h_attn = h + self.dropout(attn_out)
        hidden = jax.nn.gelu(self.fc1(self.norm2(h_attn)), approximate=self.gelu_approximate)
        mlp_out = self.fc2(self.dropout(hidden))
        return h_attn + self.dropout(mlp_out), h_attn, probs


class ViT(nnx.Module):
    """Vision Transformer classifier.

    Args:
      num_classes: classifier outputs.
      image_size: input height = width (an int) or ``(height, width)``.
      patch_size: square patch side; must divide ``image_size``.
      embed_dim: token width.
      depth: number of blocks.
      num_heads: attention heads; must divide ``embed_dim``.
      mlp_ratio: MLP hidden width / ``embed_dim``.
      norm: ``"layer"`` (default), ``"learnable_scaler"`` or another norm name/factory.
      in_channels: input channels.
      dropout_rate: dropout after attention, inside and after the MLP.
      attn_extra_loss_layers: how many first blocks enter ``aux["attn_extra"]``.
      feature_decay_threshold: ``t`` of the feature-decay loss (200).
      attn_max_threshold: row-max threshold of the attention loss (0.5).
      init: ``"default"`` (seed 003's table) or ``"timm"`` (the seed 004 reference;
        see the module docstring).
      matmul_dtype: dtype of the patch conv, the Linear layers and the attention
        matmuls (``None``: ``dtype``); ``jnp.bfloat16`` (or ``"bfloat16"``) with
        ``dtype=None`` is bf16 autocast, everything else staying float32.
      gelu_approximate: the tanh GELU instead of the exact (erf) one.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: random streams (``params``, and ``dropout`` when ``dropout_rate > 0``).
      attention: ``"fused"`` (default: one ``qkv`` ``nnx.Linear``, a ``proj`` one) or
        ``"mha"`` (Flax's ``nnx.MultiHeadAttention``, ``nnx.LinearGeneral``
        projections; no ``aux["attn_extra"]``).
      scan_blocks: build the blocks with ``nnx.vmap`` (every block parameter gets a
        leading ``depth`` axis) and run them with ``nnx.scan``: one compiled block
        however deep the model.

    Seed 004's table is ``ViT(patch_size=p, embed_dim=e, depth=d)`` for
    ``(p, e, d)`` in (16, 192, 24), (16, 192, 36), (16, 288, 24), (32, 288, 24),
    (32, 288, 36) at 224x224 with 1000 classes; ``num_heads=3`` divides both widths.
    """

    def __init__(self, num_classes: int = 1000, *, image_size: int | tuple[int, int] = 224,
                 patch_size: int = 16, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, norm: NormLike = "layer",
                 in_channels: int = 3, dropout_rate: float = 0.0,
                 attn_extra_loss_layers: int = 6, feature_decay_threshold: float = 200.0,
                 attn_max_threshold: float = 0.5, init: str = "default",
                 matmul_dtype: Any = None, gelu_approximate: bool = False,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 attention: str = "fused", scan_blocks: bool = False, **norm_kwargs: Any):
        check_norm_name(norm, "ViT")
        if init not in VIT_INITS:
            raise ValueError(f"ViT: init={init!r}; allowed values: {VIT_INITS}.")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"ViT: attention={attention!r}; expected one of "
                             f"{sorted(ATTENTION_KINDS)}.")
        matmul_dtype = dtype if matmul_dtype is None else jnp.dtype(matmul_dtype)
        for name, value in (("num_classes", num_classes), ("patch_size", patch_size),
                            ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("in_channels", in_channels)):
            check_positive_int("ViT", name, value)
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"ViT: patch_size={patch_size} does not divide image_size="
                f"{(height, width)}; allowed patch sizes are common divisors of the "
                "image height and width."
            )
        _check_heads("ViT", embed_dim, num_heads)
        if not mlp_ratio > 0:
            raise ValueError(f"ViT: mlp_ratio={mlp_ratio!r}; expected a positive number.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"ViT: dropout_rate={dropout_rate!r}; expected 0 <= rate < 1.")
        if not isinstance(attn_extra_loss_layers, int) or attn_extra_loss_layers < 0:
            raise ValueError(
                f"ViT: attn_extra_loss_layers={attn_extra_loss_layers!r}; expected an int "
                f">= 0 (at most depth={depth})."
            )
        self.in_channels = in_channels
        self.image_size = (height, width)
        self.patch_size = patch_size
        self.attn_extra_loss_layers = min(attn_extra_loss_layers, depth)
        self.feature_decay_threshold = feature_decay_threshold
        self.attn_max_threshold = attn_max_threshold
        num_patches = (height // patch_size) * (width // patch_size)
        timm = init == "timm"
        patch_fan_in = in_channels * patch_size * patch_size
        self.patch_embed = nnx.Conv(
            in_channels, embed_dim, (patch_size, patch_size), strides=patch_size,
            padding="VALID",
            kernel_init=pytorch_default_kernel_init() if timm else init_for_activation("none"),
            bias_init=(pytorch_default_bias_init(patch_fan_in) if timm
                       else nnx.initializers.zeros),
            dtype=matmul_dtype, param_dtype=param_dtype, rngs=rngs)
        linear_init = timm_trunc_normal(0.02) if timm else None
        cls_init = nnx.initializers.normal(1e-6 if timm else 0.02)
        pos_init = timm_trunc_normal(0.02) if timm else nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(cls_init(rngs.params(), (1, 1, embed_dim), param_dtype))
        self.pos_embed = nnx.Param(
            pos_init(rngs.params(), (1, num_patches + 1, embed_dim), param_dtype))

        def make_block(rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(embed_dim, num_heads, mlp_ratio, norm=norm,
                                    dropout_rate=dropout_rate, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs,
                                    matmul_dtype=matmul_dtype, kernel_init=linear_init,
                                    gelu_approximate=gelu_approximate, attention=attention,
                                    **norm_kwargs)

        self.attention = attention
        self.scan_blocks = scan_blocks
        if scan_blocks:
            self.blocks = nnx.split_rngs(splits=depth)(
                nnx.vmap(make_block, in_axes=(0,), out_axes=0))(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.norm = make_norm(norm, embed_dim, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype, **norm_kwargs)
        if timm:
            self.head = nnx.Linear(embed_dim, num_classes, kernel_init=linear_init,
                                   bias_init=nnx.initializers.zeros, dtype=matmul_dtype,
                                   param_dtype=param_dtype, rngs=rngs)
        else:
            self.head = head(embed_dim, num_classes, dtype=matmul_dtype,
                             param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, return_aux: bool = False
                 ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        check_input_channels("ViT", x, self.in_channels, 2)
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(
                f"ViT: input spatial size {tuple(x.shape[1:3])} differs from "
                f"image_size={self.image_size} the position embeddings were built for."
            )
        tokens = self.patch_embed(x)
        batch, _, _, dim = tokens.shape
        # The residual stream: ``dtype``, else the embeddings' dtype (float32 under bf16
        # matmuls, as autocast's cat/add promote the bf16 patch tokens).
        stream = (self.dtype if self.dtype is not None
                  else jnp.promote_types(tokens.dtype, self.pos_embed.dtype))
        tokens = tokens.reshape(batch, -1, dim).astype(stream)
        cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, dim)).astype(stream)
        h = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(stream)
        if return_aux and self.attention == "mha" and self.attn_extra_loss_layers:
            raise ValueError("ViT(attention='mha') does not expose the attention "
                             "probabilities aux['attn_extra'] needs; pass "
                             "attn_extra_loss_layers=0")
        if self.scan_blocks:
            h, aux = self._scanned_blocks(h, return_aux)
            logits = self.head(self.norm(h)[:, 0])
            return (logits, aux) if return_aux else logits
        feature_decay = jnp.zeros((), jnp.float32)
        attn_extra = jnp.zeros((), jnp.float32)
        for index, block in enumerate(self.blocks):
            h, h_attn, probs = block(h)
            if return_aux:  # a Python branch: nothing is traced when not asked
                block_decay, block_attn = self._block_aux_terms(
                    h, h_attn, probs if index < self.attn_extra_loss_layers else None)
                feature_decay += block_decay
                attn_extra += block_attn
        logits = self.head(self.norm(h)[:, 0])
        if return_aux:
            return logits, {"feature_decay": feature_decay, "attn_extra": attn_extra}
        return logits

    def _block_aux_terms(self, h: jax.Array, h_attn: jax.Array, probs: jax.Array | None
                         ) -> tuple[jax.Array, jax.Array]:
        """One block's feature-decay term (both residual adds) and attention term
        (zero without ``probs``)."""
        decay = (feature_decay_term(h_attn, self.feature_decay_threshold)
                 + feature_decay_term(h, self.feature_decay_threshold))
        attn = (jnp.zeros((), jnp.float32) if probs is None
                else attention_extra_term(probs, self.attn_max_threshold))
        return decay, attn

    def _scanned_blocks(self, h: jax.Array, return_aux: bool
                        ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """The stacked blocks under ``nnx.scan``; the auxiliary terms per block."""
        block_aux_terms = self._block_aux_terms  # bound outside the scanned function

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(h, block):
            h, h_attn, probs = block(h)
            if not return_aux:
                return h, ()
            return h, block_aux_terms(h, h_attn, probs)

        h, terms = run(h, self.blocks)
        if not return_aux:
            return h, None
        feature_decay, per_block_attn = terms
        first = jnp.arange(per_block_attn.shape[0]) < self.attn_extra_loss_layers
        return h, {"feature_decay": jnp.sum(feature_decay),
                   "attn_extra": jnp.sum(jnp.where(first, per_block_attn, 0.0))}


def vit(patch_size: int = 16, embed_dim: int = 192, depth: int = 12, *,
        norm: NormLike = "layer", **kwargs: Any) -> ViT:
    """``ViT(patch_size=..., embed_dim=..., depth=..., norm=...)``; the seed 004 table's naming."""
    return ViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, norm=norm, **kwargs)
