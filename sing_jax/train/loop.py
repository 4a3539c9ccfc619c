"""``train_and_evaluate(config, workdir)``: the whole training run from a config.

Builds the data pipelines (:mod:`sing_jax.data`), the model (:mod:`sing_jax.nn.models`)
and the optimizer (:mod:`sing_jax.train.optimizers`), claims the workdir, restores
the latest checkpoint if there is one (an exact resume: parameters, optimizer and
BatchNorm state, RNG, data-iterator position and the epoch's running metrics),
then trains with the data-parallel step, evaluating on the validation and test
splits (and any ``config.dataset.extra_test`` sets, e.g. ImageNet-V2) after each
epoch. See :func:`default_config` for every key.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sing_jax.train import checkpoint as ckpt_lib
from sing_jax.train import logging as log_lib
from sing_jax.train import optimizers, registry
from sing_jax.train.state import TrainState, num_params, zero_epoch_metrics
from sing_jax.train.step import (
    PARALLEL_MODES,
    StepOptions,
    check_global_batch,
    data_mesh,
    make_eval_step,
    make_train_step,
    set_batch_norm_axis,
    to_host,
)

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# Sections whose keys are checked by their own builder (model, optimizer, schedule).
OPEN_SECTIONS = ("model", "optimizer", "schedule")


def split_config_flags(arg: str | None, default: str, flags: Sequence[str]
                       ) -> tuple[list[str], set[str]]:
    """Splits a config-file argument ``'a,b[,flag...]'`` (``default`` when empty) into
    its fields and the set of the ``flags`` it names."""
    fields = [p for p in (arg or default).split(",") if p]
    return [p for p in fields if p not in flags], {p for p in fields if p in flags}


def split_config_arg(arg: str | None, default: str) -> tuple[list[str], bool]:
    """Splits a config-file argument ``'a,b[,tiny]'`` into its fields and the tiny flag."""
    parts, flags = split_config_flags(arg, default, ("tiny",))
    return parts, "tiny" in flags


def default_config() -> ml_collections.ConfigDict:
    """Every key the loop reads, with its default. Experiment configs start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        name="digits",
        data_dir="",                 # '' = $SING_JAX_DATA_DIR or TFDS's default
        validation_fraction=-1.0,    # < 0 = the dataset's default hold-out
        augment=True,
        mix=True,                    # the dataset recipe's mixup/cutmix, where it has one
        rand_augment=True,           # the recipe's RandAugment, where it has one (ImageNet)
        mean=(),                     # () = the dataset's normalisation mean ...
        std=(),                      # ... and std (e.g. (0.5, 0.5, 0.5) for timm's ViTs)
        eval_crop_pct=0.0,           # 0 = the dataset's eval resize (ImageNet: 224/0.875)
        eval_interpolation="",       # '' = the dataset's eval resampling (ImageNet: bilinear)
        extra_test=(),               # more test sets evaluated each epoch, e.g. ('imagenet_v2',)
        # Quirks of the seed 001 reference script (its config turns them on):
        keep_partial_batch=False,    # keep each epoch's last partial batch (padded, masked)
        augment_validation=False,    # validation images get the train augmentation
        validation_rounding="round",  # hold-out size round(f N) or 'floor': int(f N)
    ))
    c.model = ml_collections.ConfigDict(dict(name="small_cnn"))  # + the model's kwargs
    c.optimizer = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3))
    c.schedule = ml_collections.ConfigDict(dict(name="constant"))
    c.batch_size = 128               # global (all devices, all processes) per step
    c.eval_batch_size = 256
    c.num_epochs = 10
    c.parallel = "shard_map"         # or 'pmap'
    c.num_devices = 0                # 0 = every device
    c.sync_batch_stats = True
    c.compute_dtype = "float32"      # or 'bfloat16' (float32 master weights)
    c.label_smoothing = 0.0
    # Valid/test loss and accuracy as the mean of per-batch values (each eval batch
    # weighs the same, as the seed 001 reference script) instead of per example.
    c.batch_averaged_eval = False
    # LearnableScaler ViT recipe (seed 004): weights of the model's auxiliary losses.
    c.aux_loss = ml_collections.ConfigDict(dict(feature_decay=0.0, attn_extra=0.0))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=0,               # 0 = at epoch ends only
        max_to_keep=2,
        async_save=True,
    ))
    c.logging = ml_collections.ConfigDict(dict(
        every_steps=20,
        grad_norms=False,            # per-leaf gradient norms in the train records
        tensorboard=True,
        progress=True,
        plot=True,
    ))
    # Locked: setting a key it does not have (a typo) raises; model, optimizer and
    # schedule are replaced whole and their keys checked by their builders.
    return c.lock()


