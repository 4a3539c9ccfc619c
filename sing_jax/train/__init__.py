"""Training: a pure-pytree TrainState, data-parallel jitted steps, checkpoints, logging."""

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

__all__ = [
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
