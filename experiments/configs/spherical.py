"""Seed 001's benchmark: AdamS / AdamSRT / SGDMRT and baselines with BatchNorm networks.

``get_config("<dataset>,<model>,<optimizer>[,clean][,adamg_as_written][,tiny]")``:
dataset ``cifar10``, ``cifar100``, ``svhn`` or ``imagenet``; model ``resnet20``
(CIFAR-10 only), ``resnet18`` or ``vgg16`` (not on ImageNet); optimizer one of
:data:`OPTIMIZERS` that the cell has (ImageNet: no ``adamw``, ``adamg``).

By default the config runs what the reference training script runs (spec section
6.1; ``docs/reproducing.md`` lists every row):

- **hyper-parameters of each cell** from the reference's table
  (:func:`sing_jax.train.seed001_optimizer`: PyTorch constructor kwargs, missing keys
  at the constructor's defaults, AdamW's decay decoupled and scaled by lr);
- **models**: ResNet-20 with 1x1 conv + BatchNorm projection shortcuts (272,474
  parameters), ResNet-18 with the CIFAR stem (ImageNet: the 7x7 stem and max-pool),
  VGG-16-BN with one linear classifier; PyTorch's default initialisation
  (``init='pytorch_default'``); BatchNorm tracking the unbiased running variance
  (``unbiased_running_var``), momentum 0.1 (PyTorch's), eps 1e-5;
- **channel-wise group**: every conv kernel, the 1x1 projections included
  (``channel_dims='conv'``), for adams/adamsrt/adamg/sgdmrt;
- **protocol**: batch 128 (ImageNet 256), eval batch 1024 (ImageNet 512), 405
  epochs, lr x0.1 at epochs 135, 225, 315; 5% of train held out for validation;
  CIFAR crop+flip and per-channel normalisation, SVHN train split without
  augmentation or normalisation, ImageNet random-resized crop + flip (no
  RandAugment, no mixup); the test accuracy of the best-validation epoch is reported;
- **data quirks of the script**, each behind its own key (``clean`` turns all four
  off, which is the clean protocol): ``dataset.keep_partial_batch`` (the last partial
  train batch is a step: 372 steps per CIFAR epoch), ``dataset.augment_validation``
  (the validation images are drawn from the augmented train set),
  ``dataset.validation_rounding='floor'`` (SVHN validation 3662 = int(0.05 * 73257)),
  ``batch_averaged_eval`` (accuracy = mean of per-batch accuracies).

AdamG: by default the paper's intent (spec section 5: conv kernels on the sphere,
everything else Adam with coupled L2). ``adamg_as_written`` runs the script as it is
written instead: its ``channel_wise=True`` selects AdamG's Adam branch for the conv
kernels, and every other leaf (BatchNorm scale and bias, the classifier) goes on the
sphere branch without weight decay, one-element channels included (BatchNorm biases
snap to +-1).

``tiny`` (CI, no CIFAR needed): the embedded ``digits`` dataset, 1 epoch, batch 64, a
narrow version of the model (VGG-16's five poolings need 32x32 inputs, so its tiny
mode uses the small CNN).
"""

from __future__ import annotations

import ml_collections

from sing_jax.train import seed001_hyperparameters, seed001_optimizer
from sing_jax.train.loop import default_config, split_config_flags

DATASETS = ("cifar10", "cifar100", "svhn", "imagenet")
MODELS = ("resnet20", "resnet18", "vgg16")
OPTIMIZERS = ("sgd", "adam", "adamw", "adamg", "sgdmrt", "adams", "adamsrt")
# The reference puts every conv kernel in the channel-wise group for these.
CHANNEL_OPTIMIZERS = ("adams", "adamsrt", "adamg", "sgdmrt")
FLAGS = ("clean", "adamg_as_written", "tiny")
# adamg_as_written: conv kernels take Adam (no spec), every other leaf the sphere branch.
ADAMG_AS_WRITTEN_RULES = ((r"(.*/)?conv/kernel", None), (r".*", (-1,)))

