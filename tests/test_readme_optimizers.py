"""The README's optimizer usage runs as written."""

import pathlib
import re

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
    import doctest

    from sing_jax._src import aliases

    result = doctest.testmod(aliases, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
