"""Seed 004: ViT with LayerNorm vs LearnableScaler on ImageNet-1k, and its recipe.

``get_config("<patch>,<embed>,<depth>,<norm>[,tiny]")`` with ``(patch, embed, depth)``
one of the table's rows (:data:`TABLE`) and norm ``layer`` or ``learnable_scaler``.

The recipe is the published command as the reference's timm fork runs it (spec
section 7; ``docs/reproducing.md`` lists every item):

- LAMB as timm's ``Lamb``: lr 0.005 for every row (the command's ``--lr``; the
  seed's prose suggests 0.003-0.004 for LearnableScaler, but the table was made
  with the command), betas (0.9, 0.999), eps 1e-6, bias correction; weight decay
  0.02 and the trust ratio only on timm's decayed group (``ndim > 1``, not biases,
  ``pos_embed``, ``cls_token``); ``clip_grad_norm_(14)`` on the accumulated
  gradient, then Lamb's own global-norm clip at 1.0; gradient accumulation 8.
- the ``custom`` schedule (factor 0.8, threshold 0.5), no warmup, 300 epochs.
- auxiliary losses with the *effective* weights of ``--train-feature-decay 0.1
  --attn-extra-loss 0.03 --attn-extra-loss-layers 6``: 0.01 and 0.003 (the
  reference scales them twice, :func:`sing_jax.nn.models.reference_aux_loss_weights`).
- the model: timm's init (``init="timm"``), exact GELU, LayerNorm eps 1e-6, bf16
  autocast (``matmul_dtype="bfloat16"``: matmuls in bf16; residual stream, norms'
  affine maps, softmax and loss in float32).
- data: RandAugment ``rand-m7-mstd0.5`` (filled with the normalisation mean), mixup
  0.1 / cutmix 1.0 with label smoothing 0.1 (applied on device in the train step),
  normalisation mean = std = 0.5, eval resize 248 bicubic + centre crop 224
  (``crop_pct`` 0.9); top-1 on ImageNet val every epoch (the run's summary reports
  the best and the final) and on ImageNet-V2 (``extra_test``).

``batch_size`` 256 is the command's ``--batch-size``, timm's per-process batch: the
reference's number of GPUs is not published, so 256 x 8 = 2048 images per update
assumes one process (lr 0.005 is given explicitly, not scaled by the batch).

``tiny`` (CI): digits, a 2-block ViT with patch 4 and width 16 (seed 003's init), 1
epoch, float32.
"""

from __future__ import annotations

import ml_collections

from sing_jax.data import augment
from sing_jax.nn.models import reference_aux_loss_weights
from sing_jax.train.loop import default_config, split_config_arg

TABLE = {
    # (patch, embed, depth): {norm: (ImageNet-1k top-1, ImageNet-V2 top-1 or None)}
    (16, 192, 24): {"layer": (77.14, 64.9), "learnable_scaler": (78.77, 67.02)},
    (16, 192, 36): {"layer": (76.2, None), "learnable_scaler": (79.77, 68.21)},
    (16, 288, 24): {"layer": (78.2, 65.71), "learnable_scaler": (79.72, 68.16)},
    (32, 288, 24): {"layer": (69.93, 55.81), "learnable_scaler": (74.53, 60.82)},
    (32, 288, 36): {"layer": (67.86, 53.35), "learnable_scaler": (75.71, 62.76)},
}
NORMS = ("layer", "learnable_scaler")
# The published command's flags; the loss weights are derived from them.
TRAIN_FEATURE_DECAY = 0.1
ATTN_EXTRA_LOSS = 0.03
ATTN_EXTRA_LOSS_LAYERS = 6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, tiny = split_config_arg(arg, "16,192,24,learnable_scaler")
    if len(parts) != 4:
        raise ValueError("learnable_scaler_vit config takes '<patch>,<embed>,<depth>,<norm>"
                         f"[,tiny]', got {arg!r}")
    patch, embed, depth = (int(p) for p in parts[:3])
    norm = parts[3]
    if (patch, embed, depth) not in TABLE:
        raise ValueError(f"({patch}, {embed}, {depth}) is not a row of the seed 004 table; "
                         f"rows: {sorted(TABLE)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid names: {list(NORMS)}")
    c = default_config()
    c.dataset.name = "imagenet"
    c.dataset.mean, c.dataset.std = augment.INCEPTION_MEAN, augment.INCEPTION_STD
    c.dataset.eval_crop_pct, c.dataset.eval_interpolation = 0.9, "bicubic"
    c.dataset.extra_test = ("imagenet_v2",)
    c.model = ml_collections.ConfigDict(dict(
        name="vit", patch_size=patch, embed_dim=embed, depth=depth, num_heads=3, norm=norm,
        attn_extra_loss_layers=ATTN_EXTRA_LOSS_LAYERS, init="timm", matmul_dtype="bfloat16",
        gelu_approximate=False))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="lamb", learning_rate=5e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.02,
        max_grad_norm=1.0, clip_grad_norm=14.0, grad_accum_steps=8))
    c.schedule = ml_collections.ConfigDict(dict(name="custom", factor=0.8, threshold=0.5))
    c.aux_loss.update(reference_aux_loss_weights(TRAIN_FEATURE_DECAY, ATTN_EXTRA_LOSS))
    c.compute_dtype = "float32"  # bf16 autocast lives in the model (matmul_dtype)
    c.batch_size = 256
    c.eval_batch_size = 512  # divides over 1, 2, 4 and 8 devices
    c.num_epochs = 300
    c.checkpoint.every_steps = 5000
    c.logging.every_steps = 200
    if tiny:
        c.dataset.name = "digits"
        c.dataset.mean, c.dataset.std = (), ()
        c.dataset.eval_crop_pct, c.dataset.eval_interpolation = 0.0, ""
        c.dataset.extra_test = ()
        # seed 003's init: from timm's 0.02-std init, the 10 LAMB updates of a CI run
        # (relative steps of lr = 0.005) leave the loss at log(10)
        c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, embed_dim=16,
                                                 depth=2, num_heads=2, norm=norm,
                                                 attn_extra_loss_layers=1, init="default"))
        c.optimizer.grad_accum_steps = 2
        c.batch_size, c.eval_batch_size, c.num_epochs = 64, 512, 1
        c.logging.every_steps = 5
    return c
