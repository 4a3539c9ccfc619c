"""Quickstart: every optimizer family on the embedded datasets (no network).

``get_config("<dataset>,<optimizer>[,tiny]")`` with dataset ``digits`` (8x8 images,
a small CNN with BatchNorm) or ``mnist1d`` (length-40 signals, an MLP with
BatchNorm) and optimizer one of :data:`OPTIMIZERS`. ``tiny`` trains 1 epoch (CI).

    python -m experiments.train --config=experiments/configs/quickstart.py:digits,sing \\
        --workdir=/tmp/qs_digits_sing
"""

from __future__ import annotations

import ml_collections

from sing_jax.train.loop import default_config, split_config_arg

DATASETS = {
    # name: (model section, epochs, batch size)
    "digits": (dict(name="small_cnn", widths=(16, 32)), 12, 64),
    # An MLP: SINGD preconditions Linear and 2-D Conv layers only (no 1-D convs).
    "mnist1d": (dict(name="mlp", hidden=(256, 128), norm="batch"), 12, 128),
}

# Hyper-parameters: seed 000's advice for SING (lr about 10x AdamW's, wd 10x lower),
# seed 001's for the spherical optimizers (conv kernels are the channel-wise group),
# the singd defaults with a larger lr for SINGD.
OPTIMIZERS = {
    "adamw": dict(name="adamw", learning_rate=3e-3, weight_decay=5e-2),
    "sing": dict(name="sing", learning_rate=3e-2, weight_decay=5e-3),
    "adamsrt": dict(name="adamsrt", learning_rate=3e-3, b2=0.99, weight_decay=1e-4,
                    channel_dims="conv"),
    "sgdmrt": dict(name="sgdmrt", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                   channel_dims="conv"),
    "singd": dict(name="singd", learning_rate=3e-2, momentum=0.9, damping=1e-3,
                  weight_decay=1e-4, T=5, lr_cov=1e-2, structures=("dense", "dense")),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, tiny = split_config_arg(arg, "digits,adamw")
    if len(parts) != 2:
        raise ValueError(f"quickstart config takes '<dataset>,<optimizer>[,tiny]', got {arg!r}")
    dataset, optimizer = parts
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {sorted(DATASETS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid names: {sorted(OPTIMIZERS)}")
    model, epochs, batch_size = DATASETS[dataset]
    c = default_config()
    c.dataset.name = dataset
    c.model = ml_collections.ConfigDict(model)
    c.optimizer = ml_collections.ConfigDict(OPTIMIZERS[optimizer])
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_fraction=0.05))
    c.batch_size = batch_size
    c.eval_batch_size = 512
    c.num_epochs = 1 if tiny else epochs
    c.num_devices = 1
    c.logging.every_steps = 10
    # Tiny models, one-second epochs: an asynchronous save's threads would run during
    # the next epoch's steps and inflate the ms/step column (digits, AdamW: 6.4-7.8
    # against 3.7-3.8 ms), for the same total time.
    c.checkpoint.async_save = False
    return c
