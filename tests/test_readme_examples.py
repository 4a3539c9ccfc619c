"""Every Python example in the README runs as written.

Each block is executed with only the names its prose assumes (a ``model``, a
``loss_fn``, a batch ``x, y``, ...), built here small; a block under a heading this
module does not know fails ``test_every_readme_block_is_run``, so a new example
cannot go untested. The two optimizer examples are run, with more checks, by
``test_readme_optimizers.py``.
"""

from __future__ import annotations

import functools
import inspect
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from tests import _data_helpers, _train_helpers

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RUN_ELSEWHERE = {("As a plain optax chain", 1), ("With Flax NNX", 1)}


def readme_python_blocks() -> dict[tuple[str, int], str]:
    """``{(heading, n): code}`` for the n-th Python block under each README heading."""
    blocks: dict[tuple[str, int], str] = {}
    heading, code, counts = None, None, {}
    for line in README.read_text().splitlines():
        if code is not None:
            if line.startswith("```"):
                blocks[(heading, counts[heading])] = "\n".join(code)
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            counts[heading] = counts.get(heading, 0) + 1
            code = []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = readme_python_blocks()


def _run(heading: str, n: int = 1, **names) -> dict:
    namespace = {"sing_jax": sing_jax, "ChannelDims": sing_jax.ChannelDims, **names}
    exec(BLOCKS[(heading, n)], namespace)
    return namespace


class LayerNormNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.dense(x)))


def test_every_readme_block_is_run():
    here = {key for key in BLOCKS if key not in RUN_ELSEWHERE}
    tested = {(heading, n) for heading, n in _CASES}
    assert here == tested, (
        f"README Python blocks without a test here: {sorted(here - tested)}; "
        f"tests of blocks the README no longer has: {sorted(tested - here)}")
    assert RUN_ELSEWHERE <= set(BLOCKS)


def _channel_dims():
    model = _train_helpers.ConvBNNet(nnx.Rngs(0))
    model.train()  # batch statistics: the scale invariance detect_channel_dims probes
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # plain arrays: the probes' BatchNorm updates stay local
    ns = _run("Channel dims", params=nnx.as_pure(params),
              apply_fn=lambda p, x: nnx.merge(graphdef, p, rest)(x),
              batch=jax.random.normal(jax.random.key(1), (8, 6, 6, 3)))
    assert ns["spec"]["conv"]["kernel"] == sing_jax.ChannelDims((-1,))
    assert ns["spec"]["head"]["kernel"] is None
    assert "head/kernel: not scale invariant" in ns["report"]


def _singd():
    def loss_fn(model, x, y):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "SINGD layer_overrides: pattern .embed.")  # none here
        ns = _run("SINGD: structured inverse-free natural gradient (`sing_jax.singd`)",
                  model=_train_helpers.ConvBNNet(nnx.Rngs(0)), loss_fn=loss_fn)
    params, rest, opt_state = ns["params"], ns["rest"], ns["opt_state"]
    x, y = jax.random.normal(jax.random.key(1), (8, 6, 6, 3)), jnp.arange(8) % 2
    losses = []
    for _ in range(3):
        params, rest, opt_state, loss = ns["train_step"](params, rest, opt_state, x, y)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "conv" in sing_jax.singd_report(opt_state)


def _nn_models():
    ns = _run("Flax NNX modules and models (`sing_jax.nn`)")
    assert ns["mean"].shape == ns["std"].shape == (4, 10)
    assert np.isfinite(float(ns["loss_extra"]))


def _schedules():
    ns = _run("Schedules (`sing_jax.schedules`)")
    ns["tx"].init({"w": jnp.ones((3, 3))})
    assert float(ns["lr"](0)) == 0.0 and float(ns["lr"](5_000)) == pytest.approx(1e-2)


