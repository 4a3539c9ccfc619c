"""The experiment configs (tiny modes), the README main command and reproduce.py."""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from experiments.configs import learnable_scaler_vit, quickstart, sing, singd, spherical
from sing_jax._src.paths import leaf_paths
from sing_jax.data import get_info
from sing_jax.train import optimizers, registry
from sing_jax.train.loop import train_and_evaluate, validate_config

TINY_ARGS = [
    (quickstart, "digits,adamw,tiny"), (quickstart, "mnist1d,singd,tiny"),
    (spherical, "cifar10,resnet20,adamsrt,tiny"), (spherical, "svhn,vgg16,sgdmrt,tiny"),
    (spherical, "cifar100,resnet18,adamg,tiny"),
    (spherical, "cifar10,resnet20,adamg,adamg_as_written,tiny"),
    (spherical, "imagenet,resnet18,sgdmrt,tiny"),
    (sing, "cifar10,resnet18,constant_cosine,tiny"), (sing, "imagenet,vit,freeze_ln,tiny"),
    (singd, "digits,small_cnn,diagonal,tiny"),
    (learnable_scaler_vit, "16,192,24,learnable_scaler,tiny"),
]


@pytest.mark.parametrize("module, arg", TINY_ARGS, ids=[a for _, a in TINY_ARGS])
def test_tiny_configs_build_a_model_and_optimizer(module, arg):
    config = validate_config(module.get_config(arg))
    info = get_info(registry.resolve_dataset(config.dataset.name))
    kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    # Abstract build (shapes only): the configs' keys are what is tested, not the init.
    model = nnx.eval_shape(lambda: registry.build_model(
        config.model.name, info.num_classes, info.image_shape, kwargs, 0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optimizers.build_optimizer(config.optimizer, 1e-3, params,
                                    detect_channel_dims=lambda: None)
    opt_state = jax.eval_shape(tx.init, params)
    assert jax.tree.leaves(opt_state)


def test_full_configs_follow_the_seed_protocols():
    c = spherical.get_config("cifar100,vgg16,adamsrt")
    assert (c.batch_size, c.eval_batch_size, c.num_epochs) == (128, 1024, 405)
    assert tuple(c.schedule.decay_epochs) == (135, 225, 315)
    assert c.optimizer.channel_dims == "conv" and c.optimizer.b2 == 0.99
    assert (c.model.init, c.model.unbiased_running_var) == ("pytorch_default", True)
    assert spherical.get_config("svhn,resnet18,sgd").dataset.augment is False
    assert spherical.get_config("cifar10,resnet20,sgd").model.shortcut == "projection"
    # the reference script's data quirks are on by default; 'clean' turns them all off
    quirks = lambda c: (c.dataset.keep_partial_batch, c.dataset.augment_validation,  # noqa: E731
                        c.dataset.validation_rounding, c.batch_averaged_eval)
    assert quirks(c) == (True, True, "floor", True)
    assert quirks(spherical.get_config("cifar100,vgg16,adamsrt,clean")) == (
        False, False, "round", False)
    i = spherical.get_config("imagenet,resnet18,adams")
    assert (i.model.variant, i.batch_size, i.eval_batch_size) == ("imagenet", 256, 512)
    assert (i.dataset.mix, i.dataset.rand_augment) == (False, False)
    g = spherical.get_config("cifar10,vgg16,adamg,adamg_as_written").optimizer
    assert (g.channel_dims, g.single_element_spheres) == ("rules", True)
    assert spherical.grid("imagenet,resnet18") == [
        f"imagenet,resnet18,{o}" for o in ("sgd", "adam", "sgdmrt", "adams", "adamsrt")]
    v = learnable_scaler_vit.get_config("32,288,36,layer")
    assert (v.optimizer.name, v.optimizer.weight_decay, v.optimizer.clip_grad_norm,
            v.optimizer.grad_accum_steps) == ("lamb", 0.02, 14.0, 8)
    # bf16 autocast: matmuls in bf16 inside the model, everything else float32
    assert (v.model.matmul_dtype, v.compute_dtype) == ("bfloat16", "float32")
    assert (v.model.patch_size, v.model.embed_dim, v.model.depth) == (32, 288, 36)
    for module, bad, message in [
            (spherical, "cifar100,resnet20,sgd", "ResNet-20 on cifar10 only"),
            (spherical, "mnist,resnet18,sgd", "unknown dataset 'mnist'"),
            (spherical, "imagenet,vgg16,sgd", "ImageNet with resnet18 only"),
            (spherical, "imagenet,resnet18,adamw", "no cell imagenet,resnet18,adamw"),
            (spherical, "cifar10,resnet18,sgd,adamg_as_written", "switch of the adamg cells"),
            (learnable_scaler_vit, "16,192,12,layer", "not a row of the seed 004 table"),
            (quickstart, "digits,rmsprop", "unknown optimizer 'rmsprop'")]:
        with pytest.raises(ValueError, match=message):
            module.get_config(bad)


def test_sing_configs_name_their_model_augmentation_and_the_seed_values():
    c = sing.get_config("imagenet,resnet18")
    assert (c.model.variant, c.dataset.rand_augment, c.dataset.mix) == ("imagenet", False, False)
    model = nnx.eval_shape(lambda: registry.build_model(
        "resnet18", 1000, (224, 224, 3), {"variant": c.model.variant}, 0))
    assert model.stem.conv.kernel.shape == (7, 7, 3, 64)  # ImageNet stem (+ max-pool)
    v = sing.get_config("imagenet,vit")
    assert (v.dataset.rand_augment, v.dataset.mix, v.model.init) == (True, True, "timm")
    assert "variant" not in sing.get_config("cifar10,resnet18").model
    for arg in ("cifar10,resnet18", "cifar100,vgg16", "imagenet,resnet18", "imagenet,vit"):
        o = sing.get_config(arg).optimizer
        assert (o.learning_rate, o.weight_decay) == (1e-1, 5e-3)  # seed 000's stated pair
        assert "freeze" not in o
    # freeze_ln: exactly the LayerNorms' scale and bias are frozen
    f = sing.get_config("imagenet,vit,freeze_ln,tiny")
    model = nnx.eval_shape(lambda: registry.build_model(
        "vit", 10, (8, 8, 1), {k: w for k, w in f.model.to_dict().items() if k != "name"}, 0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    frozen = optimizers.frozen_mask(f.optimizer.freeze, params)
    names = [path for path, flag in zip(leaf_paths(params), jax.tree.leaves(frozen)) if flag]
    assert names == [f"blocks/{i}/{n}/{p}" for i in (0, 1) for n in ("norm1", "norm2")
                     for p in ("bias", "scale")] + ["norm/bias", "norm/scale"]
    for bad, message in [("cifar10,resnet18,freeze_ln", "has no LayerNorm"),
                         ("imagenet,vgg16", "not a imagenet model"),
                         ("cifar10,vit", "not a cifar10 model")]:
        with pytest.raises(ValueError, match=message):
            sing.get_config(bad)


@pytest.mark.slow
def test_vit_recipe_tiny_trains(tmp_path):
    # LAMB, clipping, accumulation, the custom schedule and both auxiliary losses; an
    # extra test set (here the same digits test split) evaluated every epoch.
    config = learnable_scaler_vit.get_config("16,192,24,learnable_scaler,tiny")
    config.dataset.extra_test = ("digits",)
    summary = train_and_evaluate(config, str(tmp_path), quiet=True)
    assert summary.steps == 1365 // 64
    assert summary.final_test_accuracy > 0.1
    assert summary.extra_test_accuracy == {"digits": summary.final_test_accuracy}
    assert summary.extra_test_accuracy_at_best == {"digits": summary.best_test_accuracy}
    assert (summary.best_test_epoch, summary.best_test_accuracy) == (
        1, summary.final_test_accuracy)


@pytest.mark.slow
def test_readme_main_command_tiny(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path}", "--tiny",
         "--datasets=digits", "--optimizers=singd"],
        env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line.split() for line in out.stdout.splitlines() if line.startswith("digits")]
    assert [row[1] for row in table] == ["singd"]
    for row in table:
        assert 0.0 < float(row[2].rstrip("%")) <= 100.0  # test accuracy at best valid
        assert float(row[4]) > 0                          # ms per step
    assert open(tmp_path / "quickstart_digits.png", "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_reproduce_spherical_tiny_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", "--config=spherical",
         "--grid=cifar10,resnet20", "--tiny", "--only=adamsrt", "--seeds=1",
         f"--workdir={tmp_path}"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("| Adam-SRT")]
    assert len(row) == 1 and row[0].endswith("| 91.81 (0.20) |")
    ours = float(row[0].split("|")[2].split()[0])
    assert 0.0 < ours <= 100.0
    summary = [json.loads(line) for line in open(next(tmp_path.rglob("metrics.jsonl")))
               if '"summary"' in line][-1]
    assert summary["steps"] == 22  # digits: 1365 = 21 * 64 + 21, the partial batch kept


def test_reproduce_table_mean_std_and_layout():
    from experiments.reproduce import format_table, mean_std

    assert mean_std([0.9]) == (90.0, 0.0)
    mean, std = mean_std([0.90, 0.92, 0.94])
    assert abs(mean - 92.0) < 1e-9 and abs(std - 2.0) < 1e-9
    table = format_table("CIFAR10 resnet20", [("SGD-M", [0.9, 0.92, 0.94], (92.39, 0.12)),
                                              ("Adam", [0.91], None)]).splitlines()
    assert table[0] == "| Method | CIFAR10 resnet20 (ours) | CIFAR10 resnet20 (published) |"
    assert table[2] == "| SGD-M | 92.00 (2.00) | 92.39 (0.12) |"
    assert table[3] == "| Adam | 91.00 (0.00) | - |"


def test_singd_example_trains_the_small_cnn_on_embedded_digits():
    import warnings

    import numpy as np

    from experiments import singd_example

    x_test, y_test = singd_example.digits_test_set()
    assert x_test.shape[1:] == (8, 8, 1) and len(x_test) == len(y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, losses = singd_example.train(
            "singd", singd_example.example_optimizers()["singd"], steps=120, batch=64)
    # Its defaults used to diverge (lr_cov=0.05): the loss must fall from log(10).
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    accuracy = float(np.mean(np.argmax(model(x_test), -1) == y_test))
    assert accuracy > 0.8
