"""The README's optimizer usage runs as written."""

import pathlib
import re

from tests._train_helpers import ConvBNNet

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_plain_optax_chain_example_runs():
    namespace: dict = {}
    exec(python_block_after("### As a plain optax chain"), namespace)
    params = namespace["params"]
    # The AdamSRT step moved the spherical kernel, and SING was built too.
    assert float(abs(params["conv"]["kernel"] - 1.0).max()) > 0
    assert namespace["tx"] is not None


def test_docstring_examples_run():
    """Every module of the package with a ``>>>`` example in its docstrings."""
    import doctest
    import importlib

    package = README.parent / "sing_jax"
    names = sorted(".".join(path.relative_to(README.parent).with_suffix("").parts)
                   for path in package.rglob("*.py") if ">>>" in path.read_text())
    assert "sing_jax._src.aliases" in names
    for name in names:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 1 and result.failed == 0, name


def test_nnx_example_runs_and_keeps_the_head_euclidean():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import sing_jax

    def loss_fn(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    namespace = {"MyModel": ConvBNNet, "loss_fn": loss_fn, "sing_jax": sing_jax, "nnx": nnx}
    exec(python_block_after("### With Flax NNX"), namespace)
    assert namespace["spec"]["conv"]["kernel"] == sing_jax.ChannelDims((-1,))
    assert namespace["spec"]["head"]["kernel"] is None
    model, optimizer = namespace["model"], namespace["optimizer"]
    before = model.conv.kernel[...]
    x, y = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)), jnp.array([0, 1, 0, 1])
    loss = namespace["train_step"](model, optimizer, x, y)
    assert jnp.isfinite(loss) and not jnp.allclose(model.conv.kernel[...], before)
