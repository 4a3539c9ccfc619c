"""PyTorch optimizer constructors as ``config.optimizer`` sections, and seed 001's table.

A recipe written for PyTorch names its optimizer by constructor and keyword
arguments (``torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))``). Two things
change their meaning on the way to optax, and :func:`from_torch` takes care of both:

- **missing keys are the constructor's defaults**, which differ from optax's and
  from each other (:data:`TORCH_DEFAULTS`): ``torch.optim.AdamW`` decays by 0.01
  when ``weight_decay`` is not given, ``torch.optim.SGD`` has no momentum;
- **weight decay**: ``torch.optim.Adam`` and ``torch.optim.SGD`` (and the seed 001
  reference's AdamS/AdamSRT/SGDMRT/AdamG) add ``weight_decay * p`` to the gradient
  (coupled L2), which our ``adam``, ``sgd``, ``adams``, ``adamsrt``, ``sgdmrt`` and
  ``adamg`` do too; ``torch.optim.AdamW`` multiplies the parameters by
  ``1 - lr * weight_decay`` (decoupled, scaled by the scheduled learning rate),
  which is ``optax.adamw``'s ``-lr * (update + weight_decay * p)``, our ``adamw``.

So the value of ``weight_decay`` carries over unchanged; only its default and the
key names (``lr`` -> ``learning_rate``, ``betas`` -> ``b1, b2``) change.

:func:`seed001_hyperparameters` is the seed 001 reference's per-cell table
(``best_hyper_parameters.py`` of its repository: ``[dataset][model][optimizer] ->
constructor kwargs``), shipped as package data; :func:`seed001_optimizer` gives one
cell as a ``config.optimizer`` section.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Mapping
from typing import Any

# Constructor defaults: torch.optim.Adam / AdamW / SGD (torch 1.5 to 2.x), and the
# seed 001 reference's AdamS / AdamSRT / AdamG / SGDMRT. ``sgd`` has no default lr.
TORCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "sgd": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "adams": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "adamsrt": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "adamg": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "sgdmrt": dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0),
}
_RENAMED = {"lr": "learning_rate"}  # every other keyword keeps its PyTorch name


def from_torch(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.optimizer`` section of the PyTorch constructor ``name(**kwargs)``.

    Args:
      name: ``adam``, ``adamw``, ``sgd`` (``torch.optim``) or ``adams``, ``adamsrt``,
        ``adamg``, ``sgdmrt`` (the seed 001 reference's optimizers).
      kwargs: the constructor's keyword arguments; a missing key takes the
        constructor's default (:data:`TORCH_DEFAULTS`).

    Returns:
      ``{'name': name, 'learning_rate': ..., ...}`` with every hyper-parameter
      explicit, for :func:`sing_jax.train.build_optimizer` (the same optimizer names
      have the PyTorch semantics, see the module docstring).

    Raises:
      ValueError: an unknown optimizer or keyword, ``sgd`` without ``lr``, or a
        ``dampening`` our ``sgd`` does not have.
    """
    if name not in TORCH_DEFAULTS:
        raise ValueError(f"from_torch: unknown optimizer {name!r}; known: {sorted(TORCH_DEFAULTS)}")
    defaults = TORCH_DEFAULTS[name]
    allowed = set(defaults) | {"lr"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"from_torch: {name} takes no keyword(s) {unknown}; its keywords are "
                         f"{sorted(allowed)}")
    merged = {**defaults, **dict(kwargs)}
    if "lr" not in merged:
        raise ValueError(f"from_torch: {name} has no default learning rate; pass lr")
    out: dict[str, Any] = {"name": name}
    for key, value in merged.items():
        if key == "betas":
            b1, b2 = value
            out["b1"], out["b2"] = float(b1), float(b2)
        elif key == "nesterov":
            out["nesterov"] = bool(value)
        else:
            out[_RENAMED.get(key, key)] = float(value)
    if name == "sgd":
        if out.pop("dampening"):
            raise ValueError(f"from_torch: sgd with dampening={merged['dampening']}; our sgd "
                             "has no dampening (sgdmrt has)")
    return out


@functools.lru_cache(maxsize=1)
def _table() -> str:
    return (importlib.resources.files("sing_jax.train")
            .joinpath("seed001_hyperparameters.json").read_text())


def seed001_hyperparameters() -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """The seed 001 reference's table: ``[dataset][model][optimizer] -> constructor kwargs``.

    Datasets ``cifar10, cifar100, svhn, imagenet``; models ``resnet20`` (CIFAR-10
    only), ``resnet18``, ``vgg16`` (not on ImageNet); optimizers ``adam, adamw, sgd,
    adams, adamsrt, adamg, sgdmrt`` (ImageNet: ``adam, sgd, adams, adamsrt,
    sgdmrt``). A fresh copy on every call.
    """
    return json.loads(_table())


def seed001_optimizer(dataset: str, model: str, optimizer: str) -> dict[str, Any]:
    """One cell of :func:`seed001_hyperparameters` as a ``config.optimizer`` section
    (:func:`from_torch`), without the channel geometry (the training script's choice)."""
    table = seed001_hyperparameters()
    try:
        kwargs = table[dataset][model][optimizer]
    except KeyError:
        cells = sorted(f"{d},{m},{o}" for d in table for m in table[d] for o in table[d][m])
        raise ValueError(f"seed 001 has no cell {dataset},{model},{optimizer}; its cells: "
                         f"{cells}") from None
    return from_torch(optimizer, kwargs)
