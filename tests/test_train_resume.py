"""Exact resume after SIGKILL, and the checkpoint/workdir bad-input behaviours."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

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


def _final_arrays(workdir, config):
    # Rebuild a template the way the loop does, then restore the last checkpoint.
    from sing_jax.train import optimizers, registry

    model = registry.build_model("mlp", 10, (8, 8, 1), {"hidden": (16,), "norm": "batch"}, 0)
    tx = optimizers.build_optimizer(config.optimizer, optax.constant_schedule(1e-3),
                                    nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    train.set_batch_norm_axis(model)
    template = train.TrainState.create(model, tx, rng=0)
    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    try:
        return train.to_host(checkpointer.restore(template).arrays())
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


def test_best_checkpoint_kept_beyond_last_n(tmp_path):
    state, tx = _tiny_state()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:1]))
    state = step.place_state(state)
    for i, acc in enumerate([0.5, 0.9, 0.6, 0.7, 0.65]):
        state, _ = step(state, tiny_batch(seed=i))
        checkpointer.save(state.replace(data_state={"next_index": i + 1}), valid_accuracy=acc)
    checkpointer.wait()
    assert sorted(checkpointer.manager.all_steps()) == [2, 4, 5]
    assert checkpointer.best_step() == 2
    restored = checkpointer.restore(_tiny_state()[0], step=2)
    assert restored.data_state == {"next_index": 2}
    assert int(restored.step) == 2
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
    with pytest.warns(RuntimeWarning, match=r"checkpoints/2 is unreadable.*falling back to step 1"):
        restored = checkpointer.restore(_tiny_state()[0])
    checkpointer.close()
    assert int(restored.step) == 1
    for x, y in zip(jax.tree.leaves(train.to_host(restored.params)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(x, y)


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
