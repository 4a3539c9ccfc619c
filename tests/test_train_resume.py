"""Exact resume after SIGKILL, and the checkpoint/workdir bad-input behaviours."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sing_jax import train
from sing_jax.train import checkpoint as ckpt_lib
from sing_jax.train.logging import read_metrics
from sing_jax.train.loop import default_config, train_and_evaluate
from tests._train_helpers import TinyConvNet, tiny_batch

TIMING_KEYS = ("step_time_s", "images_per_s", "compile_time_s", "resumed_from_step",
               "timed_steps")


def _config():
    c = default_config()
    c.model = dict(name="mlp", hidden=(16,), norm="batch")
    c.optimizer = dict(name="adamw", learning_rate=3e-3, weight_decay=1e-4)
    c.schedule = dict(name="warmup_cosine", warmup_fraction=0.1)
    c.batch_size = 128
    c.eval_batch_size = 256
    c.num_epochs = 2          # 10 steps per epoch on digits
    c.num_devices = 2
    c.checkpoint.every_steps = 3
    c.logging.every_steps = 1
    c.logging.plot = False
    c.logging.tensorboard = False
    return c


CHILD = textwrap.dedent("""
    import os, signal, sys
    import sing_jax.train.loop as loop
    from tests.test_train_resume import _config

    kill_at = int(sys.argv[2])
    make = loop.make_train_step

    def make_killing_step(*args, **kwargs):
        step = make(*args, **kwargs)
        calls = {"n": 0}
        call = step.__call__

        class Killing:
            def __getattr__(self, name):
                return getattr(step, name)

            def __call__(self, state, batch):
                out = call(state, batch)
                calls["n"] += 1
                if calls["n"] == kill_at:
                    jax.block_until_ready(out)
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

        return Killing()

    import jax
    if kill_at > 0:
        loop.make_train_step = make_killing_step
    loop.train_and_evaluate(_config(), sys.argv[1], quiet=True)
