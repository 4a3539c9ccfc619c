"""SINGD (seed 002) on the benchmark CNNs, with a structure choice for K and C.

``get_config("<dataset>,<model>[,<structure>][,tiny]")``: dataset ``digits``,
``mnist1d`` (MLP), ``cifar10`` or ``cifar100``; model ``small_cnn``, ``mlp``,
``resnet20``, ``resnet18`` or ``vgg16``; structure one of ``dense``, ``diagonal``,
``block_diagonal``, ``hierarchical``, ``tril_toeplitz``, ``triu_toeplitz`` (both
factors). Hyper-parameters are the ``singd`` defaults (spec section 8) except the
learning rate; parameters outside Linear/Conv layers are trained by SINGD's
``other`` transform. ``tiny``: digits, small CNN, 1 epoch.
"""

from __future__ import annotations

import ml_collections

from sing_jax.train.loop import default_config, split_config_arg

STRUCTURES = ("dense", "diagonal", "block_diagonal", "hierarchical", "tril_toeplitz",
              "triu_toeplitz")
EPOCHS = {"digits": 12, "mnist1d": 12, "cifar10": 100, "cifar100": 100}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, tiny = split_config_arg(arg, "digits,small_cnn")
    if len(parts) not in (2, 3):
        raise ValueError(f"singd config takes '<dataset>,<model>[,<structure>][,tiny]', "
                         f"got {arg!r}")
    dataset, model = parts[:2]
    structure = parts[2] if len(parts) == 3 else "dense"
    if dataset not in EPOCHS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {sorted(EPOCHS)}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; valid names: {list(STRUCTURES)}")
    c = default_config()
    c.dataset.name = dataset
    c.model = ml_collections.ConfigDict(dict(name=model))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="singd", learning_rate=3e-2 if dataset in ("digits", "mnist1d") else 1e-2,
        momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-4, T=10, lr_cov=1e-2,
        structures=(structure, structure)))
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_fraction=0.05))
    c.batch_size = 128
    c.eval_batch_size = 1000 if dataset.startswith("cifar") else 512
    c.num_epochs = EPOCHS[dataset]
    if tiny:
        c.dataset.name = "digits"
        c.model = ml_collections.ConfigDict(dict(name="small_cnn", widths=(8, 16)))
        c.optimizer.T = 2
        c.batch_size, c.eval_batch_size, c.num_epochs = 64, 512, 1
        c.logging.every_steps = 5
    return c
