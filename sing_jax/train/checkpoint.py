"""Orbax checkpoints of a :class:`~sing_jax.train.TrainState`: periodic, async, exact resume.

A workdir looks like::

    workdir/config.json          the experiment's config, written on the first start
    workdir/checkpoints/<step>/  state (the arrays), data (the grain iterator's state,
                                 one JSON file per process), metrics

Kept: the last ``max_to_keep`` checkpoints plus the one with the best validation
accuracy (saved at epoch ends with ``valid_accuracy=...``; ties keep the later one),
chosen by orbax's preservation policies and ``best_fn``. Saving is asynchronous:
arrays are copied to host memory before :meth:`Checkpointer.save` returns, so the
next (donating) train step may run while the files are written.

Safety:

- a workdir whose ``config.json`` differs from the new config (other than in
  ``RESUME_SAFE_KEYS``) or that holds checkpoints but no ``config.json`` is refused
  with a ValueError naming the differing keys; nothing is written. ``overwrite=True``
  deletes its checkpoints and metrics first.
- a checkpoint whose arrays do not match the state (another model or optimizer) is a
  ValueError naming the first differing leaf.
- :meth:`Checkpointer.restore` reads every kept checkpoint (arrays, data-iterator
  state, metrics). One that cannot be read (a crash while writing, a truncated,
  missing or emptied file) is moved aside to ``<step>.corrupt-<UTC time>``, never
  deleted, and the run resumes from the newest readable checkpoint older than every
  unreadable one, so that the run writes those steps again; readable checkpoints
  newer than that resume point are moved to ``<step>.superseded-<UTC time>``. The
  warning names each move and the root cause of each failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from typing import Any

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as ocp_save_policy

from sing_jax._src.paths import path_str
from sing_jax.train.state import TrainState

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "valid_accuracy"
# Orbax's item holding a checkpoint's metrics (``CheckpointManager(metrics=...)``).
METRICS_ITEM = "metrics"
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


def _best_metric(metrics: Mapping[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


# Links of an exception chain that diagnose nothing (a JSON reader raises its decode
# error while handling a StopIteration).
_CONTEXT_ONLY = (StopIteration, StopAsyncIteration, GeneratorExit)


def _root_cause(error: BaseException) -> str:
    """``'Type: message'`` of the innermost informative exception in ``error``'s chain.

    Orbax re-raises what tensorstore or the JSON reader reported; the leaf, the file
    and the byte range (``OUT_OF_RANGE: ... Requested byte range [0, 1425) is not
    valid for value of size 712``) are in its ``__cause__``/``__context__``.
    Tensorstore's trailing spec dump is left out.
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    informative = [e for e in chain if str(e) and not isinstance(e, _CONTEXT_ONLY)]
    root = (informative or chain)[-1]
    message = re.sub(r"\s*\[tensorstore_spec.*", "", str(root), flags=re.DOTALL)
    return f"{type(root).__name__}: {message}"


class _SavedPosition(grain.DatasetIterator):
    """Takes the position grain's handler restores without moving the run's iterator
    (which may start worker processes on every ``set_state``)."""

    def __init__(self):
        super().__init__()
        self.position = None

    def __next__(self):
        raise StopIteration

    def get_state(self) -> Any:
        return self.position

    def set_state(self, state: Any) -> None:
        self.position = state