# The seed 001 table: (dataset, model) -> optimizer -> (mean, std) test accuracy in %.
PUBLISHED = {
    ("cifar10", "resnet20"): dict(sgd=(92.39, .12), adam=(90.98, .06), adamw=(90.19, .24),
                                  adamg=(91.64, .17), sgdmrt=(92.25, .12), adams=(91.15, .11),
                                  adamsrt=(91.81, .20)),
    ("cifar10", "resnet18"): dict(sgd=(95.10, .04), adam=(93.77, .20), adamw=(93.61, .12),
                                  adamg=(94.67, .12), sgdmrt=(94.93, .23), adams=(93.95, .23),
                                  adamsrt=(94.92, .05)),
    ("cifar10", "vgg16"): dict(sgd=(93.56, .05), adam=(92.83, .17), adamw=(92.53, .25),
                               adamg=(93.41, .17), sgdmrt=(93.68, .30), adams=(92.92, .11),
                               adamsrt=(93.75, .06)),
    ("cifar100", "resnet18"): dict(sgd=(77.08, .18), adam=(71.30, .36), adamw=(67.39, .27),
                                   adamg=(73.76, .34), sgdmrt=(77.09, .15), adams=(74.44, .22),
                                   adamsrt=(75.28, .35)),
    ("cifar100", "vgg16"): dict(sgd=(73.77, .10), adam=(68.43, .16), adamw=(71.37, .22),
                                adamg=(70.17, .20), sgdmrt=(73.32, .29), adams=(68.73, .27),
                                adamsrt=(71.45, .13)),
    ("svhn", "resnet18"): dict(sgd=(95.96, .15), adam=(95.32, .23), adamw=(95.38, .15),
                               adamg=(95.73, .05), sgdmrt=(96.17, .12), adams=(95.75, .09),
                               adamsrt=(95.84, .07)),
    ("svhn", "vgg16"): dict(sgd=(95.95, .09), adam=(95.57, .20), adamw=(95.60, .08),
                            adamg=(95.70, .25), sgdmrt=(95.95, .12), adams=(95.66, .09),
                            adamsrt=(95.82, .05)),
    # The reference README's ImageNet column (no AdamW, AdamG or SGD-MRT entry).
    ("imagenet", "resnet18"): dict(sgd=(69.86, .06), adam=(68.52, .10), adams=(68.82, .22),
                                   adamsrt=(68.93, .19)),
}
ROW_NAMES = dict(sgd="SGD-M", adam="Adam", adamw="AdamW", adamg="AdamG",
                 sgdmrt="SGD-MRT (ours)", adams="Adam-S (ours)", adamsrt="Adam-SRT (ours)")


def grid(arg: str) -> list[str]:
    """The get_config args of one table column ``'<dataset>,<model>'`` (every optimizer
    the reference has hyper-parameters for)."""
    dataset, model = arg.split(",")
    if (dataset, model) not in PUBLISHED:
        raise ValueError(f"no seed 001 column {arg!r}; columns: "
                         f"{[','.join(k) for k in PUBLISHED]}")
    cells = seed001_hyperparameters()[dataset][model]
    return [f"{dataset},{model},{o}" for o in ROW_NAMES if o in cells]


def optimizer_config(dataset: str, model: str, optimizer: str,
                     adamg_as_written: bool = False) -> dict:
    """The ``config.optimizer`` section of one cell: the reference's hyper-parameters and
    channel-wise group."""
    section = seed001_optimizer(dataset, model, optimizer)
    if optimizer in CHANNEL_OPTIMIZERS:
        section["channel_dims"] = "conv"
    if adamg_as_written:
        if optimizer != "adamg":
            raise ValueError(f"adamg_as_written is a switch of the adamg cells, not of "
                             f"{optimizer!r}")
        section.update(channel_dims="rules",
                       channel_rules=[list(rule) for rule in ADAMG_AS_WRITTEN_RULES],
                       single_element_spheres=True)
    return section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts, flags = split_config_flags(arg, "cifar10,resnet20,adamsrt", FLAGS)
    if len(parts) != 3:
        raise ValueError("spherical config takes '<dataset>,<model>,<optimizer>"
                         f"[,clean][,adamg_as_written][,tiny]', got {arg!r}")
    dataset, model, optimizer = parts
    for value, valid, what in ((dataset, DATASETS, "dataset"), (model, MODELS, "model"),
                               (optimizer, OPTIMIZERS, "optimizer")):
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; valid names: {sorted(valid)}")
    if model == "resnet20" and dataset != "cifar10":
        raise ValueError("the seed 001 table has ResNet-20 on cifar10 only")
    if dataset == "imagenet" and model != "resnet18":
        raise ValueError("the seed 001 table has ImageNet with resnet18 only")
    c = default_config()
    c.dataset.name = dataset
    c.dataset.augment = dataset != "svhn"
    quirks = "clean" not in flags
    c.dataset.keep_partial_batch = quirks
    c.dataset.augment_validation = quirks
    c.dataset.validation_rounding = "floor" if quirks else "round"
    c.batch_averaged_eval = quirks
    c.model = ml_collections.ConfigDict(dict(
        name=model, init="pytorch_default", unbiased_running_var=True))
    if model == "resnet20":
        c.model.shortcut = "projection"
    c.optimizer = ml_collections.ConfigDict(
        optimizer_config(dataset, model, optimizer, "adamg_as_written" in flags))
    c.schedule = ml_collections.ConfigDict(dict(name="step", decay_epochs=(135, 225, 315),
                                                decay_factor=0.1))
    c.batch_size = 128
    c.eval_batch_size = 1024
    if dataset == "imagenet":
        c.model.variant = "imagenet"
        # torchvision's ResNet recipe: random-resized crop + flip, nothing more.
        c.dataset.mix = False
        c.dataset.rand_augment = False
        c.batch_size = 256
        c.eval_batch_size = 512
    c.num_epochs = 405
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    if "tiny" in flags:
        c.dataset.name = "digits"
        if model == "vgg16":
            c.model = ml_collections.ConfigDict(dict(
                name="small_cnn", widths=(8, 16), init="pytorch_default",
                unbiased_running_var=True))
        else:
            c.model.width = 4
        c.schedule.decay_epochs = (1,)
        c.batch_size = 64
        c.eval_batch_size = 512
        c.num_epochs = 1
        c.logging.every_steps = 5
    return c
