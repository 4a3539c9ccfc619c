"""Every Python example of the README and of docs/ runs as written.

The ``python`` blocks of a page run in order in one namespace, as a reader would
paste them into one session; a page may get a few names its prose assumes (a
prepared data directory) from ``SETUP`` and extra checks on the resulting
namespace from ``CHECKS``. A new page or block is picked up without editing this
module. The docstring examples (``>>>``) of the package run here too.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import _data_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((ROOT / page).read_text())


def _data_setup(request, tmp_path, monkeypatch):
    data_dir = _data_helpers.session_data_dir(request.getfixturevalue("tmp_path_factory"))
    monkeypatch.setenv("SING_JAX_DATA_DIR", str(data_dir))
    source, manual = tmp_path / "src", tmp_path / "manual"
    _data_helpers.write_fake_cifar10(source)
    _data_helpers.write_fake_svhn(source)
    _data_helpers.write_fake_imagenet_manual_dir(manual)
    return {"DATA_DIR": tmp_path / "data", "SRC": source, "MANUAL": manual}


SETUP = {"docs/data.md": _data_setup}


def _check_readme(ns):
    assert np.isfinite(ns["losses"]).all() and ns["losses"][-1] < ns["losses"][0]
    assert ns["spec"]["conv"]["kernel"] == ns["sing_jax"].ChannelDims((-1,))
    assert ns["spec"]["head"]["kernel"] is None
    assert "conv" in ns["sing_jax"].singd_report(ns["opt_state"])


def _check_optimizers(ns):
    assert ns["spec"]["conv"]["kernel"] == ns["ChannelDims"]((-1,))
    assert ns["spec"]["head"]["kernel"] is None
    assert "head/kernel: not scale invariant" in ns["report"]
    assert np.isfinite(float(ns["loss"]))
    # the written-out chain is SING without Lookahead
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    grads = jax.tree.map(jnp.cos, params)
    ours, _ = ns["tx"].update(grads, ns["tx"].init(params), params)
    same, _ = ns["same"].update(grads, ns["same"].init(params), params)
    jax.tree.map(np.testing.assert_allclose, ours, same)


def _check_recipes(ns):
    # the freezing example's optimizer, built again (the transfer example reuses the name)
    freeze_model = ns["LayerNormNet"](nnx.Rngs(0))
    tx = ns["sing_jax"].freeze(ns["sing_jax"].sing(1e-2),
                               ns["sing_jax"].frozen_norm_affine(freeze_model))
    frozen_opt = nnx.Optimizer(freeze_model, tx, wrt=nnx.Param)
    scale, kernel = freeze_model.norm.scale[...], freeze_model.dense.kernel[...]

    def loss_fn(m):  # varied inputs: SING centralises a constant-row kernel gradient to 0
        return jnp.mean(m(jax.random.normal(jax.random.key(1), (4, 6))) ** 2)

    frozen_opt.update(freeze_model, nnx.grad(loss_fn)(freeze_model))
    np.testing.assert_array_equal(freeze_model.norm.scale[...], scale)
    assert not np.array_equal(freeze_model.dense.kernel[...], kernel)
    np.testing.assert_array_equal(ns["new_model"].conv1.conv.kernel[...],
                                  ns["trained"].conv1.conv.kernel[...])


def _check_data(ns):
    assert (ns["ds"].info.num_classes, ns["ds"].info.image_shape) == (10, (8, 8, 1))
    assert ns["batch"]["mask"].any()
    for name in ("cifar10", "svhn_cropped", "imagenet2012"):
        assert ns["sd"].get_info(name, data_dir=ns["DATA_DIR"]).num_examples["train"] > 0


def _check_training(ns):
    assert np.isfinite(float(ns["metrics"]["loss"]))
    assert float(ns["sums"]["count"]) == 16


def _check_nn(ns):
    assert ns["mean"].shape == ns["std"].shape == (4, 10)
    assert np.isfinite(float(ns["loss_extra"]))


CHECKS = {"README.md": _check_readme, "docs/optimizers.md": _check_optimizers,
          "docs/recipes.md": _check_recipes, "docs/data.md": _check_data,
          "docs/training.md": _check_training, "docs/nn.md": _check_nn}


def test_every_page_with_checks_exists():
    assert set(CHECKS) | set(SETUP) <= set(PAGES)
    assert "README.md" in PAGES and len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, request, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page} has no Python example")
    namespace = SETUP[page](request, tmp_path, monkeypatch) if page in SETUP else {}
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"{page} (python block {i})", "exec"), namespace)
    if page in CHECKS:
        CHECKS[page](namespace)


def test_docstring_examples_run():
    """Every module of the package with a ``>>>`` example in its docstrings."""
    package = ROOT / "sing_jax"
    names = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                   for path in package.rglob("*.py") if ">>>" in path.read_text())
    assert "sing_jax._src.aliases" in names
    for name in names:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 1 and result.failed == 0, name
