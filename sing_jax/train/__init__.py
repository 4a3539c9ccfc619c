"""Training: a pure-pytree TrainState, data-parallel jitted steps, checkpoints, logging."""

from sing_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    prepare_workdir,
)
from sing_jax.train.host import reuse_host_memory
from sing_jax.train.logging import MetricsLogger, Progress, plot_curves, read_metrics
from sing_jax.train.loop import RunSummary, default_config, train_and_evaluate, validate_config
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
    "reuse_host_memory",
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
