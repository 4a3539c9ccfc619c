"""Seed 001 as its reference script runs it (spec section 6.1).

The proof: :mod:`tests.seed001_reference` trains cells of the seed 001 config with our
step (two CPU devices, float64) and with a PyTorch re-implementation of the reference
training step fed the same initial weights and batches; losses, parameters, BatchNorm
running statistics and the learning rate must agree to 1e-9 relative over 20 steps that
cross two milestones and three partial batches (ResNet-18: its real structure, 4 steps,
one milestone, a partial batch that leaves one device without a real example).
Also: every model the config builds has the reference's parameter count and shapes,
and its initialisation is PyTorch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from experiments.configs import spherical  # noqa: E402
from sing_jax._src.paths import leaf_paths  # noqa: E402
from sing_jax.nn.models import count_params  # noqa: E402
from sing_jax.train import registry, seed001_hyperparameters  # noqa: E402
from tests import seed001_reference  # noqa: E402

TOLERANCE = 1e-9


def _run_reference(cells: list[str]) -> list[dict]:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "tests.seed001_reference", *cells], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("cells", [
    ["resnet20:adamsrt", "resnet20:sgdmrt", "resnet20:adamg", "resnet20:adamw"],
    ["resnet20:adamg:adamg_as_written", "resnet18:adamsrt"],
], ids=["resnet20-four-cells", "adamg-as-written-and-resnet18"])
def test_our_step_equals_the_reference_training_step(cells):
    results = _run_reference(cells)
    assert [r["cell"] for r in results] == cells
    for result in results:
        worst = result["worst_relative"]
        assert all(value < TOLERANCE for value in worst.values()), result
        assert result["dtype"] == "float64" and result["devices"] == 2
        rates = result["learning_rates"]
        assert len(set(rates)) >= 2 and rates == sorted(rates, reverse=True)  # milestones
        counts = result["real_examples_per_step"]
        assert min(counts) < max(counts)  # partial batches were kept, not dropped


# ------------------------------------------------------------------ the models the config builds
def _config_model(arg: str):
    config = spherical.get_config(arg)
    kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    num_classes = {"cifar100": 100, "imagenet": 1000}.get(config.dataset.name, 10)
    shape = (224, 224, 3) if config.dataset.name == "imagenet" else (32, 32, 3)
    return nnx.eval_shape(lambda: registry.build_model(config.model.name, num_classes, shape,
                                                       kwargs, 0))


COLUMNS = [(d, m) for d in seed001_hyperparameters() for m in seed001_hyperparameters()[d]]


@pytest.mark.parametrize("dataset,model", COLUMNS, ids=[f"{d}-{m}" for d, m in COLUMNS])
def test_every_model_has_the_reference_parameters(dataset, model):
    ours = _config_model(f"{dataset},{model},sgd")
    num_classes = {"cifar100": 100, "imagenet": 1000}.get(dataset, 10)
    reference = seed001_reference.torch_model(model, num_classes, large=dataset == "imagenet")
    expected = sum(p.numel() for p in reference.parameters())
    assert count_params(ours) == expected
    published = {("cifar10", "resnet20"): 272_474, ("cifar10", "resnet18"): 11_173_962,
                 ("cifar10", "vgg16"): 14_724_042, ("imagenet", "resnet18"): 11_689_512}
    assert published.get((dataset, model), expected) == expected
    # leaf by leaf: every parameter and BatchNorm statistic has the reference's shape
    state = dict(reference.state_dict())
    for kind in (nnx.Param, nnx.BatchStat):
        tree = nnx.state(ours, kind)
        for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree)):
            name = seed001_reference.torch_name(path, model)
            assert seed001_reference.torch_layout(np.empty(leaf.shape)).shape == tuple(
                state.pop(name).shape), path
    assert sorted(k for k in state if not k.endswith("num_batches_tracked")) == []


def test_the_config_model_starts_as_pytorch_does():
    """Per layer, our pytorch_default draws have PyTorch's bounds and spread."""
    config = spherical.get_config("cifar10,resnet20,adamsrt")
    kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    ours = registry.build_model("resnet20", 10, (32, 32, 3), kwargs, 0)
    reference = seed001_reference.torch_model("resnet20", 10)  # torch's own default init
    named = dict(reference.named_parameters())
    params = nnx.state(ours, nnx.Param)
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        name = seed001_reference.torch_name(path, "resnet20")
        theirs = named[name].detach().numpy()
        mine = seed001_reference.torch_layout(np.asarray(leaf))
        if "bn" in name or "downsample.1" in name:  # BatchNorm: scale 1, bias 0
            np.testing.assert_array_equal(mine, theirs)
            continue
        fan_in = named[name.replace("bias", "weight")][0].numel()
        bound = 1 / np.sqrt(fan_in) * (1 + 1e-6)  # float32 draws may round up to it
        assert np.abs(mine).max() <= bound and np.abs(theirs).max() <= bound
        if mine.size >= 256:  # U(-b, b) has std b / sqrt(3)
            np.testing.assert_allclose(mine.std(), bound / np.sqrt(3), rtol=0.1)
            np.testing.assert_allclose(mine.std(), theirs.std(), rtol=0.15)
