"""SING (seed 000) recipes: warmup 5% + cosine, or warmup 5% + constant 60% + cosine.

``get_config("<dataset>,<model>[,<schedule>][,tiny]")``: dataset ``cifar10``,
``cifar100`` or ``imagenet``; model ``resnet18`` / ``resnet20`` / ``vgg16`` (CIFAR) or
``resnet18`` / ``vit`` (ImageNet); schedule ``cosine`` (warmup + cosine, default) or
``constant_cosine`` (warmup + 60% constant + cosine). SING's learning rate is about 10x
AdamW's and its weight decay about 10x lower (seed 000); the values below are the
middle of the seed's search spaces ({5e-3, 1e-2, 5e-2, 1e-1} and
{5e-4, 5e-3, 5e-2, 5e-1}). ``tiny``: digits, a narrow ResNet-20, 1 epoch.
"""

from __future__ import annotations

import ml_collections

from sing_jax.train.loop import default_config, split_config_arg

RECIPES = {
    # dataset: (epochs, batch, lr, weight decay, label smoothing)
    "cifar10": (200, 128, 5e-2, 5e-3, 0.0),
    "cifar100": (200, 128, 5e-2, 5e-3, 0.0),
    "imagenet": (90, 256, 5e-2, 5e-3, 0.1),
}
SCHEDULES = {"cosine": dict(name="warmup_cosine", warmup_fraction=0.05),
             "constant_cosine": dict(name="warmup_constant_cosine", warmup_fraction=0.05,
                                     constant_fraction=0.6)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, tiny = split_config_arg(arg, "cifar10,resnet18")
    if len(parts) not in (2, 3):
        raise ValueError(f"sing config takes '<dataset>,<model>[,<schedule>][,tiny]', got {arg!r}")
    dataset, model = parts[:2]
    schedule = parts[2] if len(parts) == 3 else "cosine"
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {sorted(RECIPES)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid names: {sorted(SCHEDULES)}")
    epochs, batch, lr, wd, smoothing = RECIPES[dataset]
    c = default_config()
    c.dataset.name = dataset
    c.model = ml_collections.ConfigDict(dict(name=model))
    c.optimizer = ml_collections.ConfigDict(dict(name="sing", learning_rate=lr,
                                                 weight_decay=wd))
    c.schedule = ml_collections.ConfigDict(SCHEDULES[schedule])
    c.batch_size, c.num_epochs, c.label_smoothing = batch, epochs, smoothing
    c.eval_batch_size = 1000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    c.logging.grad_norms = True  # seed 000: track the gradient norms through training
    if tiny:
        c.dataset.name = "digits"
        c.model = ml_collections.ConfigDict(dict(name="resnet20", width=4))
        c.batch_size, c.eval_batch_size, c.num_epochs = 64, 512, 1
        c.logging.every_steps = 5
    return c
