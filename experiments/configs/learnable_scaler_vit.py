"""Seed 004: ViT with LayerNorm vs LearnableScaler on ImageNet-1k, and its recipe.

``get_config("<patch>,<embed>,<depth>,<norm>[,tiny]")`` with ``(patch, embed, depth)``
one of the table's rows (:data:`TABLE`) and norm ``layer`` or ``learnable_scaler``.

Recipe (spec section 7): LAMB, lr 5e-3 (LearnableScaler runs: the seed advises
0.003-0.004 of LayerNorm's 0.005, so 4e-3), weight decay 0.02, gradient clipping 14,
gradient accumulation 8 (x 256 = 2048 images per update), the ``custom`` schedule
(factor 0.8, threshold 0.5), bf16 mixed precision, 300 epochs, feature-decay loss 0.1
and attention loss 0.03 on the first 6 blocks, RandAugment (in the ImageNet pipeline),
mixup 0.1 / cutmix 1.0 with label smoothing 0.1 (the ImageNet spec of ``sing_jax.data``,
applied on device in the train step; ``dataset.mix=False`` turns it off).

``tiny`` (CI): digits, a 2-block ViT with patch 4 and width 16, 1 epoch, float32.
"""

from __future__ import annotations

import ml_collections

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
    c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=patch, embed_dim=embed,
                                             depth=depth, num_heads=3, norm=norm,
                                             attn_extra_loss_layers=6))
    lr = 5e-3 if norm == "layer" else 4e-3
    c.optimizer = ml_collections.ConfigDict(dict(name="lamb", learning_rate=lr,
                                                 weight_decay=0.02, clip_grad_norm=14.0,
                                                 grad_accum_steps=8))
    c.schedule = ml_collections.ConfigDict(dict(name="custom", factor=0.8, threshold=0.5))
    c.aux_loss.feature_decay = 0.1
    c.aux_loss.attn_extra = 0.03
    c.compute_dtype = "bfloat16"
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 300
    c.checkpoint.every_steps = 5000
    c.logging.every_steps = 200
    if tiny:
        c.dataset.name = "digits"
        c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, embed_dim=16,
                                                 depth=2, num_heads=2, norm=norm,
                                                 attn_extra_loss_layers=1))
        c.optimizer.grad_accum_steps = 2
        c.compute_dtype = "float32"
        c.batch_size, c.eval_batch_size, c.num_epochs = 64, 512, 1
        c.logging.every_steps = 5
    return c
