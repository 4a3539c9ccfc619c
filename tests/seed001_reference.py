"""A PyTorch re-implementation of the seed 001 reference training step, and our step beside it.

Written from ``../shared/spec/algorithms.md`` sections 3-6.1 (not copied from the
reference): the reference's ResNet-20 / ResNet-18 / VGG-16-BN structure and parameter
names, its channel-wise group (every parameter whose name contains ``conv`` or
``downsample.0``), ``torch.optim.AdamW`` / our float64 NumPy re-derivations of
AdamSRT, SGDMRT and AdamG (:mod:`tests.numpy_reference`), ``MultiStepLR`` stepped per
epoch, ``nn.CrossEntropyLoss``, a train loader that keeps the last partial batch.

``python -m tests.seed001_reference CELL...`` (with ``JAX_ENABLE_X64=1`` and two
simulated CPU devices, as :mod:`tests.test_seed001_reproduction` runs it) trains each
cell ``<model>:<optimizer>[:adamg_as_written]`` for a few steps on random 32x32x3
images with both implementations from the same initial weights and the same batches,
in float64, and prints one JSON line per cell with the largest relative differences.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import nn

from tests import numpy_reference

# ---------------------------------------------------------------------------------
# The reference's models (spec section 6.1), PyTorch layout and names


class TorchBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a 1x1 conv (stride s, no bias) + BN projection
    when the stride or the width changes, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))
        else:
            self.downsample = nn.Sequential()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class TorchResNet(nn.Module):
    """ResNet-20 (16 planes, 3 stages of 3 blocks, 8x8 average pool) and ResNet-18 (64
    planes, 4 stages of 2 blocks; CIFAR: 3x3 stem and 4x4 pool, ImageNet ``large``: 7x7
    stride-2 stem, 3x3 stride-2 max-pool, adaptive pool)."""

    def __init__(self, planes: int, blocks: list[int], num_classes: int, pool: int | None,
                 large: bool = False):
        super().__init__()
        if large:
            self.conv1 = nn.Conv2d(3, planes, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if large else None
        layers, in_planes = [], planes
        for i, n in enumerate(blocks):
            width = planes * 2 ** i
            stage = [TorchBasicBlock(in_planes, width, 1 if i == 0 else 2)]
            stage += [TorchBasicBlock(width, width, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            in_planes = width
        self.blocks_layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1)) if pool is None else nn.AvgPool2d(pool)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.avgpool(self.blocks_layers(x))
        return self.linear(torch.flatten(x, 1))


class TorchVGGBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
         "M")


class TorchVGG16(nn.Module):
    """VGG-16-BN for 32x32 images and one ``Linear(512, classes)``."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers, in_channels = [], 3
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(TorchVGGBlock(in_channels, item))
                in_channels = item
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def torch_model(model: str, num_classes: int, large: bool = False) -> nn.Module:
    """The reference's ``resnet20``, ``resnet18`` (``large``: ImageNet) or ``vgg16``."""
    if model == "resnet20":
        return TorchResNet(16, [3, 3, 3], num_classes, pool=8)
    if model == "resnet18":
        return TorchResNet(64, [2, 2, 2, 2], num_classes, pool=None if large else 4,
                           large=large)
    if model == "vgg16":
        return TorchVGG16(num_classes)
    raise ValueError(f"no reference model {model!r}")


def in_channel_group(name: str) -> bool:
    """The reference script's channel-wise group."""
    return "conv" in name or "downsample.0" in name


# ---------------------------------------------------------------------------------
# Our parameter paths -> the reference's names and layouts

_PARAM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var", "kernel": "weight"}


def torch_name(path: str, model: str) -> str:
    """Our '/'-joined leaf path of ``model`` (a ResNet or the VGG of
    ``sing_jax.nn.models``) -> the reference's ``state_dict`` key."""
    parts = path.split("/")
    leaf = _PARAM_NAMES[parts[-1]]
    if parts[0] == "head":
        return ("classifier." if model == "vgg16" else "linear.") + leaf
    if parts[0] == "stem":
        return ("conv1." if parts[1] == "conv" else "bn1.") + leaf
    if parts[0] == "features":  # VGG: the same positions as the reference's Sequential
        return f"features.{parts[1]}.{'conv' if parts[2] == 'conv' else 'bn'}.{leaf}"
    _, stage, block, layer, kind = parts[:5]
    prefix = f"blocks_layers.{stage}.{block}."
    if layer == "shortcut":
        return prefix + ("downsample.0." if kind == "conv" else "downsample.1.") + leaf
    number = layer[-1]  # conv_norm1 -> 1
    return prefix + (f"conv{number}." if kind == "conv" else f"bn{number}.") + leaf


def torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax kernel layouts -> PyTorch's: conv (kh, kw, in, out) -> (out, in, kh, kw),
    dense (in, out) -> (out, in); vectors unchanged."""
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


# ---------------------------------------------------------------------------------
# One cell, both implementations


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(reference)), 1e-300)
    return float(np.linalg.norm(np.asarray(ours) - reference)) / scale


def run_cell(model: str, optimizer: str, *, adamg_as_written: bool = False, steps: int = 20,
             batch_size: int = 4, num_examples: int = 10, decay_epochs=(2, 4),
             seed: int = 0) -> dict:
    """Trains one seed 001 cell ``cifar10,<model>,<optimizer>`` with both implementations.

    The config is the seed 001 config, made small only in its data: ``num_examples``
    random images, ``batch_size`` per step over two devices (the last batch of each
    epoch partial, padded and masked on our side), and the milestones moved to
    ``decay_epochs`` so that a few steps cross them. Returns the largest relative
    differences (leaf norms for parameters and BatchNorm statistics) over the steps.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.configs import spherical
    from sing_jax._src.paths import leaf_paths
    from sing_jax.data import train_batch_plan, train_steps_per_epoch
    from sing_jax.train import (
        StepOptions,
        TrainState,
        data_mesh,
        make_train_step,
        registry,
        seed001_hyperparameters,
        set_batch_norm_axis,
        to_host,
    )
    from sing_jax.train import optimizers as train_optimizers

    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    torch.set_default_dtype(torch.float64)
    config = spherical.get_config(f"cifar10,{model},{optimizer}"
                                  + (",adamg_as_written" if adamg_as_written else ""))
    config.batch_size = batch_size
    config.schedule.decay_epochs = tuple(decay_epochs)
    steps_per_epoch = train_steps_per_epoch(num_examples, batch_size,
                                            config.dataset.keep_partial_batch)

    # Ours, built from the config as the training loop builds it.
    model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    net = registry.build_model(config.model.name, 10, (32, 32, 3),
                               {**model_kwargs, "param_dtype": jnp.float64}, seed)
    schedule = train_optimizers.build_schedule(config.schedule, config.optimizer.learning_rate,
                                               steps_per_epoch, config.num_epochs)
    params0 = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    tx = train_optimizers.build_optimizer(config.optimizer, schedule, params0)
    set_batch_norm_axis(net, config.sync_batch_stats)
    state = TrainState.create(net, tx, rng=seed)
    mesh = data_mesh(jax.devices()[:2])
    step_fn = make_train_step(tx, mesh=mesh, options=StepOptions(
        sync_batch_stats=config.sync_batch_stats,
        masked_batch_stats=config.dataset.keep_partial_batch))
    state = step_fn.place_state(state)

    # The reference, with our initial weights.
    reference = torch_model(model, 10).double()
    reference.train()
    named = dict(reference.named_parameters())
    buffers = dict(reference.named_buffers())
    param_paths = leaf_paths(state.params)
    stat_paths = leaf_paths(state.model_state)
    with torch.no_grad():
        for path, value in zip(param_paths, jax.tree.leaves(to_host(state.params))):
            named[torch_name(path, model)].copy_(torch.from_numpy(torch_layout(value).copy()))
        for path, value in zip(stat_paths, jax.tree.leaves(to_host(state.model_state))):
            buffers[torch_name(path, model)].copy_(torch.from_numpy(np.asarray(value).copy()))
    assert {torch_name(p, model) for p in param_paths} == set(named), "every parameter mapped"
    names = list(named)
    hyper = dict(seed001_hyperparameters()["cifar10"][model][optimizer])
    base_lr = hyper.pop("lr")
    if optimizer == "adamw":
        torch_opt = torch.optim.AdamW(reference.parameters(), lr=base_lr, **hyper)
        numpy_opt = None
    else:
        # MultiStepLR drives this optimizer of a dummy parameter; its lr feeds numpy_opt.
        torch_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        grouped = [in_channel_group(n) for n in names]
        if adamg_as_written:  # the script's channel_wise=True: Adam for conv, sphere for rest
            specs = [None if g else (0,) for g in grouped]
        else:
            specs = [(0,) if g else None for g in grouped]
        start = [named[n].detach().numpy().copy() for n in names]
        b1, b2 = hyper.get("betas", (0.9, 0.999))
        wd = hyper.get("weight_decay", 0.0)
        if optimizer == "adamsrt":
            numpy_opt = numpy_reference.NumpyAdamS(start, specs, base_lr, b1, b2, 1e-8, wd,
                                                   rt=True)
        elif optimizer == "sgdmrt":
            numpy_opt = numpy_reference.NumpySGDMRT(start, specs, base_lr, hyper["momentum"],
                                                    0.0, wd)
        elif optimizer == "adamg":
            numpy_opt = numpy_reference.NumpyAdamG(start, specs, base_lr, b1, b2, 1e-8, wd,
                                                   single_element_spheres=adamg_as_written)
        else:
            raise ValueError(f"no reference optimizer for {optimizer!r} here")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=list(decay_epochs),
                                                     gamma=0.1)

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_examples, 32, 32, 3))
    labels = rng.integers(0, 10, num_examples).astype(np.int32)
    worst = {"loss": 0.0, "params": 0.0, "batch_stats": 0.0, "lr": 0.0}
    learning_rates, real_counts, per_step = [], [], []
    timings = {"ours_s": 0.0, "reference_s": 0.0, "ours_first_step_s": 0.0}
    for step in range(steps):
        positions, mask = train_batch_plan(step, num_examples=num_examples,
                                           global_batch_size=batch_size, process_index=0,
                                           process_count=1, seed=seed,
                                           keep_partial_batch=True)
        real = positions[mask]
        real_counts.append(int(mask.sum()))
        # reference step
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        x = torch.from_numpy(images[real].transpose(0, 3, 1, 2).copy())
        loss = nn.functional.cross_entropy(reference(x), torch.from_numpy(labels[real]).long())
        reference.zero_grad()
        loss.backward()
        torch_opt.step()
        if numpy_opt is not None:
            numpy_opt.hp["lr"] = lr
            new = numpy_opt.step([named[n].grad.numpy() for n in names])
            with torch.no_grad():
                for n, value in zip(names, new):
                    named[n].copy_(torch.from_numpy(value))
        if (step + 1) % steps_per_epoch == 0:
            scheduler.step()
        timings["reference_s"] += time.perf_counter() - t0
        # our step
        t0 = time.perf_counter()
        ours_lr = float(schedule(int(to_host(state.step))))
        state, metrics = step_fn(state, {"image": images[positions], "label": labels[positions],
                                         "mask": mask})
        ours_loss = float(to_host(metrics["loss"]))
        timings["ours_s" if step else "ours_first_step_s"] += time.perf_counter() - t0
        learning_rates.append(lr)
        worst["lr"] = max(worst["lr"], abs(ours_lr - lr) / lr)
        worst["loss"] = max(worst["loss"], abs(ours_loss - loss.item()) / abs(loss.item()))
        for path, value in zip(param_paths, jax.tree.leaves(to_host(state.params))):
            worst["params"] = max(worst["params"], _relative(
                torch_layout(value), named[torch_name(path, model)].detach().numpy()))
        for path, value in zip(stat_paths, jax.tree.leaves(to_host(state.model_state))):
            worst["batch_stats"] = max(worst["batch_stats"], _relative(
                value, buffers[torch_name(path, model)].numpy()))
        per_step.append(dict(worst))
    cell = f"{model}:{optimizer}" + (":adamg_as_written" if adamg_as_written else "")
    return {"cell": cell, "per_step": per_step, "steps": steps, "worst_relative": worst,
            "learning_rates": learning_rates, "real_examples_per_step": real_counts,
            "dtype": str(jax.tree.leaves(state.params)[0].dtype),
            "devices": int(mesh.devices.size), **timings}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # the test machines have few cores; threads only contend
    for cell in argv:
        model, optimizer, *flags = cell.split(":")
        kwargs = {}
        if model == "resnet18":  # the real structure, few steps on fewer images
            kwargs = dict(steps=4, batch_size=4, num_examples=6, decay_epochs=(1,))
        t0 = time.perf_counter()
        result = run_cell(model, optimizer, adamg_as_written="adamg_as_written" in flags,
                          **kwargs)
        result["wall_s"] = time.perf_counter() - t0
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
