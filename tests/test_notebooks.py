"""The Colab notebooks: each runs top to bottom in a Jupyter kernel, and what they share.

``test_notebook_runs_tiny_on_cpu`` executes every ``colab/*.ipynb`` with nbclient in a
real IPython kernel, ``TINY`` set by ``$SING_JAX_NOTEBOOK_TINY`` as CI sets it, on two
CPU devices and without network; a cell that raises fails the test, and the outputs
must show the install cell's "already installed from this checkout" path, the runtime
it ran on, a plot and the closing cell's numbers. The install and workdir logic of
``experiments/colab.py`` (what the same cells do on a fresh Colab runtime) is tested
directly with stand-ins for pip and the probes, and the committed notebooks must hold
no outputs.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from experiments import colab
from tests import _data_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart", "spherical_benchmark", "singd_structures", "learnable_scaler_vit")
# The cells every notebook shares, by tag (the parameter cell shares its first lines).
SHARED_CELLS = ("get-code", "install")
# What each notebook's closing cell must print a line for (with its numbers).
RUN_NAMES = {
    "quickstart": ("sing", "adamsrt", "adamw"),
    "spherical_benchmark": ("sgd", "sgdmrt", "adamsrt"),
    "singd_structures": ("singd/dense", "singd/diagonal", "singd/hierarchical", "sgd",
                         "adamw"),
    "learnable_scaler_vit": ("layer", "learnable_scaler"),
}


def _cells(name: str) -> list[dict]:
    return json.loads((COLAB / f"{name}.ipynb").read_text())["cells"]


def _tagged(cells: list[dict], tag: str) -> dict:
    found = [c for c in cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _text(cell) -> str:
    """The text a cell printed (streams and text/plain results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


# ----------------------------------------------------------------------------- committed files


def test_the_notebooks_are_the_four_tested_here():
    assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("path", sorted(COLAB.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_holds_no_outputs(path):
    notebook = json.loads(path.read_text())
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name} cell {i} holds outputs: clear them before committing "
                "(Edit > Clear all outputs, or `jupyter nbconvert --clear-output --inplace`)")


def test_notebooks_share_their_setup_cells():
    first = {name: _cells(name) for name in NOTEBOOKS}
    reference = first[NOTEBOOKS[0]]
    repo_url = [line for line in _source(_tagged(reference, "parameters")).splitlines()
                if line.startswith("REPO_URL = ")]
    assert len(repo_url) == 1
    for name, cells in first.items():
        assert cells[0]["cell_type"] == "markdown" and _source(cells[0]).startswith("# ")
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code[0] is _tagged(cells, "parameters"), f"{name}: parameters come first"
        assert repo_url[0] in _source(code[0]).splitlines(), f"{name}: another REPO_URL"
        for tag in SHARED_CELLS:
            assert _source(_tagged(cells, tag)) == _source(_tagged(reference, tag)), (
                f"{name}: the {tag!r} cell differs from {NOTEBOOKS[0]}'s")
        assert f'colab.setup("{name}"' in _source(_tagged(cells, "runtime"))
        assert "pmap" in " ".join(_source(c) for c in cells if c["cell_type"] == "markdown")


# ----------------------------------------------------------------------------- execution


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_tiny_on_cpu(name, tmp_path, tmp_path_factory, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: TINY as CI sets it, two CPU devices (the
    # data-parallel path), runs under tmp_path, the session's embedded datasets, and
    # proxies that refuse every connection (no network). The TINY runs are
    # compile-bound; XLA's cheaper CPU compilation halves their time.
    monkeypatch.setenv("SING_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # not the user's profile
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SING_JAX_DATA_DIR", str(_data_helpers.session_data_dir(tmp_path_factory)))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("COLAB_GPU", raising=False)

    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(COLAB)}})
    client.execute()  # a cell that raises raises CellExecutionError here

    cells = {c.get("id"): c for c in notebook.cells}
    assert _text(cells["get-code"]).strip() == f"code: {ROOT}"
    assert "already installed from" in _text(cells["install"])
    runtime = _text(cells["runtime"])
    assert "JAX cpu backend, 2 device(s)" in runtime and "TINY=True" in runtime
    assert str(tmp_path) in runtime
    plots = [o for c in notebook.cells for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert plots, "no cell showed a plot"
    numbers = _text(cells["numbers"])
    for run in RUN_NAMES[name]:
        lines = [line for line in numbers.splitlines() if line.split(":")[0].split()[:1] == [run]]
        assert lines, f"the closing cell printed no line for {run!r}:\n{numbers}"
        percents = [float(p) for p in re.findall(r"(\d+\.\d+)%", lines[0])]
        assert percents and all(0.0 < p <= 100.0 for p in percents), lines[0]
    if name == "singd_structures":
        state_mib = {line.split()[0]: float(line.split()[1]) for line in numbers.splitlines()[1:]}
        # A dense factor keeps d^2 numbers, a diagonal one d; SGD one buffer, AdamW two.
        assert state_mib["singd/dense"] > state_mib["singd/diagonal"]
        assert state_mib["adamw"] == pytest.approx(2 * state_mib["sgd"], rel=0.05)
    if name == "spherical_benchmark":
        table = _text(next(c for c in notebook.cells
                           if c.cell_type == "code" and "format_table(" in c.source))
        assert "| SGD-MRT (ours) |" in table and "92.25 (0.12)" in table


# ----------------------------------------------------------------------------- get the code


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)


def test_get_code_cell_clones_repo_url_once_outside_a_checkout(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    source = _source(_tagged(_cells("quickstart"), "get-code"))
    origin = tmp_path / "origin"
    (origin / "experiments").mkdir(parents=True)
    shutil.copy(ROOT / "experiments" / "colab.py", origin / "experiments" / "colab.py")
    _git("init", "-q", cwd=origin)
    _git("add", ".", cwd=origin)
    _git("commit", "-q", "-m", "x", cwd=origin)
    runtime_dir = tmp_path / "content"  # Colab's working directory: no checkout above it
    runtime_dir.mkdir()
    monkeypatch.chdir(runtime_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))

    namespace = {"REPO_URL": str(origin)}
    exec(compile(source, "get-code", "exec"), namespace)
    clone = runtime_dir / "sing_jax"
    assert namespace["CHECKOUT"] == str(clone) and sys.path[0] == str(clone)
    assert (clone / "experiments" / "colab.py").read_bytes() == (
        ROOT / "experiments" / "colab.py").read_bytes()

    shutil.rmtree(origin)  # a second run uses the clone: no fetch
    exec(compile(source, "get-code", "exec"), {"REPO_URL": str(origin)})
    assert sys.path.count(str(clone)) == 1

    shutil.rmtree(clone)
    with pytest.raises(ValueError, match="Set REPO_URL"):
        exec(compile(source, "get-code", "exec"), {"REPO_URL": "https://github.com/OWNER/x"})


def test_get_code_cell_finds_the_checkout_it_runs_from(monkeypatch):
    source = _source(_tagged(_cells("quickstart"), "get-code"))
    monkeypatch.chdir(COLAB)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {"REPO_URL": "https://github.com/OWNER/x"}  # never used: no clone
    exec(compile(source, "get-code", "exec"), namespace)
    assert namespace["CHECKOUT"] == str(ROOT)


# ----------------------------------------------------------------------------- install


def test_the_package_installs_experiments_and_the_test_extras():
    import setuptools

    pyproject = colab.load_pyproject(str(ROOT))
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(str(ROOT), include=include)
    assert {"sing_jax", "sing_jax.train", "experiments", "experiments.configs"} <= set(packages)
    assert "tests" not in packages
    dev = " ".join(colab.requirements(str(ROOT), ("dev",)))
    for name in ("nbclient", "ipykernel", "nbformat", "grain", "orbax-checkpoint"):
        assert name in dev


def test_requirements_are_the_install_extras_of_pyproject():
    specs = colab.requirements(str(ROOT))
    assert specs[0].startswith("jax>=")
    assert any(s.startswith("grain") for s in specs)            # data
    assert any(s.startswith("orbax-checkpoint") for s in specs)  # train
    assert not any(s.startswith(("pytest", "nbclient", "torch")) for s in specs)
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        colab.requirements(str(ROOT), ("gpu",))


def test_unmet_requirements_name_the_installed_version():
    versions = {"jax": "0.4.30", "optax": "0.2.9"}

    def version_of(name):
        if name not in versions:
            raise colab.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    unmet = colab.unmet_requirements(["jax>=0.10.2", "optax>=0.2.8", "grain>=0.2"], version_of)
    assert unmet == ["jax>=0.10.2 (installed: 0.4.30)", "grain>=0.2 (not installed)"]


@pytest.mark.parametrize("backend, distributions, expected", [
    ("gpu", {"jax", "jax-cuda12-plugin", "jax-cuda12-pjrt"}, "jax[cuda12]>=0.10.2"),
    ("gpu", {"jax", "jax_cuda13_plugin"}, "jax[cuda13]>=0.10.2"),
    ("gpu", {"jax", "jaxlib"}, "jax[cuda12]>=0.10.2"),
    ("tpu", {"jax", "libtpu"}, "jax[tpu]>=0.10.2"),
    ("cpu", {"jax", "jax-cuda12-plugin"}, None),
    ("none", set(), None),
])
def test_pip_command_on_a_fresh_runtime_keeps_its_accelerator(backend, distributions, expected):
    plan = colab.plan_install("/content/sing_jax", sing_jax_origin=None,
                              unmet=["jax>=0.10.2 (installed: 0.4.30)"], backend=backend,
                              distributions=distributions, jax_specifier=">=0.10.2",
                              python="python3")
    assert plan.command == ["python3", "-m", "pip", "install", "-q", "-e",
                            "/content/sing_jax[data,train]"] + ([expected] if expected else [])
    assert plan.accelerator_requirement == expected and plan.reason == "sing_jax is not importable"


def test_plan_install_skips_only_a_complete_install_from_this_checkout(tmp_path):
    checkout = str(tmp_path / "sing_jax")
    here = os.path.join(checkout, "sing_jax", "__init__.py")
    kwargs = dict(backend="gpu", distributions=(), python="python3")
    assert colab.plan_install(checkout, sing_jax_origin=here, unmet=[], **kwargs).command is None
    missing = colab.plan_install(checkout, sing_jax_origin=here, unmet=["grain (not installed)"],
                                 **kwargs)
    assert missing.command is not None and "grain (not installed)" in missing.reason
    elsewhere = colab.plan_install(checkout, sing_jax_origin="/usr/lib/sing_jax/__init__.py",
                                   unmet=[], **kwargs)
    assert elsewhere.command is not None and "not from" in elsewhere.reason
    # A sibling directory whose name starts like the checkout's is not the checkout.
    sibling = colab.plan_install(checkout, sing_jax_origin=checkout + "_old/sing_jax/x.py",
                                 unmet=[], **kwargs)
    assert sibling.command is not None


def test_install_on_this_checkout_runs_nothing(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(*args, **kwargs):
        raise AssertionError(f"nothing should run, got {args}")

    assert "already installed from" in colab.install(str(ROOT), run=run)


class _FakeRuntime:
    """Stands in for subprocess.run: answers the backend probe, records pip's command."""

    def __init__(self, backends, pip_returncode=0):
        self.backends, self.pip_returncode, self.commands = list(backends), pip_returncode, []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if command[1:3] == ["-m", "pip"]:
            return subprocess.CompletedProcess(command, self.pip_returncode, "", "pip failed")
        return subprocess.CompletedProcess(command, 0, self.backends.pop(0) + "\n", "")


def _fresh_checkout(tmp_path):
    checkout = tmp_path / "content" / "sing_jax"
    checkout.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    return checkout


def test_install_on_a_fresh_gpu_runtime_keeps_or_reports_the_accelerator(tmp_path, monkeypatch):
    checkout = _fresh_checkout(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # a fresh kernel has no JAX yet
    jax_spec = colab.jax_specifier(colab.requirements(str(ROOT)))

    kept = _FakeRuntime(["gpu", "gpu"])
    message = colab.install(str(checkout), run=kept, python="python3")
    assert "installed" in message and "gpu" in message
    probe, pip, probe_after = kept.commands
    assert probe == probe_after == ["python3", "-c", colab.PROBE_BACKEND]
    assert pip[:7] == ["python3", "-m", "pip", "install", "-q", "-e", f"{checkout}[data,train]"]
    assert pip[7].startswith("jax[cuda") and pip[7].endswith(jax_spec)
    assert str(checkout) in sys.path  # `experiments` imports from the checkout

    with pytest.raises(colab.AcceleratorLostError, match="GPU build of JAX.*'cpu' now"):
        colab.install(str(checkout), run=_FakeRuntime(["gpu", "cpu"]), python="python3")
    with pytest.raises(RuntimeError, match="pip failed"):
        colab.install(str(checkout), run=_FakeRuntime(["cpu"], pip_returncode=1))


def test_only_our_packages_replaced_while_imported_need_a_restart():
    specs = colab.requirements(str(ROOT))
    must, others = colab.split_changed_imports(
        {"numpy": ("1.26.4", "2.1.0"), "tornado": ("6.3", "6.4"), "grain": ("0.2.1", None),
         "ml_dtypes": ("0.4", "0.5")}, specs)
    assert must == ["grain 0.2.1 -> removed", "ml_dtypes 0.4 -> 0.5", "numpy 1.26.4 -> 2.1.0"]
    assert others == ["tornado 6.3 -> 6.4"]


def test_backend_checks():
    colab.check_backend_kept("tpu", "tpu", "jax[tpu]")
    colab.check_backend_kept("cpu", "cpu", None)
    with pytest.raises(colab.AcceleratorLostError, match=r'pip install -q -U "jax\[tpu\]'):
        colab.check_backend_kept("tpu", "cpu", "jax[tpu]")
    assert colab.attached_accelerator({}, lambda p: p == "/dev/accel0") == "tpu"
    assert colab.attached_accelerator({"COLAB_GPU": "1"}, lambda p: False) == "gpu"
    assert colab.attached_accelerator({}, lambda p: False) is None
    colab.check_accelerator("gpu", "gpu")
    colab.check_accelerator("cpu", None)
    with pytest.raises(colab.AcceleratorLostError, match="has a GPU but"):
        colab.check_accelerator("cpu", "gpu")


def test_resolve_tiny():
    assert colab.resolve_tiny(None, "cpu", {}) is True
    assert colab.resolve_tiny(None, "tpu", {}) is False
    assert colab.resolve_tiny(None, "tpu", {colab.TINY_ENV: "1"}) is True
    assert colab.resolve_tiny(None, "cpu", {colab.TINY_ENV: "0"}) is False
    assert colab.resolve_tiny(False, "cpu", {colab.TINY_ENV: "1"}) is False
    with pytest.raises(ValueError, match="expected 1 or 0"):
        colab.resolve_tiny(None, "cpu", {colab.TINY_ENV: "maybe"})


# ----------------------------------------------------------------------------- data and runs


def test_prepare_dataset_builds_once_and_keeps_a_copy(tmp_path):
    import sing_jax.data as sd

    source, data, mirror = tmp_path / "src", tmp_path / "data", tmp_path / "drive"
    _data_helpers.write_fake_cifar10(source)
    message = colab.prepare_dataset("cifar10", str(data), source_dir=str(source),
                                    mirror_dir=str(mirror))
    assert message == f"cifar10 prepared in {data} and kept in {mirror}"
    assert sd.get_info("cifar10", data_dir=data).num_examples["test"] == 7

    def run(*args, **kwargs):
        raise AssertionError("a prepared dataset is not built again")

    assert "ready" in colab.prepare_dataset("cifar10", str(data), run=run)
    fresh = tmp_path / "next_session"  # a new session: the copy on Drive comes back
    assert "copied from" in colab.prepare_dataset("cifar10", str(fresh), mirror_dir=str(mirror),
                                                  run=run)
    assert sd.get_info("cifar10", data_dir=fresh).num_examples["test"] == 7
    assert "embedded" in colab.prepare_dataset("digits", str(data), run=run)


def test_prepare_dataset_failure_says_what_to_do(tmp_path):
    def offline(command, **kwargs):
        env = kwargs["env"]  # the build sees no GPU, and JAX stays off the accelerator
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu"
        return subprocess.CompletedProcess(command, 1, "", "urlopen error [Errno -3] "
                                           "Temporary failure in name resolution")

    with pytest.raises(RuntimeError, match="no internet.*set SOURCE_DIR"):
        colab.prepare_dataset("svhn", str(tmp_path), run=offline)
    with pytest.raises(RuntimeError, match="SOURCE_DIR='/nowhere' must hold"):
        colab.prepare_dataset("cifar10", str(tmp_path), source_dir="/nowhere", run=offline)


def test_a_changed_config_is_explained_and_a_run_resumes(tmp_path):
    from experiments.configs import quickstart
    from sing_jax.train import prepare_workdir

    workdir = str(tmp_path / "run")
    config = quickstart.get_config("digits,sing,tiny")
    prepare_workdir(workdir, config)  # what a first start writes
    assert colab.workdir_status(config, workdir)[0] == "new"
    os.makedirs(os.path.join(workdir, "checkpoints", "42"))
    longer = quickstart.get_config("digits,sing,tiny")
    longer.num_epochs = 5
    kind, message = colab.workdir_status(longer, workdir)
    assert kind == "resume" and "step 42" in message and "allowed when resuming" in message

    changed = quickstart.get_config("digits,sing,tiny")
    changed.optimizer.learning_rate = 0.5
    kind, message = colab.workdir_status(changed, workdir)
    assert kind == "changed"
    assert "optimizer.learning_rate: 0.03 in the workdir, 0.5 now" in message
    assert "OVERWRITE = True" in message and "WORKDIR" in message
    with pytest.raises(colab.ConfigChangedError, match="optimizer.learning_rate"):
        colab.train_or_resume(changed, workdir)  # refused before anything is built
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "42"))