def _as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _set_known(target: ml_collections.ConfigDict, key: str, value: Any, name: str) -> None:
    """``target[key] = value`` in a locked ConfigDict, which refuses unknown keys and
    values of another type; the ValueError names the dotted key."""
    try:
        if name in OPEN_SECTIONS:
            # Keys depend on the chosen model/optimizer/schedule: their builders check them.
            target[key] = ml_collections.ConfigDict(_as_dict(value))
        elif isinstance(value, Mapping) and isinstance(target.get(key), ml_collections.ConfigDict):
            for sub_key, sub_value in value.items():
                _set_known(target[key], sub_key, sub_value, f"{name}.{sub_key}")
        else:
            target[key] = value
    except KeyError:
        raise ValueError(f"config key {name!r} is unknown; valid keys here: "
                         f"{sorted(target)}") from None
    except TypeError as e:
        raise ValueError(f"config key {name!r}: {e}") from None


def validate_config(config: Any) -> ml_collections.ConfigDict:
    """``config`` over :func:`default_config`: every key it leaves out takes the default.

    Raises:
      ValueError: naming a key the loop does not know (a typo is never ignored), a
        value of another type than the default's, or an unknown ``parallel`` or
        ``compute_dtype``.
    """
    merged = default_config()  # locked: ml_collections refuses keys it does not have
    for key, value in _as_dict(config).items():
        _set_known(merged, key, value, key)
    if merged.parallel not in PARALLEL_MODES:
        raise ValueError(f"config.parallel={merged.parallel!r}; expected one of "
                         f"{PARALLEL_MODES}")
    if merged.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={merged.compute_dtype!r}; expected one of "
                         f"{sorted(COMPUTE_DTYPES)}")
    return merged


def preprocessing_overrides(dataset_cfg: Any) -> dict[str, Any]:
    """``config.dataset``'s overrides of the dataset's preprocessing (empty = the dataset's own)."""
    out: dict[str, Any] = {}
    if dataset_cfg.get("mean"):
        out["mean"] = tuple(dataset_cfg.mean)
    if dataset_cfg.get("std"):
        out["std"] = tuple(dataset_cfg.std)
    if dataset_cfg.get("eval_crop_pct"):
        out["eval_crop_pct"] = float(dataset_cfg.eval_crop_pct)
    if dataset_cfg.get("eval_interpolation"):
        out["eval_interpolation"] = dataset_cfg.eval_interpolation
    if not dataset_cfg.get("rand_augment", True):
        out["rand_augment"] = False
    return out


@dataclasses.dataclass
class RunSummary:
    """What a run reports at the end (also the last ``'summary'`` record of the JSONL).

    ``best_test_*`` is the best test accuracy over the epochs (timm's "best metric"
    when the test split is the benchmark's evaluation set, as ImageNet's);
    ``extra_test_accuracy`` holds the ``config.dataset.extra_test`` sets' accuracy
    at the last epoch, ``extra_test_accuracy_at_best`` at the best epoch (by
    validation accuracy where there is a validation split, else by test accuracy).
    """

    steps: int
    epochs: int
    final_test_accuracy: float
    best_valid_epoch: int | None
    best_valid_accuracy: float | None
    test_accuracy_at_best_valid: float | None
    step_time_s: float
    images_per_s: float
    compile_time_s: float
    num_params: int
    resumed_from_step: int | None
    best_test_epoch: int | None = None
    best_test_accuracy: float | None = None
    extra_test_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    extra_test_accuracy_at_best: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _evaluate(eval_step, state, pipeline, batch_averaged: bool = False) -> dict[str, float]:
    """Loss and accuracy over one pass: per example, or (``batch_averaged``) the mean
    of the per-batch values, every batch weighing the same."""
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
    batch_means, batches = {"loss": 0.0, "accuracy": 0.0}, 0
    for batch in pipeline:
        sums = to_host(eval_step(state, batch))
        for k in totals:
            totals[k] += float(sums[k])
        if float(sums["count"]) > 0:
            batch_means["loss"] += float(sums["loss_sum"]) / float(sums["count"])
            batch_means["accuracy"] += float(sums["correct_sum"]) / float(sums["count"])
            batches += 1
    if batch_averaged:
        return {k: v / max(batches, 1) for k, v in batch_means.items()}
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct_sum"] / count}


