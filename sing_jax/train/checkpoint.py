"""Orbax checkpoints of a :class:`~sing_jax.train.TrainState`: periodic, async, exact resume.

A workdir looks like::

    workdir/config.json          the experiment's config, written on the first start
    workdir/checkpoints/<step>/  state (the arrays), data (iterator state, JSON), metrics

Kept: the last ``max_to_keep`` checkpoints plus the one with the best validation
accuracy (saved at epoch ends with ``metrics={'valid_accuracy': ...}``; ties keep the
later one). Saving is asynchronous: arrays are copied to host memory before
:meth:`Checkpointer.save` returns, so the next (donating) train step may run while
the files are written.

Safety:

- a workdir whose ``config.json`` differs from the new config (other than in
  ``RESUME_SAFE_KEYS``) or that holds checkpoints but no ``config.json`` is refused
  with a ValueError naming the differing keys; nothing is written. ``overwrite=True``
  deletes its checkpoints and metrics first.
- a checkpoint whose arrays do not match the state (another model or optimizer) is a
  ValueError naming the first differing leaf.
- a latest checkpoint that cannot be read (a crash while writing, a truncated file)
  is skipped with a warning and the previous one is restored.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_preservation

from sing_jax._src.paths import path_str
from sing_jax.train.state import TrainState

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "valid_accuracy"
# Keys that may change between a run and its resumption (the path prefix is enough).
RESUME_SAFE_KEYS = ("logging", "checkpoint", "workdir", "overwrite", "num_epochs",
                    "progress_bar", "parallel")
# Files of a run that ``overwrite=True`` removes with the checkpoints.
RUN_FILES = ("metrics.jsonl", CONFIG_FILE)


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b': value}`` of a (nested) ConfigDict/dict, values made JSON-comparable."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out = {}
    for key, value in dict(config).items():
        name = f"{prefix}{key}"
        if hasattr(value, "to_dict") or isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=repr))
    return out


def config_differences(stored: Mapping[str, Any], given: Mapping[str, Any],
                       ignore: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """Readable ``key: stored -> given`` lines for the keys that differ."""
    a, b = flatten_config(stored), flatten_config(given)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignore:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} in the workdir, "
                         f"{b.get(key, '<absent>')!r} now")
    return lines


def prepare_workdir(workdir: str, config: Any, overwrite: bool = False) -> bool:
    """Claims ``workdir`` for ``config``; True when it already holds this run's checkpoints.

    Raises:
      ValueError: the workdir belongs to another experiment and ``overwrite`` is False.
    """
    config_path = os.path.join(workdir, CONFIG_FILE)
    ckpt_path = os.path.join(workdir, CHECKPOINT_DIR)
    has_checkpoints = os.path.isdir(ckpt_path) and any(
        name.isdigit() for name in os.listdir(ckpt_path))
    given = flatten_config(config)
    if os.path.exists(config_path) or has_checkpoints:
        problems = []
        if os.path.exists(config_path):
            with open(config_path) as f:
                stored = json.load(f)
            problems = config_differences(stored, given)
        else:
            problems = [f"{ckpt_path} holds checkpoints but there is no {CONFIG_FILE}"]
        if problems and not overwrite:
            raise ValueError(
                f"workdir {workdir!r} holds another experiment's run; refusing to touch it. "
                "Differences: " + "; ".join(problems[:10])
                + ". Pass --overwrite (overwrite=True) to delete its checkpoints, or use "
                "another workdir."
            )
        if problems and overwrite:
            if jax.process_index() == 0:
                shutil.rmtree(ckpt_path, ignore_errors=True)
                for name in RUN_FILES:
                    path = os.path.join(workdir, name)
                    if os.path.exists(path):
                        os.remove(path)
            has_checkpoints = False
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(config_path, "w") as f:
            json.dump(given, f, indent=1, sort_keys=True)
    return has_checkpoints


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another model or optimizer than the current config's."""


def _shape_dtype(x: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                sharding=getattr(x, "sharding", None))


