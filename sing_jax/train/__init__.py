"""Training: a pure-pytree TrainState, data-parallel jitted steps, checkpoints, logging.

The checkpoints (orbax) and the config-driven loop (ml_collections, orbax) load on
first use, so that the train step, the state and the optimizer builders import with
jax, flax, optax and numpy alone (``experiments/bench_accelerator.py`` runs on
accelerator machines that lack the other dependencies).
"""

import importlib

from sing_jax.train.logging import MetricsLogger, Progress, plot_curves, read_metrics
from sing_jax.train.optimizers import OPTIMIZERS, build_optimizer, build_schedule
from sing_jax.train.registry import model_names, register_model
from sing_jax.train.state import TrainState, num_params
from sing_jax.train.step import (
    AXIS,
    ParallelStep,
    StepOptions,
    check_global_batch,
    data_mesh,
    make_eval_step,
    make_train_step,
    per_device_eval_step,
    per_device_train_step,
    set_batch_norm_axis,
    to_host,
)
from sing_jax.train.torch_optimizers import (
    from_torch,
    seed001_hyperparameters,
    seed001_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "CheckpointMismatchError",
    "Checkpointer",
    "MetricsLogger",
    "Progress",
    "RunSummary",
    "build_optimizer",
    "build_schedule",
    "default_config",
    "from_torch",
    "model_names",
    "plot_curves",
    "prepare_workdir",
    "read_metrics",
    "register_model",
    "seed001_hyperparameters",
    "seed001_optimizer",
    "train_and_evaluate",
    "validate_config",
    "AXIS",
    "ParallelStep",
    "StepOptions",
    "TrainState",
    "check_global_batch",
    "data_mesh",
    "make_eval_step",
    "make_train_step",
    "num_params",
    "per_device_eval_step",
    "per_device_train_step",
    "set_batch_norm_axis",
    "to_host",
]

# name -> the submodule that defines it, imported on first access (PEP 562)
_LAZY = {
    "Checkpointer": "checkpoint",
    "CheckpointMismatchError": "checkpoint",
    "prepare_workdir": "checkpoint",
    "RunSummary": "loop",
    "default_config": "loop",
    "train_and_evaluate": "loop",
    "validate_config": "loop",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"sing_jax.train.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sing_jax.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
