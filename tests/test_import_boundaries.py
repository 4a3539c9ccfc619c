"""No package reaches into another package's private names.

A name is private when it, or a module on its import path, starts with ``_``
(``sing_jax._src.*`` is private to ``sing_jax``). A module may use private names
of packages inside its own top-level package: ``sing_jax.train`` may use
``sing_jax._src``, but ``experiments`` uses only the public API. Tests may import
the library's internal modules to test them one by one (as optax's own tests
import ``optax._src``), but never a ``_``-prefixed name.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("sing_jax", "experiments", "tests")


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _owner_of_private(module: str) -> str | None:
    """The package whose private part ``module`` reaches, or None if it is public."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[:i])
    return None


def _may_use(importer: str, owner: str) -> bool:
    """A private part of ``owner`` is usable inside ``owner``'s top-level package."""
    top = owner.split(".")[0]
    return importer == top or importer.startswith(top + ".")


def violations_in(path: pathlib.Path, source: str | None = None) -> list[str]:
    """The private reach-ins of the module at ``path`` (its text: ``source``, else the
    file's)."""
    importer = _module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    found = []
    module_aliases: dict[str, str] = {}  # local name -> module it is bound to

    in_tests = importer.split(".")[0] == "tests"

    def check(module: str, what: str, line: int) -> None:
        if module.split(".")[0] not in SOURCE_DIRS:  # other projects' privates: their call
            return
        if in_tests:  # only the last name: internal modules are fair game for their tests
            if _is_private(module.rpartition(".")[2]) and not module.startswith("tests."):
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
            return
        owner = _owner_of_private(module)
        if owner is not None and not _may_use(importer, owner):
            found.append(f"{path.relative_to(ROOT)}:{line}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, f"import {alias.name}", node.lineno)
                module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                check(full, f"from {base} import {alias.name}", node.lineno)
                module_aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            target = module_aliases[node.value.id]
            check(f"{target}.{node.attr}", f"{node.value.id}.{node.attr}", node.lineno)
    return found


@pytest.mark.parametrize("folder,expected", [("experiments", 3), ("tests", 2)])
def test_the_checker_flags_private_reach_ins(folder, expected):
    # checked as text: a planted file would also be seen by the tree walk below,
    # which may run at the same time in another pytest-xdist worker
    sample = ("from sing_jax._src.channels import ChannelDims\n"
              "from sing_jax.data import _private_source\n"
              "import sing_jax.train.step as step\n"
              "step._private_helper\n"
              "from sing_jax import sing\n")
    found = violations_in(ROOT / folder / "_boundary_sample.py", sample)
    assert len(found) == expected, found


@pytest.mark.parametrize("directory", SOURCE_DIRS)
def test_no_module_imports_another_packages_private_names(directory):
    found = [v for path in sorted((ROOT / directory).rglob("*.py"))
             for v in violations_in(path)]
    assert not found, "private names used across package boundaries:\n" + "\n".join(found)
