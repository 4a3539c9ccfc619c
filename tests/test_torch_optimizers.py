"""PyTorch constructor kwargs -> config.optimizer (sing_jax.train.torch_optimizers) and
the seed 001 table: every cell of the config equals the reference's table, and each
PyTorch optimizer's semantics (defaults, coupled vs decoupled decay) survive the mapping."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import spherical
from sing_jax.train import build_optimizer, from_torch, seed001_hyperparameters, seed001_optimizer
from sing_jax.train.torch_optimizers import TORCH_DEFAULTS

TABLE = seed001_hyperparameters()
CELLS = [(d, m, o) for d in TABLE for m in TABLE[d] for o in TABLE[d][m]]


def test_table_has_the_reference_cells():
    assert len(CELLS) == 49 + 5  # 7 CIFAR/SVHN columns x 7 optimizers, ImageNet ResNet-18 x 5
    assert set(TABLE) == {"cifar10", "cifar100", "svhn", "imagenet"}
    assert set(TABLE["imagenet"]) == {"resnet18"}
    assert set(TABLE["imagenet"]["resnet18"]) == {"adam", "sgd", "adams", "adamsrt", "sgdmrt"}


@pytest.mark.parametrize("dataset,model,optimizer", CELLS,
                         ids=[",".join(c) for c in CELLS])
def test_every_config_cell_equals_the_reference_table(dataset, model, optimizer):
    kwargs = TABLE[dataset][model][optimizer]
    section = spherical.get_config(f"{dataset},{model},{optimizer}").optimizer.to_dict()
    assert section.pop("name") == optimizer
    assert section.pop("learning_rate") == kwargs["lr"]
    defaults = TORCH_DEFAULTS[optimizer]
    betas = kwargs.get("betas", defaults.get("betas"))
    if betas is not None:
        assert (section.pop("b1"), section.pop("b2")) == tuple(betas)
        assert section.pop("eps") == 1e-8
    assert section.pop("weight_decay") == kwargs.get("weight_decay", defaults["weight_decay"])
    if "momentum" in defaults:
        assert section.pop("momentum") == kwargs.get("momentum", defaults["momentum"])
    if optimizer == "sgd":
        assert section.pop("nesterov") is False
    if optimizer == "sgdmrt":
        assert section.pop("dampening") == 0.0
    if optimizer in ("adams", "adamsrt", "adamg", "sgdmrt"):
        assert section.pop("channel_dims") == "conv"  # every conv kernel, 1x1 included
    assert section == {}


def test_cells_the_spec_names():
    def cell(d, m, o):
        return spherical.get_config(f"{d},{m},{o}").optimizer

    for d in ("cifar10", "cifar100", "svhn"):
        for m in TABLE[d]:
            if "adamg" in TABLE[d][m]:
                assert (cell(d, m, "adamg").learning_rate, cell(d, m, "adamg").weight_decay) == (
                    0.01, 5e-4)
    assert cell("cifar10", "resnet20", "sgdmrt").weight_decay == 3.125e-5
    assert cell("cifar100", "resnet18", "adamsrt").weight_decay == 0.0
    assert cell("cifar10", "resnet20", "adamw").weight_decay == 0.01  # torch's default
    assert cell("imagenet", "resnet18", "sgd").weight_decay == 6.25e-5


def test_from_torch_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        from_torch("rmsprop", {})
    with pytest.raises(ValueError, match=r"adamw takes no keyword\(s\) \['momentum'\]"):
        from_torch("adamw", {"momentum": 0.9})
    with pytest.raises(ValueError, match="sgd has no default learning rate"):
        from_torch("sgd", {})
    with pytest.raises(ValueError, match="dampening"):
        from_torch("sgd", {"lr": 0.1, "dampening": 0.5})
    with pytest.raises(ValueError, match="no cell cifar100,resnet20,adam"):
        seed001_optimizer("cifar100", "resnet20", "adam")


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", {"lr": 1e-2, "betas": [0.9, 0.99]}),          # default decay 0.01, decoupled
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}),            # coupled L2
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    ("sgd", {"lr": 0.1}),                                   # torch's default: no momentum
])
def test_mapped_optimizer_steps_as_torch_does(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    section = from_torch(name, kwargs)
    tx = build_optimizer(section, section["learning_rate"], {"w": jnp.asarray(p0)})
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    weight = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                 "sgd": torch.optim.SGD}[name]([weight], **kwargs)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        weight.grad = torch.from_numpy(g.copy())
        reference.step()
    np.testing.assert_allclose(params["w"], weight.detach().numpy(), rtol=2e-5, atol=1e-6)