def _clipping():
    ns = _run("Gradient clipping", optax=optax, lr=1e-3, steps_per_epoch=10)
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = ns["tx"].update(grads, ns["tx"].init(params), params)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def _freezing():
    model = LayerNormNet(nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ns = _run("Freezing and transfer learning", 1, model=model)

    def loss_fn(m):  # varied inputs: SING centralises a constant-row kernel gradient to 0
        return jnp.mean(m(jax.random.normal(jax.random.key(1), (4, 6))) ** 2)

    ns["optimizer"].update(model, nnx.grad(loss_fn)(model))
    np.testing.assert_array_equal(model.norm.scale[...], before["norm"]["scale"])
    assert not np.array_equal(model.dense.kernel[...], before["dense"]["kernel"])


def _transfer():
    my_net = functools.partial(_train_helpers.TinyResNet, _train_helpers.ResidualConvBlock)

    def MyNet(num_classes, rngs):  # noqa: N802 (a class in the README's words)
        return my_net(classes=num_classes, rngs=rngs)

    trained = MyNet(num_classes=10, rngs=nnx.Rngs(0))
    # the block continues the previous one, which imported nnx
    ns = _run("Freezing and transfer learning", 2, nnx=nnx, optax=optax, MyNet=MyNet,
              trained=trained)
    np.testing.assert_array_equal(ns["new_model"].stem.kernel[...], trained.stem.kernel[...])
    assert ns["new_model"].head.kernel.shape == (4, 2)


def _data(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SING_JAX_DATA_DIR",
                       str(_data_helpers.session_data_dir(tmp_path_factory)))
    ns = _run("Data: TFDS + grain, no TensorFlow", 1)
    assert (ns["ds"].info.num_classes, ns["ds"].info.image_shape) == (10, (8, 8, 1))
    assert ns["batch"]["mask"].any()


def _prepare(tmp_path):
    import sing_jax.data as sd

    source, manual = tmp_path / "src", tmp_path / "manual"
    _data_helpers.write_fake_cifar10(source)
    _data_helpers.write_fake_svhn(source)
    _data_helpers.write_fake_imagenet_manual_dir(manual)
    _run("Data: TFDS + grain, no TensorFlow", 2, sd=sd, DATA_DIR=tmp_path / "data",
         SRC=source, MANUAL=manual)
    for name in ("cifar10", "svhn_cropped", "imagenet2012"):
        assert sd.get_info(name, data_dir=tmp_path / "data").num_examples["train"] > 0


def _training():
    batch = _train_helpers.tiny_batch(n=16)
    ns = _run("Training (`sing_jax.train`, `experiments/`)",
              MyModel=functools.partial(_train_helpers.TinyConvNet, 3),
              x=batch["image"], y=batch["label"], m=np.ones(16, bool))
    assert int(ns["state"].step) == 1 and np.isfinite(float(ns["metrics"]["loss"]))
    assert float(ns["sums"]["count"]) == 16


_CASES = {
    ("Channel dims", 1): _channel_dims,
    ("SINGD: structured inverse-free natural gradient (`sing_jax.singd`)", 1): _singd,
    ("Flax NNX modules and models (`sing_jax.nn`)", 1): _nn_models,
    ("Schedules (`sing_jax.schedules`)", 1): _schedules,
    ("Gradient clipping", 1): _clipping,
    ("Freezing and transfer learning", 1): _freezing,
    ("Freezing and transfer learning", 2): _transfer,
    ("Data: TFDS + grain, no TensorFlow", 1): _data,
    ("Data: TFDS + grain, no TensorFlow", 2): _prepare,
    ("Training (`sing_jax.train`, `experiments/`)", 1): _training,
}


@pytest.mark.parametrize("key", list(_CASES), ids=[f"{h[:24]}-{n}" for h, n in _CASES])
def test_readme_block_runs(key, request):
    case = _CASES[key]
    fixtures = {name: request.getfixturevalue(name)
                for name in inspect.signature(case).parameters}
    case(**fixtures)