def _aux_loss_fn(config: ml_collections.ConfigDict):
    weights = config.aux_loss
    if not (weights.feature_decay or weights.attn_extra):
        return None
    from sing_jax.nn.models import learnable_scaler_aux_loss

    def forward(model, images):
        logits, aux = model(images, return_aux=True)
        return logits, learnable_scaler_aux_loss(aux, feature_decay=weights.feature_decay,
                                                 attn_extra=weights.attn_extra)

    return forward


def train_and_evaluate(config: Any, workdir: str, *, overwrite: bool = False,
                       quiet: bool = False) -> RunSummary:
    """Trains and evaluates the model of ``config``, writing everything to ``workdir``.

    Args:
      config: an ``ml_collections.ConfigDict`` (or dict) with the keys of
        :func:`default_config` (missing keys take the defaults, unknown keys are errors).
      workdir: the run directory: ``config.json``, ``checkpoints/``,
        ``metrics.jsonl``, ``tensorboard/``, ``curves.png``.
      overwrite: replace another experiment's run in ``workdir`` instead of refusing.
      quiet: no progress output.

    Returns:
      A :class:`RunSummary`.
    """
    import sing_jax.data as sdata

    config = validate_config(config)
    # Names and keys first: a typo fails before any data or model is built.
    registry.resolve_dataset(config.dataset.name)
    extra_test_names = [registry.resolve_dataset(n) for n in config.dataset.extra_test]
    preprocessing = preprocessing_overrides(config.dataset)
    if config.model.name not in registry.model_names():
        raise ValueError(f"unknown model {config.model.name!r}; valid names: "
                         f"{registry.model_names()}")
    optimizers.optimizer_kwargs(config.optimizer)
    optimizers.build_schedule(config.schedule, 1.0, 1, 1)
    is_main = jax.process_index() == 0
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if (is_main and not quiet) \
        else (lambda *a: None)

    devices = jax.devices()
    if config.num_devices:
        if jax.process_count() > 1:
            raise ValueError("config.num_devices must be 0 (all) in a multi-process run")
        if config.num_devices > len(devices):
            raise ValueError(f"config.num_devices={config.num_devices} but only "
                             f"{len(devices)} devices are visible")
        devices = devices[:config.num_devices]
    mesh = data_mesh(devices)
    num_local = len(mesh.local_devices) if config.parallel == "shard_map" else len(
        [d for d in devices if d.process_index == jax.process_index()])
    check_global_batch(config.batch_size, len(devices), "config.batch_size")
    check_global_batch(config.eval_batch_size, len(devices), "config.eval_batch_size")

    # Data: sing_jax.data pipelines; the train stream is endless, epochs come from the step.
    dataset = registry.resolve_dataset(config.dataset.name)
    data_kwargs = dict(num_local_devices=num_local,
                       data_dir=config.dataset.data_dir or None,
                       validation_fraction=(None if config.dataset.validation_fraction < 0
                                            else config.dataset.validation_fraction),
                       validation_rounding=config.dataset.validation_rounding,
                       preprocessing=preprocessing)
    train_pipe = sdata.get_pipeline(dataset, "train", config.batch_size, seed=config.seed,
                                    augment=config.dataset.augment,
                                    keep_partial_batch=config.dataset.keep_partial_batch,
                                    **data_kwargs)
    info = train_pipe.info
    valid_pipe = (sdata.get_pipeline(dataset, "validation", config.eval_batch_size,
                                     seed=config.seed, augment=config.dataset.augment,
                                     augment_eval=config.dataset.augment_validation,
                                     **data_kwargs)
                  if info.num_examples["validation"] > 0 else None)
    test_pipe = sdata.get_pipeline(dataset, "test", config.eval_batch_size, **data_kwargs)
    extra_test_pipes = {}
    for label, name in zip(config.dataset.extra_test, extra_test_names):
        pipe = sdata.get_pipeline(name, "test", config.eval_batch_size, **data_kwargs)
        if pipe.info.num_classes != info.num_classes:
            raise ValueError(f"config.dataset.extra_test: {label!r} has "
                             f"{pipe.info.num_classes} classes, {dataset!r} has "
                             f"{info.num_classes}; an extra test set must share the labels")
        extra_test_pipes[label] = pipe
    steps_per_epoch = train_pipe.steps_per_epoch
    total_steps = steps_per_epoch * config.num_epochs

    # Model and optimizer.
    model_kwargs = {k: v for k, v in _as_dict(config.model).items() if k != "name"}
    model = registry.build_model(config.model.name, info.num_classes, info.image_shape,
                                 model_kwargs, config.seed)
    accum = int(config.optimizer.get("grad_accum_steps", 1) or 1)
    schedule = optimizers.build_schedule(config.schedule, config.optimizer.learning_rate,
                                         max(1, steps_per_epoch // accum), config.num_epochs)
    # The learning rate the logs record, as one compiled function compiled here: as
    # eager ops it compiled a few small kernels inside the first epoch's timed steps.
    learning_rate_at = jax.jit(schedule)
    learning_rate_at(0)
    train_iter = iter(train_pipe)

    def detect():
        from flax import nnx

        from sing_jax import detect_channel_dims

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.to_pure_dict(rest)  # plain arrays: the probe's BatchNorm updates stay local

        def apply(p, x):
            m = nnx.merge(graphdef, p, rest)
            m.train()
            return m(x)

        probe = next(iter(train_pipe))["image"]
        probe = probe.reshape((-1,) + probe.shape[2:])
        found = detect_channel_dims(apply, nnx.to_pure_dict(params), probe)
        say(found.report)
        return found.spec

    from flax import nnx

    params_for_spec = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optimizers.build_optimizer(config.optimizer, schedule, params_for_spec,
                                    detect_channel_dims=detect,
                                    diagnostics=config.logging.grad_norms, model=model)
    set_batch_norm_axis(model, config.sync_batch_stats)
    state = TrainState.create(model, tx, rng=config.seed)

    # Workdir and checkpoints.
    has_checkpoints = ckpt_lib.prepare_workdir(workdir, config, overwrite)
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         save_interval_steps=config.checkpoint.every_steps,
                                         async_save=config.checkpoint.async_save)
    logger = log_lib.MetricsLogger(workdir, tensorboard=config.logging.tensorboard,
                                   enabled=is_main)
    spec = info.spec
    mixing = None
    if config.dataset.mix and config.dataset.augment and (spec.mixup_alpha or spec.cutmix_alpha):
        mixing = (info.num_classes, spec.mixup_alpha, spec.cutmix_alpha, spec.label_smoothing)
    options = StepOptions(sync_batch_stats=config.sync_batch_stats,
                          compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                          label_smoothing=config.label_smoothing,
                          grad_norms=config.logging.grad_norms,
                          aux_loss=_aux_loss_fn(config),
                          singd=config.optimizer.name == "singd", mixing=mixing,
                          masked_batch_stats=config.dataset.keep_partial_batch)
    train_step = make_train_step(tx, parallel=config.parallel, mesh=mesh, options=options)
    eval_step = make_eval_step(parallel=config.parallel, mesh=mesh)
    state = train_step.place_state(state)
    # Restored into the placed layout: every process reads its replicated copy.
    resumed_from = None
    if has_checkpoints:
        restored = checkpointer.restore(state, data_iterator=train_iter)
        if restored is not None:
            state = restored
            resumed_from = int(to_host(state.step))
            say(f"resumed from step {resumed_from} in {workdir}")
        # Records after the restored step (all, where none was readable) are written again.
        logger.truncate_after(resumed_from or 0)

    zeros = train_step.place_state(zero_epoch_metrics()) if config.parallel == "shard_map" \
        else zero_epoch_metrics()

    step = int(to_host(state.step))
    say(f"{config.model.name} ({num_params(state):,} params) on {dataset}, "
        f"{config.optimizer.name}, {len(devices)} device(s) via {config.parallel}, "
        f"{steps_per_epoch} steps/epoch x {config.num_epochs} epochs")
    compile_time, compile_reported = 0.0, False
    epoch_records = [r for r in log_lib.read_metrics(workdir) if r.get("kind") == "epoch"] \
        if is_main else []
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            progress = log_lib.Progress(steps_per_epoch, f"epoch {epoch + 1}/{config.num_epochs}",
                                        every=max(1, steps_per_epoch // 4),
                                        enabled=is_main and config.logging.progress and not quiet)
            progress.count = step % steps_per_epoch
            epoch_start, epoch_steps = time.perf_counter(), 0
            while True:
                batch = next(train_iter)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch)
                step += 1
                if compile_time == 0.0:
                    jax.block_until_ready(state.step)
                    compile_time = time.perf_counter() - t0
                    epoch_start = time.perf_counter()
                else:
                    epoch_steps += 1
                end_of_epoch = step % steps_per_epoch == 0
                if config.logging.every_steps and step % config.logging.every_steps == 0:
                    host = to_host(metrics)
                    record = {k: float(v) for k, v in host.items()}
                    record["learning_rate"] = float(learning_rate_at(step // accum))
                    record["epoch"] = step / steps_per_epoch
                    logger.write(step, "train", record)
                    progress.update(1, loss=record["loss"])
                else:
                    progress.update(1)
                # Orbax's decision (the interval, a preemption); called on every step.
                if checkpointer.should_save(step) and not end_of_epoch:
                    checkpointer.save(state, data_iterator=train_iter)
                if end_of_epoch:
                    break
            progress.close()
            jax.block_until_ready(state.step)
            elapsed = time.perf_counter() - epoch_start
            sums = to_host(state.epoch_metrics)
            count = max(float(sums["count"]), 1.0)
            record = {"epoch": epoch + 1, "train_loss": float(sums["loss_sum"]) / count,
                      "train_accuracy": float(sums["correct_sum"]) / count,
                      "learning_rate": float(learning_rate_at(step // accum))}
            if valid_pipe is not None:
                valid = _evaluate(eval_step, state, valid_pipe.for_epoch(epoch),
                                  config.batch_averaged_eval)
                record.update(valid_loss=valid["loss"], valid_accuracy=valid["accuracy"])
            test = _evaluate(eval_step, state, test_pipe, config.batch_averaged_eval)
            record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            for label, pipe in extra_test_pipes.items():
                extra = _evaluate(eval_step, state, pipe)
                record.update({f"{label}_loss": extra["loss"],
                               f"{label}_accuracy": extra["accuracy"]})
            if epoch_steps:
                record["step_time_s"] = elapsed / epoch_steps
                record["images_per_s"] = config.batch_size * epoch_steps / elapsed
                record["timed_steps"] = epoch_steps
            if compile_time and not compile_reported:
                record["compile_time_s"] = compile_time
                compile_reported = True
            epoch_records.append(logger.write(step, "epoch", record))
            say(f"epoch {epoch + 1}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy"))))
            state = state.replace(epoch_metrics=jax.tree.map(jnp.copy, zeros))
            checkpointer.save(state, data_iterator=train_iter,
                              valid_accuracy=record.get("valid_accuracy", record["test_accuracy"]))
        checkpointer.wait()
    finally:
        checkpointer.close()
        logger.close()

    best = None
    scored = [r for r in epoch_records if "valid_accuracy" in r]
    if scored:
        best = max(scored, key=lambda r: (r["valid_accuracy"], -r["epoch"]))
    best_test = (max(epoch_records, key=lambda r: (r["test_accuracy"], -r["epoch"]))
                 if epoch_records else None)
    at_best = best or best_test

    def extras(record):
        if record is None:
            return {}
        return {label: record[f"{label}_accuracy"] for label in config.dataset.extra_test
                if f"{label}_accuracy" in record}
    # Timings from the epoch records, so a resumed (or already finished) run reports them too.
    timed = [(r["step_time_s"], r.get("timed_steps", 1)) for r in epoch_records
             if "step_time_s" in r]
    timed_steps = sum(n for _, n in timed)
    step_time = sum(t * n for t, n in timed) / timed_steps if timed_steps else float("nan")
    compiles = [r["compile_time_s"] for r in epoch_records if "compile_time_s" in r]
    compile_time = compiles[-1] if compiles else compile_time
    summary = RunSummary(
        steps=step, epochs=config.num_epochs,
        final_test_accuracy=epoch_records[-1]["test_accuracy"] if epoch_records else float("nan"),
        best_valid_epoch=best["epoch"] if best else None,
        best_valid_accuracy=best["valid_accuracy"] if best else None,
        test_accuracy_at_best_valid=best["test_accuracy"] if best else None,
        step_time_s=step_time,
        images_per_s=config.batch_size / step_time if timed_steps else float("nan"),
        compile_time_s=compile_time, num_params=num_params(state),
        resumed_from_step=resumed_from,
        best_test_epoch=best_test["epoch"] if best_test else None,
        best_test_accuracy=best_test["test_accuracy"] if best_test else None,
        extra_test_accuracy=extras(epoch_records[-1] if epoch_records else None),
        extra_test_accuracy_at_best=extras(at_best))
    if is_main:
        log_lib.MetricsLogger(workdir, tensorboard=False).write(step, "summary",
                                                                summary.as_dict())
        if config.logging.plot and epoch_records:
            log_lib.plot_curves({config.optimizer.name: epoch_records},
                                f"{workdir}/curves.png",
                                title=f"{config.model.name} on {dataset}")
    return summary