""")


def _run_child(workdir, kill_at, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, str(script), str(workdir), str(kill_at)], env=env,
                          cwd=os.getcwd(), capture_output=True, text=True, timeout=300)


def _template(config):
    # A state of the model and optimizer the loop builds from ``config``.
    from sing_jax.train import optimizers, registry

    model = registry.build_model("mlp", 10, (8, 8, 1), {"hidden": (16,), "norm": "batch"}, 0)
    tx = optimizers.build_optimizer(config.optimizer, optax.constant_schedule(1e-3),
                                    nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    train.set_batch_norm_axis(model)
    return train.TrainState.create(model, tx, rng=0)


def _final_arrays(workdir, config):
    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    try:
        return train.to_host(checkpointer.restore(_template(config)).arrays())
    finally:
        checkpointer.close()


def _records(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(workdir)]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    summary = train_and_evaluate(_config(), str(straight), quiet=True)
    assert summary.steps == 20 and summary.resumed_from_step is None

    # Killed at step 14 of 20 (mid second epoch; checkpoints every 3 steps, async).
    first = _run_child(killed, 14, tmp_path)
    assert first.returncode == -9, first.stderr[-2000:]
    steps_logged = [r["step"] for r in read_metrics(killed) if r["kind"] == "train"]
    assert max(steps_logged) == 13  # killed inside step 14, before it was logged
    second = _run_child(killed, 0, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = [r for r in read_metrics(killed) if r["kind"] == "summary"][0]
    assert resumed["resumed_from_step"] in (9, 10, 12)

    assert _records(straight) == _records(killed)
    a, b = _final_arrays(straight, _config()), _final_arrays(killed, _config())
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# Disk faults in a finished checkpoint, and the root cause each warning must name.
DAMAGES = {
    "truncate the largest data file of the parameter store":
        r"ValueError: OUT_OF_RANGE: .*Requested byte range \[0, \d+\) is not valid for value "
        r"of size \d+",
    "delete the data iterator's file": r"ValueError: File .*process_0-of-1.json does not exist",
    "empty the parameter store's metadata": r"JSONDecodeError: Expecting value",
}


def _damage(step_dir, how):
    if how.startswith("truncate"):
        store = step_dir / "state" / "d"  # the OCDBT data files the arrays are read from
        path = max((store / name for name in os.listdir(store)), key=os.path.getsize)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how.startswith("delete"):
        os.remove(step_dir / "data" / "process_0-of-1.json")
    else:
        open(step_dir / "state" / "_METADATA", "w").close()


def _files(directory):
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def _constant_lr_config(num_epochs):
    # A constant learning rate: the first epoch of a 1-epoch run is that of a 2-epoch run.
    c = _config()
    c.schedule = dict(name="constant")
    c.num_devices = 1
    c.num_epochs = num_epochs
    return c


def _kept_checkpoints(workdir):
    """Every kept step -> (arrays, data position), and the best step."""
    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    try:
        kept = {}
        for step in checkpointer.manager.all_steps():
            position = _position()
            restored = checkpointer.restore(_template(_config()), step=step,
                                            data_iterator=position)
            kept[step] = (train.to_host(restored.arrays()), position.get_state())
        return kept, checkpointer.best_step()
    finally:
        checkpointer.close()


def _assert_same_run(workdir, reference):
    assert _records(workdir) == _records(reference)
    kept, best = _kept_checkpoints(workdir)
    expected, expected_best = _kept_checkpoints(reference)
    assert sorted(kept) == sorted(expected) and best == expected_best
    for step, (arrays, position) in kept.items():
        _assert_same_arrays(arrays, expected[step][0])
        assert position == expected[step][1]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    train_and_evaluate(_constant_lr_config(2), str(workdir), quiet=True)
    return workdir


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_epoch")
    train_and_evaluate(_constant_lr_config(1), str(workdir), quiet=True)
    return workdir


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_is_moved_aside_and_written_again(damage, one_epoch_run,
                                                                     straight_run, tmp_path):
    # A run of 1 epoch (checkpoints at 9 and 10) is extended to 2 after a disk fault hit
    # checkpoint 10: it resumes from 9, writes 10 again and ends as the straight run.
    workdir = tmp_path / "run"
    shutil.copytree(one_epoch_run, workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "9"]
    _damage(workdir / "checkpoints" / "10", damage)
    damaged = _files(workdir / "checkpoints" / "10")
    with pytest.warns(RuntimeWarning, match=rf"checkpoints/10 is unreadable \({DAMAGES[damage]}"
                                            r".*\); moved to .*checkpoints/10\.corrupt-\d{8}T"
                                            r"\d{6}Z\nresuming from step 9"):
        summary = train_and_evaluate(_constant_lr_config(2), str(workdir), quiet=True)
    assert summary.resumed_from_step == 9 and summary.steps == 20
    (moved,) = [n for n in os.listdir(workdir / "checkpoints") if n.startswith("10.corrupt-")]
    assert _files(workdir / "checkpoints" / moved) == damaged  # kept as it was found
    _assert_same_run(workdir, straight_run)


def test_finished_run_with_a_damaged_final_checkpoint_computes_it_again(straight_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    _damage(workdir / "checkpoints" / "20", "truncate the largest data file of the parameter store")
    with pytest.warns(RuntimeWarning, match=r"checkpoints/20 is unreadable \(ValueError: "
                                            r"OUT_OF_RANGE.*\nresuming from step 18"):
        summary = train_and_evaluate(_constant_lr_config(2), str(workdir), quiet=True)
    assert summary.resumed_from_step == 18 and summary.steps == 20
    _assert_same_run(workdir, straight_run)


def _tiny_state(channels=4):
    tx = optax.adam(1e-2)
    return train.TrainState.create(TinyConvNet(channels=channels, rngs=nnx.Rngs(0)), tx, 0), tx


def _train_some(state, tx, steps, options=None):
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:1]),
                                 options=options or train.StepOptions())
    state = step.place_state(state)
    for i in range(steps):
        state, _ = step(state, tiny_batch(seed=i))
    return state


def _position(start: int = 0):
    """A grain iterator standing in for a run's data stream (its state is the position)."""
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(start):
        next(it)
    return it


