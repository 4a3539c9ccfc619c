"""SING (seed 000) recipes: warmup 5% + cosine, or warmup 5% + constant 60% + cosine.

``get_config("<dataset>,<model>[,<schedule>][,freeze_ln][,tiny]")``: dataset
``cifar10``, ``cifar100`` or ``imagenet``; model ``resnet18`` / ``resnet20`` /
``vgg16`` (CIFAR) or ``resnet18`` / ``vit`` (ImageNet); schedule ``cosine``
(warmup + cosine, default) or ``constant_cosine`` (warmup + 60% constant + cosine).

Learning rate and weight decay: 1e-1 and 5e-3 everywhere, the only pair seed 000
states (its usage example). The seed's advice is to tune them: lr in {5e-3, 1e-2,
5e-2, 1e-1} (the highest that does not diverge, about 10x AdamW's) and weight decay
in {5e-4, 5e-3, 5e-2, 5e-1} (about 10x below AdamW's); override with
``--config.optimizer.learning_rate`` / ``.weight_decay``.

Models: ``imagenet,resnet18`` is the ImageNet ResNet-18 (7x7 stride-2 stem and a
3x3 stride-2 max-pool), the CIFAR ones keep the 3x3 stem. ``imagenet,vit`` is
ViT-Ti/16 (depth 12, width 192, 3 heads) with timm's init.

Augmentation (seed 000 names none, so each ImageNet config says which it uses):

- CIFAR: random crop (pad 4) + horizontal flip.
- ``imagenet,resnet18``: random-resized crop + flip only (no RandAugment, no
  mixup/cutmix), label smoothing 0.1: the torchvision ImageNet ResNet recipe.
- ``imagenet,vit``: the DeiT/timm recipe a ViT needs on ImageNet-1k: random-resized
  crop + flip + RandAugment (m7, mstd 0.5), mixup 0.1 / cutmix 1.0 with label
  smoothing 0.1.

``freeze_ln`` applies the seed's advice for LayerNorm models whose gradient norm
grows while the loss falls: every LayerNorm's scale and bias is left untouched by
the optimizer (the normalisation itself still runs). ``logging.grad_norms`` tracks
the per-leaf gradient norms that the advice watches.

``tiny``: digits, 1 epoch, a narrow ResNet-20 (or a 2-block ViT for ``vit``).
"""

from __future__ import annotations

import ml_collections

from sing_jax.train.loop import default_config, split_config_flags

# seed 000's only stated pair (its usage example)
LEARNING_RATE = 1e-1
WEIGHT_DECAY = 5e-3
RECIPES = {
    # dataset: (epochs, batch, label smoothing)
    "cifar10": (200, 128, 0.0),
    "cifar100": (200, 128, 0.0),
    "imagenet": (90, 256, 0.1),
}
MODELS = {"cifar10": ("resnet18", "resnet20", "vgg16"),
          "cifar100": ("resnet18", "resnet20", "vgg16"),
          "imagenet": ("resnet18", "vit")}
SCHEDULES = {"cosine": dict(name="warmup_cosine", warmup_fraction=0.05),
             "constant_cosine": dict(name="warmup_constant_cosine", warmup_fraction=0.05,
                                     constant_fraction=0.6)}
# every LayerNorm's affine parameters in nnx paths ('blocks/0/norm1/scale', 'norm/bias')
LAYER_NORM_AFFINE = r"(.*/)?norm\d*/(scale|bias)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, flags = split_config_flags(arg, "cifar10,resnet18", ("tiny", "freeze_ln"))
    tiny, freeze_ln = "tiny" in flags, "freeze_ln" in flags
    if len(parts) not in (2, 3):
        raise ValueError("sing config takes '<dataset>,<model>[,<schedule>][,freeze_ln]"
                         f"[,tiny]', got {arg!r}")
    dataset, model = parts[:2]
    schedule = parts[2] if len(parts) == 3 else "cosine"
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {sorted(RECIPES)}")
    if model not in MODELS[dataset]:
        raise ValueError(f"model {model!r} is not a {dataset} model of this config; "
                         f"valid names: {list(MODELS[dataset])}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid names: {sorted(SCHEDULES)}")
    if freeze_ln and model != "vit":
        raise ValueError(f"freeze_ln freezes LayerNorm affine parameters; {model!r} has no "
                         "LayerNorm (use it with 'vit')")
    epochs, batch, smoothing = RECIPES[dataset]
    c = default_config()
    c.dataset.name = dataset
    c.model = ml_collections.ConfigDict(dict(name=model))
    if dataset == "imagenet" and model == "resnet18":
        c.model.variant = "imagenet"
        c.dataset.rand_augment, c.dataset.mix = False, False
    elif model == "vit":
        c.model.update(patch_size=16, embed_dim=192, depth=12, num_heads=3, init="timm")
        c.dataset.rand_augment, c.dataset.mix = True, True
    c.optimizer = ml_collections.ConfigDict(dict(name="sing", learning_rate=LEARNING_RATE,
                                                 weight_decay=WEIGHT_DECAY))
    if freeze_ln:
        c.optimizer.freeze = LAYER_NORM_AFFINE
    c.schedule = ml_collections.ConfigDict(SCHEDULES[schedule])
    c.batch_size, c.num_epochs, c.label_smoothing = batch, epochs, smoothing
    c.eval_batch_size = 1000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    c.logging.grad_norms = True  # seed 000: track the gradient norms through training
    if tiny:
        c.dataset.name = "digits"
        if model == "vit":
            c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, embed_dim=16,
                                                     depth=2, num_heads=2, init="timm"))
        else:
            c.model = ml_collections.ConfigDict(dict(name="resnet20", width=4))
        c.batch_size, c.eval_batch_size, c.num_epochs = 64, 512, 1
        c.logging.every_steps = 5
    return c
