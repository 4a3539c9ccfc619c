"""train_and_evaluate: bad configs, optimizers from config, logging outputs."""

import os

import jax
import numpy as np
import optax
import pytest

from sing_jax.train import optimizers
from sing_jax.train.logging import MetricsLogger, Progress, plot_curves, read_metrics
from sing_jax.train.loop import default_config, train_and_evaluate, validate_config


def _tiny():
    c = default_config()
    c.model = dict(name="small_cnn", widths=(4, 8))
    c.batch_size = 64
    c.eval_batch_size = 512
    c.num_epochs = 1
    c.num_devices = 2
    c.logging.every_steps = 5
    return c


@pytest.mark.parametrize("change, message", [
    ({"num_epoch": 3}, r"config key 'num_epoch' is unknown; valid keys here: .*'num_epochs'"),
    ({"logging": {"evry_steps": 3}}, r"'logging.evry_steps' is unknown; .*'every_steps'"),
    ({"num_epochs": "ten"}, r"config key 'num_epochs': .*ten.*cannot be casted"),
    ({"parallel": "vmap"}, r"config.parallel='vmap'"),
    ({"compute_dtype": "fp8"}, r"compute_dtype='fp8'"),
])
def test_config_typos_are_errors(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate({**_tiny().to_dict(), **change}, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")


def test_default_config_refuses_keys_it_does_not_have():
    c = default_config()
    with pytest.raises(AttributeError, match='"num_epoch" does not exist'):
        c.num_epoch = 3
    with pytest.raises(AttributeError, match='Did you mean "every_steps"'):
        c.logging.evry_steps = 3
    c.model = dict(name="mlp", hidden=(8,))  # model/optimizer/schedule are replaced whole
    assert validate_config(c).model.hidden == (8,)


@pytest.mark.parametrize("section, value, message", [
    ("dataset", dict(name="cifar11"), r"unknown dataset 'cifar11'; valid names: .*'cifar10'"),
    ("model", dict(name="resnet21"), r"unknown model 'resnet21'; valid names: .*'resnet20'"),
    ("model", dict(name="small_cnn", widht=3), r"small_cnn takes no key\(s\) \['widht'\]"),
    ("optimizer", dict(name="adamx", learning_rate=1e-3),
     r"unknown optimizer 'adamx'; valid names: .*'adamsrt'.*'singd'"),
    ("optimizer", dict(name="sgdmrt", learning_rate=0.1, betas=(0.9, 0.99)),
     r"sgdmrt takes no key\(s\) \['betas'\]; its keys are .*'momentum'"),
    ("optimizer", dict(name="adamw", learning_rate=1e-3, channel_dims="conv"),
     r"adamw has no channel geometry"),
    ("schedule", dict(name="cosine_restarts"), r"unknown schedule 'cosine_restarts'"),
    ("schedule", dict(name="step", decay_epoch=(3,)), r"step takes no key\(s\) \['decay_epoch'\]"),
])
def test_unknown_names_and_keys_list_the_valid_ones(section, value, message, tmp_path):
    c = _tiny()
    setattr(c, section, value)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(c, str(tmp_path), quiet=True)


def test_batch_not_dividing_devices_names_the_numbers(tmp_path):
    c = _tiny()
    c.num_devices = 4
    c.batch_size = 66
    with pytest.raises(ValueError, match=r"config.batch_size=66 does not divide over 4 devices"):
        train_and_evaluate(c, str(tmp_path), quiet=True)


def test_build_optimizer_pieces():
    params = {"conv": {"kernel": jax.numpy.ones((3, 3, 2, 4))},
              "head": {"bias": jax.numpy.zeros(4)}}
    spec = optimizers.channel_dims_spec(dict(channel_dims="conv"), params)
    assert spec["conv"]["kernel"].axes == (-1,) and spec["head"]["bias"] is None
    rules = optimizers.channel_dims_spec(
        dict(channel_dims="rules", channel_rules=[(r"conv/kernel", (-1,))]), params)
    assert rules["conv"]["kernel"].axes == (-1,)
    # Clipping, freezing and accumulation compose: 2 micro-steps, then one clipped update.
    tx = optimizers.build_optimizer(
        dict(name="sgd", learning_rate=1.0, momentum=0.0, clip_grad_norm=1.0,
             grad_accum_steps=2, freeze=r"head/.*"), 1.0, params)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 10.0 * jax.numpy.ones_like(p), params)
    u1, state = tx.update(grads, state, params)
    assert all(float(abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))
    u2, state = tx.update(grads, state, params)
    np.testing.assert_allclose(optax.tree.norm(u2), 1.0, rtol=1e-5)
    assert float(abs(u2["head"]["bias"]).max()) == 0.0
    with pytest.raises(ValueError, match=r"freeze: pattern 'nothing/.\*' matches no parameter"):
        optimizers.build_optimizer(dict(name="sgd", learning_rate=0.1, freeze="nothing/.*"),
                                   0.1, params)


def test_schedules_follow_the_recipes():
    step = optimizers.build_schedule(dict(name="step", decay_epochs=(2, 3)), 1.0, 10, 4)
    np.testing.assert_allclose([step(0), step(19), step(20), step(30)], [1, 1, 0.1, 0.01],
                               rtol=1e-6)
    warm = optimizers.build_schedule(dict(name="warmup_cosine", warmup_fraction=0.1), 2.0, 10, 10)
    assert float(warm(0)) == 0.0 and abs(float(warm(10)) - 2.0) < 1e-6
    assert float(warm(100)) < 1e-6


def test_logger_progress_and_plot(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path))
    for step in range(1, 5):
        logger.write(step, "train", {"loss": 1.0 / step})
    logger.write(4, "epoch", {"epoch": 1, "train_loss": 0.5, "test_accuracy": 0.9})
    logger.write(8, "epoch", {"epoch": 2, "train_loss": 0.25, "test_accuracy": np.float32(0.95)})
    logger.truncate_after(4)
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]
    logger.close()
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    path = plot_curves({"run": records}, str(tmp_path / "c.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    progress = Progress(4, "epoch 1/1", every=2)   # stderr is not a terminal here
    for _ in range(4):
        progress.update(1, loss=0.5)
    progress.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "4/4 loss=0.5" in lines[-1]


@pytest.mark.slow
def test_pmap_run_with_grad_norms_writes_every_output(tmp_path):
    c = _tiny()
    c.parallel = "pmap"
    c.optimizer = dict(name="adamsrt", learning_rate=3e-3, channel_dims="auto")
    c.logging.grad_norms = True
    summary = train_and_evaluate(c, str(tmp_path), quiet=True)
    records = read_metrics(str(tmp_path))
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and "grad_norm/conv1/conv/kernel" in train_records[0]
    assert "effective_lr/conv1/conv/kernel" in train_records[0]  # detected as spherical
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert 0.0 <= epoch["valid_accuracy"] <= 1.0 and epoch["train_loss"] > 0
    assert summary.steps == 1365 // 64 and summary.best_valid_epoch == 1
    for name in ("config.json", "curves.png", "tensorboard"):
        assert os.path.exists(tmp_path / name), name
    assert os.listdir(tmp_path / "checkpoints")
    # Running again resumes at the end: nothing to train, the same numbers.
    again = train_and_evaluate(c, str(tmp_path), quiet=True)
    assert again.resumed_from_step == summary.steps
    assert again.test_accuracy_at_best_valid == summary.test_accuracy_at_best_valid


def test_validate_fills_partial_configs_with_the_defaults():
    assert validate_config(default_config()).to_dict() == default_config().to_dict()
    merged = validate_config({"num_epochs": 2, "logging": {"plot": False}})
    assert merged.num_epochs == 2 and merged.logging.plot is False
    assert merged.logging.every_steps == default_config().logging.every_steps


def test_singd_with_gradient_accumulation_sums_statistics_over_micro_batches(tmp_path):
    from sing_jax import SINGDMultiStepsState

    params = {"dense": {"kernel": jax.numpy.ones((3, 2)), "bias": jax.numpy.zeros(2)}}
    tx = optimizers.build_optimizer(dict(name="singd", learning_rate=0.05, grad_accum_steps=2),
                                    0.05, params)
    # Not optax.MultiSteps, which would refresh K, C from the last micro-batch only.
    assert isinstance(tx.init(params), SINGDMultiStepsState)
    c = _tiny()
    c.optimizer = dict(name="singd", learning_rate=0.05, T=2, grad_accum_steps=2)
    summary = train_and_evaluate(c, str(tmp_path), quiet=True)
    assert summary.steps > 0 and np.isfinite(summary.final_test_accuracy)


def test_batch_averaged_eval_is_the_mean_of_per_batch_accuracies(tmp_path):
    # digits test split: 360 = 256 + 104 examples in two eval batches
    records = {}
    for averaged in (False, True):
        c = _tiny()
        c.eval_batch_size = 256
        c.batch_averaged_eval = averaged
        c.logging.tensorboard = c.logging.plot = False
        train_and_evaluate(c, str(tmp_path / str(averaged)), quiet=True)
        records[averaged] = [r for r in read_metrics(str(tmp_path / str(averaged)))
                             if r["kind"] == "epoch"][-1]
    pooled, averaged = records[False]["test_accuracy"], records[True]["test_accuracy"]
    # pooled = (c1 + c2) / 360 and averaged = (c1 / 256 + c2 / 104) / 2, with c1, c2 the
    # correct counts of the two batches: both must come out as whole numbers
    c2 = (2 * averaged - 360 * pooled / 256) / (1 / 104 - 1 / 256)
    c1 = 360 * pooled - c2
    assert abs(c1 - round(c1)) < 1e-6 and abs(c2 - round(c2)) < 1e-6, (c1, c2)
    assert 0 <= round(c1) <= 256 and 0 <= round(c2) <= 104
    # one validation batch (72 examples): both ways agree
    assert records[True]["valid_accuracy"] == pytest.approx(records[False]["valid_accuracy"])