class Checkpointer:
    """Saves and restores :class:`TrainState` checkpoints in ``workdir/checkpoints``.

    Args:
      workdir: the run directory (see :func:`prepare_workdir`).
      max_to_keep: number of latest checkpoints kept (the best one is kept on top).
      async_save: write in a background thread.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}; expected an int >= 1")
        policy = ocp_preservation.AnyPreservationPolicy([
            ocp_preservation.LatestN(n=max_to_keep),
            ocp_preservation.BestN(get_metric_fn=lambda m: float(m[BEST_METRIC]), n=1,
                                   keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes orbax write each checkpoint's metrics to disk, so the best
        # checkpoint stays known (and kept) across restarts.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: float(m[BEST_METRIC]),
            best_mode="max", enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def save(self, state: TrainState, *, valid_accuracy: float | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` at its step; ``valid_accuracy`` ranks it for the best-kept copy."""
        metrics = None if valid_accuracy is None else {BEST_METRIC: float(valid_accuracy)}
        step = int(jax.device_get(state.step)) if state.step.is_fully_addressable else int(
            np.asarray(state.step.addressable_data(0)))
        if step in self.manager.all_steps():
            return False
        data_state = {"data_state": state.data_state}
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.arrays()),
                                          data=ocp.args.JsonSave(data_state)),
            metrics=metrics, force=force)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def best_step(self) -> int | None:
        """Step of the kept checkpoint with the highest validation accuracy."""
        best, best_value = None, -np.inf
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and BEST_METRIC in metrics and metrics[BEST_METRIC] >= best_value:
                best, best_value = step, metrics[BEST_METRIC]
        return best

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """Leaf name -> shape of the arrays in checkpoint ``step`` (None: no metadata)."""
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            return None
        return {path_str(p): tuple(getattr(m, "shape", ()))
                for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}

    def _check_matches(self, step: int, template: dict[str, Any],
                       stored_flat: dict[str, tuple[int, ...]] | None) -> None:
        if stored_flat is None:
            return
        template_flat = jax.tree_util.tree_flatten_with_path(template)[0]

        def mismatch(detail: str) -> CheckpointMismatchError:
            return CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the config: {detail}")

        for path, leaf in template_flat:
            name = path_str(path)
            if name not in stored_flat:
                raise mismatch(
                    f"it has no leaf {name} (it has e.g. {sorted(stored_flat)[:4]}). It was "
                    "written by another model/optimizer; use another workdir or --overwrite.")
            if stored_flat[name] != tuple(np.shape(leaf)):
                raise mismatch(
                    f"leaf {name} has shape {stored_flat[name]} there, "
                    f"{tuple(np.shape(leaf))} now. Use another workdir or --overwrite.")
        extra = set(stored_flat) - {path_str(p) for p, _ in template_flat}
        if extra:
            raise mismatch(
                f"it has leaves the state lacks: {sorted(extra)[:4]}. Use another workdir or "
                "--overwrite. (A SINGD state written by sing_jax up to commit d3dbb32 keeps "
                "S S^T, children 4 and 5 of a layer, for more dense factors at T=1; such a "
                "checkpoint restores with that version: finish its run with it.)")

    def restore(self, template: TrainState, step: int | None = None) -> TrainState | None:
        """The latest readable checkpoint (or ``step``) restored into ``template``'s layout.

        An unreadable latest checkpoint is skipped with a warning (the previous one
        is tried); a checkpoint that does not match the template's structure raises.
        Returns None when there is no checkpoint.
        """
        self.manager.reload()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise ValueError(f"no checkpoint at step {step} in {self.directory}; "
                                 f"available: {sorted(steps)}")
            steps = [step]
        abstract = jax.tree.map(_shape_dtype, template.arrays())
        failures = []
        for candidate in steps:
            try:
                stored = self._stored_shapes(candidate)
            except Exception as e:  # unreadable metadata: treat like a corrupt checkpoint
                failures.append((candidate, e))
                self._warn_fallback(candidate, e, steps)
                continue
            self._check_matches(candidate, abstract, stored)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except Exception as e:  # a truncated or missing file in the checkpoint
                failures.append((candidate, e))
                self._warn_fallback(candidate, e, steps)
                continue
            return template.with_arrays(restored["state"]).replace(
                data_state=restored["data"]["data_state"])
        if failures:
            raise ValueError(
                f"no readable checkpoint in {self.directory}: "
                + "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures))
        return None

    def _warn_fallback(self, step: int, error: Exception, steps: list[int]) -> None:
        older = [s for s in steps if s < step]
        target = f"falling back to step {older[0]}" if older else "no older checkpoint left"
        warnings.warn(
            f"checkpoint {self.directory}/{step} is unreadable ({type(error).__name__}: "
            f"{str(error)[:200]}); {target}.", RuntimeWarning, stacklevel=3)