class Checkpointer:
    """Saves and restores :class:`TrainState` checkpoints in ``workdir/checkpoints``.

    One orbax ``CheckpointManager`` keeps them: items ``state`` (the arrays,
    ``StandardCheckpointHandler``), ``data`` (the grain iterator's state through
    ``grain.checkpoint.CheckpointHandler``, one JSON file per process) and the
    metrics; its policies decide which steps are kept and when to save.

    Args:
      workdir: the run directory (see :func:`prepare_workdir`).
      max_to_keep: number of latest checkpoints kept (the best one is kept on top).
      save_interval_steps: :meth:`should_save` says yes at every multiple of it
        (0: never, except at a preemption sync point of a multi-process job).
      async_save: write in a background thread.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2, save_interval_steps: int = 0,
                 async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}; expected an int >= 1")
        if save_interval_steps < 0:
            raise ValueError(f"save_interval_steps={save_interval_steps}; expected an int >= 0")
        # The latest N for resuming plus the best one: orbax's default with best_fn
        # would keep the N best instead.
        keep = ocp_preservation.AnyPreservationPolicy([
            ocp_preservation.LatestN(n=max_to_keep),
            ocp_preservation.BestN(get_metric_fn=_best_metric, n=1,
                                   keep_checkpoints_without_metrics=False),
        ])
        # Orbax's default decision also saves the first step of a fresh run; ours
        # saves at the interval (and at a preemption), epoch ends are saved explicitly.
        interval = ([ocp_save_policy.FixedIntervalPolicy(save_interval_steps)]
                    if save_interval_steps else [])
        when = ocp_save_policy.AnySavePolicy(
            [*interval, ocp_save_policy.PreemptionCheckpointingPolicy()])
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=keep, save_decision_policy=when, best_fn=_best_metric,
            best_mode="max", enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        # step -> (where it was moved, why): set aside before orbax could open the directory.
        self._set_aside_at_open: dict[int, tuple[str, str]] = {}
        self.manager = self._open_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def _open_manager(self) -> ocp.CheckpointManager:
        try:
            return self._new_manager()
        except Exception:
            # Orbax reads every step's metrics when it opens the directory, so one
            # unreadable metrics file stops it: set those steps aside, then open again.
            unreadable = self._steps_with_unreadable_metrics()
            if not unreadable:
                raise
        moved = self._move_aside(unreadable, [])
        self._set_aside_at_open = {s: (moved[s], unreadable[s]) for s in unreadable}
        if jax.process_index() == 0:
            warnings.warn("\n".join(self._report(self._set_aside_at_open, {}) + [
                "nothing was deleted; restore() resumes from a checkpoint older than these."]),
                RuntimeWarning, stacklevel=3)
        return self._new_manager()

    def _steps_with_unreadable_metrics(self) -> dict[int, str]:
        unreadable = {}
        if not os.path.isdir(self.directory):
            return unreadable
        for name in sorted(os.listdir(self.directory)):
            # Orbax's step directories are named by the bare step number (no prefix).
            path = os.path.join(self.directory, name, METRICS_ITEM, METRICS_ITEM)
            if name.isdigit() and os.path.exists(path):
                try:
                    with open(path) as f:
                        json.load(f)
                except Exception as e:
                    unreadable[int(name)] = f"its metrics file {path}: {_root_cause(e)}"
        return unreadable

    def _move_aside(self, unreadable: Mapping[int, str], superseded: list[int],
                    ) -> dict[int, str]:
        """Renames ``<step>`` to ``<step>.corrupt-<time>`` (unreadable) or
        ``<step>.superseded-<time>`` (readable, to be written again); step -> new path.
        Orbax lists only bare step numbers, so it no longer sees them."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = {}
        for step, kind in ([(s, "corrupt") for s in sorted(unreadable)]
                           + [(s, "superseded") for s in sorted(superseded)]):
            target = os.path.join(self.directory, f"{step}.{kind}-{stamp}")
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(self.directory, f"{step}.{kind}-{stamp}-{suffix}")
                suffix += 1
            if jax.process_index() == 0:
                os.rename(os.path.join(self.directory, str(step)), target)
            moved[step] = target
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sing_jax checkpoints moved aside")
        return moved

    def should_save(self, step: int) -> bool:
        """Orbax's save decision at ``step`` (the host-side step counter): True at a
        multiple of ``save_interval_steps`` newer than the latest checkpoint, or at a
        preemption sync point. Call it on every step, on every process."""
        return self.manager.should_save(step)

    def save(self, state: TrainState, *, data_iterator: Any = None,
             valid_accuracy: float | None = None) -> bool:
        """Saves ``state`` at its step; False where that step is already saved.

        Args:
          state: the train state.
          data_iterator: the grain ``DatasetIterator`` feeding the run; its position
            is saved with the arrays (each process writes its own).
          valid_accuracy: ranks the checkpoint for the best-kept copy.
        """
        metrics = None if valid_accuracy is None else {BEST_METRIC: float(valid_accuracy)}
        step = int(jax.device_get(state.step)) if state.step.is_fully_addressable else int(
            np.asarray(state.step.addressable_data(0)))
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state.arrays())}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                  force=True)
        if self.manager.reached_preemption(step):
            self.manager.wait_until_finished()  # the job is ending: get the files out first
        return saved

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def best_step(self) -> int | None:
        """Step of the kept checkpoint with the highest validation accuracy (ties: the later)."""
        return self.manager.best_step()

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

    def _read(self, step: int, abstract: dict[str, Any], with_data: bool,
              ) -> tuple[dict[str, Any], Any]:
        """The arrays of checkpoint ``step`` in ``abstract``'s layout and the saved
        data-iterator position (``with_data``). Raises where any item is unreadable."""
        stored = self._stored_shapes(step)
        self._check_matches(step, abstract, stored)
        items = {"state": ocp.args.StandardRestore(abstract)}
        position = _SavedPosition()
        step_dir = os.path.join(self.directory, str(step))
        legacy = os.path.join(step_dir, "data", "metadata")
        if with_data and os.path.exists(legacy):
            # Written by an earlier version: the iterator state as orbax JSON.
            with open(legacy) as f:
                position.set_state(json.load(f)["data_state"])
        elif with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if (os.path.isdir(os.path.join(step_dir, METRICS_ITEM))
                and self.manager.metrics(step) is None):
            raise FileNotFoundError(f"{step_dir}/{METRICS_ITEM} holds no metrics file: the "
                                    "validation accuracy that ranks it is lost")
        return restored["state"], position.position

    def restore(self, template: TrainState, step: int | None = None, *,
                data_iterator: Any = None) -> TrainState | None:
        """The latest readable checkpoint (or ``step``) restored into ``template``'s layout.

        Every kept checkpoint is read (arrays, data-iterator state, metrics). Where
        some cannot be read, each is moved to ``<step>.corrupt-<time>`` (never
        deleted), readable ones newer than an unreadable one to
        ``<step>.superseded-<time>``, and the newest readable checkpoint older than
        every unreadable one is restored, so that training writes the moved steps
        again (bitwise the same where the run is deterministic) and ends with a
        readable final and best checkpoint. A RuntimeWarning names every move and
        each failure's root cause. A checkpoint that does not match the template's
        structure raises.

        Args:
          template: a state of the run's model and optimizer (its arrays give shapes,
            dtypes and shardings).
          step: restore exactly this step (an unreadable one raises; nothing is moved).
          data_iterator: the run's grain iterator, set to the restored position
            (left as it is where nothing is restored).

        Returns:
          The restored state, or None when there is no readable checkpoint (then any
          unreadable ones have been moved aside and the run starts from scratch).
        """
        self.manager.reload()
        steps = sorted(self.manager.all_steps(), reverse=True)
        abstract = jax.tree.map(_shape_dtype, template.arrays())
        if step is not None:
            if step not in steps:
                raise ValueError(f"no checkpoint at step {step} in {self.directory}; "
                                 f"available: {sorted(steps)}")
            try:
                arrays, position = self._read(step, abstract, data_iterator is not None)
            except CheckpointMismatchError:
                raise
            except Exception as e:
                raise ValueError(f"checkpoint {self.directory}/{step} is unreadable: "
                                 f"{_root_cause(e)}") from e
            if data_iterator is not None:
                data_iterator.set_state(position)
            return template.with_arrays(arrays)

        failed: dict[int, str] = {}
        newest = None  # (step, (arrays, position)): newest readable, older than every failure
        for candidate in steps:
            try:
                read = self._read(candidate, abstract, data_iterator is not None)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # a truncated, missing or emptied file of any item
                failed[candidate] = _root_cause(e)
                newest = None
                continue
            if newest is None:
                newest = (candidate, read)
        failed = self._agreed_failures(steps, failed)
        floor = min([*failed, *self._set_aside_at_open], default=None)
        resume = max((s for s in steps if s not in failed and (floor is None or s < floor)),
                     default=None)
        if resume is None:
            newest = None
        elif newest is None or newest[0] != resume:
            # Newer than a step set aside on opening, or than one another process failed on.
            newest = (resume, self._read(resume, abstract, data_iterator is not None))
        if data_iterator is not None and newest is not None:
            data_iterator.set_state(newest[1][1])
        if floor is not None:
            superseded = [s for s in steps if s not in failed and s > (resume or -1)]
            moved = self._move_aside(failed, superseded)
            lines = self._report({s: (moved[s], failed[s]) for s in failed},
                                 {s: moved[s] for s in superseded})
            if resume is None:
                lines.append("no readable checkpoint is older than every unreadable one: the "
                             "run starts from step 0; nothing was deleted.")
            else:
                lines.append(f"resuming from step {resume}: the run writes the later steps "
                             "again; nothing was deleted.")
            if jax.process_index() == 0:
                warnings.warn("\n".join(lines), RuntimeWarning, stacklevel=2)
            self._set_aside_at_open = {}
            self.manager.reload()
        return None if newest is None else template.with_arrays(newest[1][0])

    @staticmethod
    def _agreed_failures(steps: list[int], failed: dict[int, str]) -> dict[int, str]:
        """Steps unreadable on any process (every process must resume from the same one)."""
        if jax.process_count() == 1 or not steps:
            return failed
        flags = np.asarray(multihost_utils.process_allgather(
            np.array([s in failed for s in steps], np.int32))).reshape(-1, len(steps))
        return {s: failed.get(s, "unreadable on another process")
                for s, flag in zip(steps, flags.any(axis=0)) if flag}

    def _report(self, unreadable: Mapping[int, tuple[str, str]],
                superseded: Mapping[int, str]) -> list[str]:
        lines = [f"checkpoint {self.directory}/{s} is unreadable ({cause}); moved to {target}"
                 for s, (target, cause) in sorted(unreadable.items())]
        return lines + [f"checkpoint {self.directory}/{s} is readable but newer than an "
                        f"unreadable one; moved to {target} (the run writes it again)"
                        for s, target in sorted(superseded.items())]