def _save_steps(checkpointer, state, tx, accuracies, data_iterator):
    """One train step and one checkpoint (ranked by the accuracy) per accuracy."""
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:1]))
    state = step.place_state(state)
    saved = {}
    for i, acc in enumerate(accuracies):
        state, _ = step(state, tiny_batch(seed=i))
        next(data_iterator)
        checkpointer.save(state, data_iterator=data_iterator, valid_accuracy=acc)
        saved[i + 1] = train.to_host(state.arrays())
    checkpointer.wait()
    return saved


def _assert_same_arrays(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_best_checkpoint_kept_beyond_last_n(tmp_path):
    state, tx = _tiny_state()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    _save_steps(checkpointer, state, tx, [0.5, 0.9, 0.6, 0.7, 0.65], _position())
    assert sorted(checkpointer.manager.all_steps()) == [2, 4, 5]
    assert checkpointer.best_step() == 2
    position = _position()
    restored = checkpointer.restore(_tiny_state()[0], step=2, data_iterator=position)
    assert int(restored.step) == 2
    assert position.get_state() == {"next_index": 2} and next(position) == 2
    checkpointer.close()


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path):
    state, tx = _tiny_state()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
    state = _train_some(state, tx, 1)
    checkpointer.save(state)
    expected = train.to_host(state.params)
    state = _train_some(state, tx, 1)
    checkpointer.save(state)
    checkpointer.close()
    latest = tmp_path / "checkpoints" / "2" / "state"
    # Damage every data file of the latest checkpoint (a crash while writing).
    for root, _, files in os.walk(latest):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
    with pytest.warns(RuntimeWarning, match=r"checkpoints/2 is unreadable \(.+\); moved to "
                                            r".*checkpoints/2\.corrupt-.*\nresuming from step 1"):
        restored = checkpointer.restore(_tiny_state()[0])
    assert checkpointer.manager.all_steps() == [1]
    checkpointer.close()
    assert int(restored.step) == 1
    for x, y in zip(jax.tree.leaves(train.to_host(restored.params)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(x, y)


def test_damaged_best_checkpoint_is_written_again_and_stays_the_best(tmp_path):
    # Orbax reads every checkpoint's metrics when it opens the directory: an emptied
    # metrics file of the best checkpoint (kept beyond the last 2) is moved aside there;
    # no readable checkpoint is older, so the later ones are moved aside too and the
    # run starts over, writing the same checkpoints and the same best pointer again.
    accuracies = [0.5, 0.9, 0.6, 0.7, 0.65]
    state, tx = _tiny_state()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    first = _save_steps(checkpointer, state, tx, accuracies, _position())
    checkpointer.close()
    open(tmp_path / "checkpoints" / "2" / "metrics" / "metrics", "w").close()

    with pytest.warns(RuntimeWarning, match=r"checkpoints/2 is unreadable \(its metrics file "
                                            r".*JSONDecodeError.*\); moved to .*2\.corrupt-"):
        checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    position = _position(start=3)
    with pytest.warns(RuntimeWarning, match=r"(?s)checkpoints/4 is readable but newer than an "
                                            r"unreadable one; moved to .*4\.superseded-.*"
                                            r"5\.superseded-.*starts from step 0"):
        assert checkpointer.restore(_tiny_state()[0], data_iterator=position) is None
    assert position.get_state() == {"next_index": 3}  # nothing restored: left as it was
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert [n.split("-")[0] for n in names] == ["2.corrupt", "4.superseded", "5.superseded"]

    again = _save_steps(checkpointer, _tiny_state()[0], tx, accuracies, _position())
    assert sorted(checkpointer.manager.all_steps()) == [2, 4, 5]
    assert checkpointer.best_step() == 2
    for step in (2, 4, 5):
        _assert_same_arrays(again[step], first[step])
        position = _position()
        restored = checkpointer.restore(_tiny_state()[0], step=step, data_iterator=position)
        _assert_same_arrays(train.to_host(restored.arrays()), first[step])
        assert position.get_state() == {"next_index": step}
    checkpointer.close()


def test_checkpoints_of_the_earlier_data_item_layout_restore(tmp_path):
    # Before grain's handler saved the iterator, its state was an orbax JSON item.
    import orbax.checkpoint as ocp

    state, tx = _tiny_state()
    state = _train_some(state, tx, 1)
    manager = ocp.CheckpointManager(
        tmp_path / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "data": ocp.JsonCheckpointHandler()})
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.arrays()),
        data=ocp.args.JsonSave({"data_state": {"next_index": 7}})))
    manager.wait_until_finished()
    manager.close()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    position = _position()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        restored = checkpointer.restore(_tiny_state()[0], data_iterator=position)
    checkpointer.close()
    _assert_same_arrays(train.to_host(restored.arrays()), train.to_host(state.arrays()))
    assert next(position) == 7


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    state, tx = _tiny_state(channels=4)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(_train_some(state, tx, 1))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"leaf model_state/norm/mean has shape \(4,\) there, "
                             r"\(6,\) now"):
        checkpointer.restore(_tiny_state(channels=6)[0])
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_singd_checkpoints_restore_exactly_and_other_layouts_are_refused(tmp_path):
    # A SINGD state (dense factors keeping S S^T at T=2) restores into the same
    # optimizer and trains on as it would have; one that keeps other products
    # (cache_outer_products differs) is refused, naming the leaves.
    import sing_jax

    def singd(cache):
        tx = sing_jax.singd(0.05, T=2, lr_cov=0.05, cache_outer_products=cache)
        return train.TrainState.create(TinyConvNet(channels=4, rngs=nnx.Rngs(0)), tx, 0), tx

    saved, tx = singd(True)
    singd_step = train.StepOptions(singd=True)
    saved = _train_some(saved, tx, 3, singd_step)
    assert any(lp.k_outer is not None or lp.c_outer is not None
               for lp in sing_jax.singd_state(saved.opt_state).layers)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(saved)
    restored = checkpointer.restore(singd(True)[0])
    assert int(restored.step) == 3

    def params_after(state, steps):
        return jax.tree.leaves(_train_some(state, tx, steps, singd_step).params)

    for a, b in zip(params_after(restored, 2), params_after(saved, 2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="leaves the state lacks"):
        checkpointer.restore(singd(False)[0])
    checkpointer.close()


def test_foreign_workdir_refused_unless_overwrite(tmp_path):
    config = _config()
    assert ckpt_lib.prepare_workdir(str(tmp_path), config) is False
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    assert ckpt_lib.prepare_workdir(str(tmp_path), config) is True  # same experiment
    other = _config()
    other.optimizer = dict(name="sgd", learning_rate=0.1)
    stored = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"another experiment.*optimizer.name: 'adamw' in the "
                                         r"workdir, 'sgd' now.*--overwrite"):
        ckpt_lib.prepare_workdir(str(tmp_path), other)
    assert (tmp_path / "config.json").read_text() == stored
    assert (tmp_path / "checkpoints" / "7").exists()
    # Resume-safe keys (logging, epochs) may change.
    longer = _config()
    longer.num_epochs = 5
    assert ckpt_lib.prepare_workdir(str(tmp_path), longer) is True
    assert ckpt_lib.prepare_workdir(str(tmp_path), other, overwrite=True) is False
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "config.json").read_text())["optimizer.name"] == "sgd"


def test_checkpoints_without_config_are_refused(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds checkpoints but there is no config.json"):
        ckpt_lib.prepare_workdir(str(tmp_path), _config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt_lib.prepare_workdir(str(tmp_path), _config(), overwrite=True) is False
