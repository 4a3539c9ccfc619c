"""What the Colab notebooks (``colab/*.ipynb``) share: install, runtime, workdir, data, runs.

Each notebook runs, in order: a parameter cell, a cell that finds the checkout it
runs from or clones ``REPO_URL`` (on Colab), then ``colab.install(CHECKOUT)`` and
``colab.setup(...)`` from this module, then its own work. The module is imported
*before* the package's dependencies are installed, so everything it does at import
time uses the standard library only; jax, sing_jax and ml_collections are imported
inside the functions that need them.

The install keeps the runtime's accelerator: Colab's JAX is built for its GPU
(``jax-cuda12-plugin``) or TPU (``libtpu``), and a plain ``pip install`` of a package
that needs a newer ``jax`` would bring the CPU-only ``jaxlib`` in its place. The pip
command therefore names ``jax[cuda12]`` / ``jax[tpu]`` (whatever the runtime had)
next to the package, and the backend is checked in a fresh process after the
install: a runtime that had a TPU or GPU and lost it stops with a message saying
how to repair it, instead of training silently on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

EXTRAS = ("data", "train")
TINY_ENV = "SING_JAX_NOTEBOOK_TINY"
DATA_DIR_ENV = "SING_JAX_DATA_DIR"
DRIVE_MOUNT = "/content/drive"
RUNS_DIR = "sing_jax_runs"  # under the temp dir or Drive; not the clone's name
DRIVE_ROOT = os.path.join(DRIVE_MOUNT, "MyDrive", RUNS_DIR)
ACCELERATORS = ("gpu", "tpu")
# Distributions that make JAX see an accelerator -> the jax extra that installs them.
ACCELERATOR_PLUGINS = (("jax-cuda13-plugin", "cuda13"), ("jax-cuda12-plugin", "cuda12"),
                       ("libtpu", "tpu"), ("libtpu-nightly", "tpu"))
DEFAULT_JAX_EXTRA = {"gpu": "cuda12", "tpu": "tpu"}
EMBEDDED_DATASETS = ("digits", "mnist1d")
# What a missing download looks like in TFDS's and urllib's error messages.
_OFFLINE_HINTS = ("Name or service not known", "Temporary failure in name resolution",
                  "Failed to establish a new connection", "Network is unreachable",
                  "ConnectionError", "URLError", "Max retries exceeded")

Runner = Callable[..., subprocess.CompletedProcess]


# ----------------------------------------------------------------------------- install


def load_pyproject(checkout: str) -> dict[str, Any]:
    """The parsed ``pyproject.toml`` of ``checkout``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib
    with open(os.path.join(checkout, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ModuleNotFoundError:  # a bare interpreter: pip vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(checkout: str, extras: Sequence[str] = EXTRAS) -> list[str]:
    """The requirement strings ``pip install -e "<checkout>[extras]"`` must satisfy.

    Read from ``pyproject.toml``: the dependencies, then each extra's, with an
    extra that names the package itself (``sing_jax[data,train]``) expanded.
    """
    project = load_pyproject(checkout)["project"]
    name = _canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    Requirement = _requirement_class()
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    pending = list(extras)
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"pyproject.toml of {checkout} has no extra {extra!r}; "
                             f"its extras: {sorted(optional)}")
        seen.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if _canonical(req.name) == name:
                pending.extend(sorted(req.extras))
            elif spec not in out:
                out.append(spec)
    return out


def unmet_requirements(specs: Iterable[str],
                       version_of: Callable[[str], str] = importlib.metadata.version
                       ) -> list[str]:
    """``'<requirement> (installed: <version> | not installed)'`` for each one not met."""
    Requirement = _requirement_class()
    unmet = []
    for spec in specs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{spec} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{spec} (installed: {version})")
    return unmet


def installed_distributions() -> set[str]:
    """Canonical names of every installed distribution."""
    return {_canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def accelerator_jax_requirement(backend: str, distributions: Iterable[str],
                                jax_specifier: str = "") -> str | None:
    """The ``jax[...]`` requirement that keeps a GPU/TPU runtime's accelerator, or None.

    Args:
      backend: ``jax.default_backend()`` before the install (``'none'``: no JAX).
      distributions: installed distribution names (the plugin says which build).
      jax_specifier: the version bound our ``jax`` requirement carries, e.g. ``'>=0.10.2'``.
    """
    if backend not in ACCELERATORS:
        return None
    names = {_canonical(d) for d in distributions}
    extra = next((e for plugin, e in ACCELERATOR_PLUGINS if plugin in names),
                 DEFAULT_JAX_EXTRA[backend])
    return f"jax[{extra}]{jax_specifier}"


def pip_install_command(checkout: str, extras: Sequence[str] = EXTRAS,
                        also: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """``python -m pip install -q -e "<checkout>[extras]" [also...]``."""
    target = os.path.abspath(checkout) + (f"[{','.join(extras)}]" if extras else "")
    return [python, "-m", "pip", "install", "-q", "-e", target, *also]


PROBE_BACKEND = "import jax; print(jax.default_backend())"


def probe_backend(python: str = sys.executable, run: Runner = subprocess.run) -> str:
    """``jax.default_backend()`` in a fresh process (``'none'`` when JAX does not import).

    A fresh process sees what is installed now, not what this one imported earlier.
    """
    try:
        out = run([python, "-c", PROBE_BACKEND], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    lines = (out.stdout or "").strip().splitlines()
    return lines[-1].strip() if out.returncode == 0 and lines else "none"


class AcceleratorLostError(RuntimeError):
    """The install (or the runtime) left JAX on the CPU of a GPU/TPU runtime."""


class RestartNeededError(RuntimeError):
    """pip changed packages this Python process had already imported."""


def check_backend_kept(before: str, after: str, repair: str | None) -> None:
    """Raises :class:`AcceleratorLostError` when ``before`` was a GPU/TPU and ``after`` is not."""
    if before in ACCELERATORS and after != before:
        fix = f'!pip install -q -U "{repair}"' if repair else "reinstall the runtime's JAX"
        raise AcceleratorLostError(
            f"The install replaced this runtime's {before.upper()} build of JAX: "
            f"jax.default_backend() was {before!r} before `pip install` and is {after!r} "
            "now. Stopping here rather than training on the CPU. To repair it: run "
            f"`{fix}` in a new cell, then Runtime > Restart session and run the notebook "
            "again from the top (the install cell will find everything in place).")


def _module_versions(modules: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}`` of the distributions providing imported top-level modules."""
    provided = importlib.metadata.packages_distributions()
    versions = {}
    for module in modules:
        for dist in provided.get(module, ()):
            try:
                versions[_canonical(dist)] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
    return versions


def _imported_top_level() -> set[str]:
    return {name.split(".")[0] for name in list(sys.modules)}


@dataclasses.dataclass(frozen=True)
class InstallPlan:
    """What :func:`install` would do: ``command`` is None when nothing needs installing."""

    command: list[str] | None
    reason: str
    accelerator_requirement: str | None = None


def plan_install(checkout: str, *, sing_jax_origin: str | None, unmet: Sequence[str],
                 backend: str, distributions: Iterable[str], extras: Sequence[str] = EXTRAS,
                 jax_specifier: str = "", python: str = sys.executable) -> InstallPlan:
    """Decides between "already installed from this checkout" and a pip command.

    Args:
      checkout: the repository root the notebook installs from.
      sing_jax_origin: where ``import sing_jax`` resolves now (None: not importable).
      unmet: :func:`unmet_requirements` of the package's requirements.
      backend: ``jax.default_backend()`` before installing (``'none'``: no JAX).
      distributions: installed distribution names.
    """
    root = os.path.realpath(checkout)
    here = sing_jax_origin is not None and os.path.realpath(sing_jax_origin).startswith(
        root + os.sep)
    if here and not unmet:
        return InstallPlan(None, f"sing_jax is already installed from {checkout}: every "
                                 f"requirement of [{','.join(extras)}] is met")
    accelerator = accelerator_jax_requirement(backend, distributions, jax_specifier)
    command = pip_install_command(checkout, extras, (accelerator,) if accelerator else (),
                                  python)
    if not here:
        reason = ("sing_jax is not importable" if sing_jax_origin is None
                  else f"sing_jax is imported from {sing_jax_origin}, not from {checkout}")
    else:
        reason = f"{len(unmet)} requirement(s) not met: " + "; ".join(unmet[:6])
    return InstallPlan(command, reason, accelerator)


def jax_specifier(specs: Sequence[str]) -> str:
    """The version bound of the ``jax`` requirement among ``specs`` (e.g. ``'>=0.10.2'``)."""
    Requirement = _requirement_class()
    for spec in specs:
        req = Requirement(spec)
        if _canonical(req.name) == "jax":
            return str(req.specifier)
    return ""


def install(checkout: str, *, extras: Sequence[str] = EXTRAS, run: Runner = subprocess.run,
            python: str = sys.executable) -> str:
    """Installs ``checkout`` with ``pip install -e "<checkout>[extras]"`` unless it already is.

    Makes ``experiments`` importable (the checkout goes first on ``sys.path``), keeps
    the runtime's accelerator (see the module docstring) and returns what it did.

    Raises:
      AcceleratorLostError: JAX ran on a GPU/TPU before the install and not after.
      RestartNeededError: pip replaced packages this process had already imported
        (jax, numpy, ...): restart the session and run the notebook again.
    """
    checkout = os.path.abspath(checkout)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    importlib.invalidate_caches()
    specs = requirements(checkout, extras)
    spec = importlib.util.find_spec("sing_jax")
    origin = spec.origin if spec is not None else None
    unmet = unmet_requirements(specs)
    # Installed from this checkout with every requirement met: plan_install says so
    # (no command) before the backend and the distributions play any part.
    installed = plan_install(checkout, sing_jax_origin=origin, unmet=unmet, backend="none",
                             distributions=(), extras=extras)
    if installed.command is None:
        return installed.reason
    jax_loaded = "jax" in sys.modules
    # A process that holds the TPU keeps a second one from opening it: ask this one.
    before = sys.modules["jax"].default_backend() if jax_loaded else probe_backend(python, run)
    plan = plan_install(checkout, sing_jax_origin=origin, unmet=unmet, backend=before,
                        distributions=installed_distributions(), extras=extras,
                        jax_specifier=jax_specifier(specs), python=python)
    imported = _imported_top_level()
    versions_before = _module_versions(imported)
    print(f"Installing ({plan.reason}):\n  {' '.join(plan.command)}", flush=True)
    done = run(plan.command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(plan.command)}` failed (exit {done.returncode}):\n"
                           + (done.stderr or done.stdout or "")[-3000:])
    importlib.invalidate_caches()
    versions_after = {d: _installed_version(d) for d in versions_before}
    changed = {d: (v, versions_after[d]) for d, v in versions_before.items()
               if versions_after[d] != v}
    if not jax_loaded:
        after = probe_backend(python, run)
        check_backend_kept(before, after, plan.accelerator_requirement)
    must, others = split_changed_imports(changed, specs)
    if must:
        raise RestartNeededError(
            "pip replaced packages this session had already imported (" + "; ".join(must)
            + "). Runtime > Restart session, then run the notebook again from the top: "
            "the install is done and this cell will skip it.")
    note = ("; already imported and now replaced, kept in memory: " + "; ".join(others)
            if others else "")
    return f"installed {checkout} [{','.join(extras)}] (JAX backend: {before}){note}"


# Compiled packages whose in-memory version must match what JAX and TFDS load next.
CORE_DISTRIBUTIONS = ("numpy", "jax", "jaxlib", "ml-dtypes", "scipy", "protobuf")


def split_changed_imports(changed: Mapping[str, tuple[str, str | None]],
                          specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits distributions pip replaced while imported into (restart needed, harmless).

    A restart is needed when one of ours (a requirement of the package) or a compiled
    core of the stack changed: the session would mix the old module in memory with
    new code that imports it. Other imported packages (the notebook server's own)
    keep working with the version they loaded.
    """
    Requirement = _requirement_class()
    ours = {_canonical(Requirement(s).name) for s in specs} | set(CORE_DISTRIBUTIONS)
    lines = {d: f"{d} {old} -> {new or 'removed'}" for d, (old, new) in sorted(changed.items())}
    return ([line for d, line in lines.items() if _canonical(d) in ours],
            [line for d, line in lines.items() if _canonical(d) not in ours])


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- runtime


def resolve_tiny(tiny: bool | None, backend: str,
                 environ: Mapping[str, str] = os.environ) -> bool:
    """``TINY``: an explicit True/False wins, then ``$SING_JAX_NOTEBOOK_TINY``, then CPU -> True."""
    if tiny is not None:
        return bool(tiny)
    value = environ.get(TINY_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    if value:
        raise ValueError(f"${TINY_ENV}={environ[TINY_ENV]!r}; expected 1 or 0")
    return backend == "cpu"


def attached_accelerator(environ: Mapping[str, str] = os.environ,
                         exists: Callable[[str], bool] = os.path.exists) -> str | None:
    """``'gpu'``/``'tpu'`` when the machine has one attached (whatever JAX sees), else None."""
    if exists("/dev/nvidia0") or environ.get("COLAB_GPU", "") not in ("", "0"):
        return "gpu"
    if exists("/dev/accel0") or exists("/dev/vfio/0") or environ.get("COLAB_TPU_ADDR") \
            or environ.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    return None


def check_accelerator(backend: str, attached: str | None) -> None:
    """Raises :class:`AcceleratorLostError` when a GPU/TPU is attached but JAX runs on CPU."""
    if attached is not None and backend == "cpu":
        extra = DEFAULT_JAX_EXTRA[attached]
        raise AcceleratorLostError(
            f"This runtime has a {attached.upper()} but jax.default_backend() is 'cpu': the "
            f"installed JAX has no {attached.upper()} support. Run `!pip install -q -U "
            f"\"jax[{extra}]\"` in a new cell, then Runtime > Restart session and run the "
            "notebook again (set TINY = True to run on the CPU on purpose).")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What :func:`setup` found: where the notebook runs and where it writes."""

    backend: str
    devices: tuple[str, ...]
    tiny: bool
    parallel: str
    workdir: str
    data_dir: str
    data_mirror: str | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def per_device(self, global_batch: int) -> int:
        from sing_jax.train import check_global_batch

        return check_global_batch(global_batch, self.num_devices, "batch_size")

    def describe(self) -> str:
        return (f"JAX {self.backend} backend, {self.num_devices} device(s) "
                f"[{', '.join(self.devices)}], train step via {self.parallel}; "
                f"TINY={self.tiny}; runs in {self.workdir}; datasets in {self.data_dir}"
                + (f" (kept in {self.data_mirror})" if self.data_mirror else ""))


def mount_drive(mount_point: str = DRIVE_MOUNT) -> str:
    """Mounts Google Drive (asks for access once per session); Colab only."""
    try:
        from google.colab import drive
    except ImportError as e:
        raise RuntimeError("USE_DRIVE = True needs a Colab runtime (google.colab is not "
                           "importable here); set WORKDIR to a directory that outlives the "
                           "session instead") from e
    drive.mount(mount_point)
    return mount_point


def setup(notebook: str, *, tiny: bool | None = None, parallel: str = "shard_map",
          use_drive: bool = False, workdir: str | None = None,
          environ: Mapping[str, str] | None = None) -> Runtime:
    """Imports JAX, resolves ``TINY``, picks the workdir and data dir, and prints them.

    Args:
      notebook: the notebook's name (its runs go to ``<root>/<notebook>``).
      tiny: the parameter cell's ``TINY`` (None: see :func:`resolve_tiny`).
      parallel: ``'shard_map'`` or ``'pmap'``.
      use_drive: mount Google Drive and keep runs and prepared datasets there
        (``/content/drive/MyDrive/sing_jax_runs``), so that they outlive the session; the
        datasets are read from a local copy.
      workdir: where this notebook's runs go (default ``<root>/<notebook>``, with root
        Drive or ``<tempdir>/sing_jax_runs``).
    """
    import jax

    from sing_jax.train.step import PARALLEL_MODES

    if parallel not in PARALLEL_MODES:
        raise ValueError(f"PARALLEL={parallel!r}; expected one of {PARALLEL_MODES}")
    environ = os.environ if environ is None else environ
    backend = jax.default_backend()
    if tiny is not True:  # an accelerator JAX cannot see is an error, not a reason for TINY
        check_accelerator(backend, attached_accelerator(environ))
    resolved = resolve_tiny(tiny, backend, environ)
    local_root = os.path.join(tempfile.gettempdir(), RUNS_DIR)
    root, mirror = local_root, None
    if use_drive:
        mount_drive()
        root, mirror = DRIVE_ROOT, os.path.join(DRIVE_ROOT, "tensorflow_datasets")
    workdir = workdir or os.path.join(root, notebook)
    data_dir = environ.get(DATA_DIR_ENV) or os.path.join(local_root, "tensorflow_datasets")
    for path in (workdir, data_dir) + ((mirror,) if mirror else ()):
        os.makedirs(path, exist_ok=True)
    # The pipelines read $SING_JAX_DATA_DIR, so a run's config does not name the place.
    os.environ[DATA_DIR_ENV] = data_dir
    devices = tuple(f"{d.platform}:{d.id}" for d in jax.devices())
    runtime = Runtime(backend, devices, resolved, parallel, workdir, data_dir, mirror)
    print(runtime.describe())
    return runtime


# ----------------------------------------------------------------------------- data

_PREPARE = """
import sys
import sing_jax.data as sd
name, data_dir, source_dir = sys.argv[1], sys.argv[2], sys.argv[3] or None
sd.prepare(name, data_dir, source_dir=source_dir)
info = sd.get_info(name, data_dir=data_dir)
print("examples:", info.num_examples)
"""


def prepare_command(name: str, data_dir: str, source_dir: str | None = None,
                    python: str = sys.executable) -> list[str]:
    """The command that builds TFDS dataset ``name`` (array_record) into ``data_dir``."""
    return [python, "-c", _PREPARE, name, data_dir, source_dir or ""]


def prepare_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The preparing process's environment: no GPU and JAX on the CPU.

    With TensorFlow installed (Colab) the TFDS builders use it, and TensorFlow takes
    the whole GPU's memory on its first op; the notebook's own JAX holds the
    accelerator meanwhile. The builder needs neither.
    """
    env = dict(environ)
    env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def is_prepared(name: str, data_dir: str | None) -> bool:
    """Whether ``data_dir`` holds a built TFDS dataset ``name`` (its ``dataset_info.json``)."""
    import glob

    return bool(data_dir) and bool(
        glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")))


def prepare_dataset(name: str, data_dir: str, *, source_dir: str | None = None,
                    mirror_dir: str | None = None, run: Runner = subprocess.run,
                    python: str = sys.executable) -> str:
    """Makes dataset ``name`` readable from ``data_dir``: built once, then kept.

    ``name`` is a config's dataset name (``cifar10``, ``cifar100``, ``svhn``, ...).
    The embedded datasets build themselves on first use. Otherwise, in order: a
    dataset already in ``data_dir`` is used; one in ``mirror_dir`` (Drive, from an
    earlier session) is copied to ``data_dir`` (the pipelines read records at random,
    which a local disk does much faster than Drive); else it is built in ``data_dir``
    (TFDS download, or ``source_dir``'s copies of the files TFDS downloads) by a
    separate process (see :func:`prepare_environment`) and copied to ``mirror_dir``.
    """
    import shutil

    from sing_jax.train.registry import resolve_dataset

    tfds_name = resolve_dataset(name)
    if tfds_name in EMBEDDED_DATASETS:
        return f"{tfds_name} is embedded: built offline on first use, nothing to download"
    local, kept = os.path.join(data_dir, tfds_name), None
    if mirror_dir:
        kept = os.path.join(mirror_dir, tfds_name)
    if is_prepared(tfds_name, data_dir):
        return f"{tfds_name} is ready in {data_dir}"
    if kept and is_prepared(tfds_name, mirror_dir):
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(kept, local)
        return f"{tfds_name} copied from {mirror_dir} to {data_dir}"
    print(f"preparing {tfds_name} in {data_dir} "
          + (f"from {source_dir}" if source_dir else "(TFDS download)") + " ...", flush=True)
    done = run(prepare_command(tfds_name, data_dir, source_dir, python), capture_output=True,
               text=True, env=prepare_environment())
    if done.returncode != 0:
        log = (done.stderr or "") + (done.stdout or "")
        hint = ""
        if source_dir is None and any(h in log for h in _OFFLINE_HINTS):
            hint = (" The download failed: this runtime seems to have no internet. Put the "
                    "files TFDS downloads (for cifar10: cifar-10-binary.tar.gz) in a folder, "
                    "e.g. on Drive, and set SOURCE_DIR to it.")
        elif source_dir is not None:
            hint = (f" SOURCE_DIR={source_dir!r} must hold the files TFDS would download "
                    "(see sing_jax.data.prepare).")
        raise RuntimeError(f"preparing {tfds_name} failed (exit {done.returncode}).{hint}\n"
                           + log[-3000:])
    if not is_prepared(tfds_name, data_dir):
        raise RuntimeError(f"preparing {tfds_name} reported success but {data_dir} holds no "
                           f"built {tfds_name}:\n" + (done.stdout or "")[-2000:])
    message = f"{tfds_name} prepared in {data_dir}"
    if kept:
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(local, kept)
        message += f" and kept in {mirror_dir}"
    return message


# ----------------------------------------------------------------------------- runs


class ConfigChangedError(ValueError):
    """The workdir holds a run of another config (the message says what differs)."""


def latest_checkpoint_step(workdir: str) -> int | None:
    """The step of the newest checkpoint in ``workdir`` (None: there is none)."""
    from sing_jax.train.checkpoint import CHECKPOINT_DIR

    path = os.path.join(workdir, CHECKPOINT_DIR)
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps) if steps else None


def workdir_status(config: Any, workdir: str) -> tuple[str, str]:
    """``(kind, message)`` of what training ``config`` in ``workdir`` would do.

    ``kind`` is ``'new'``, ``'resume'`` or ``'changed'``; for ``'changed'`` the message
    lists every key that differs from the run already there and what to do about it.
    """
    from sing_jax.train import checkpoint as ckpt

    config_path = os.path.join(workdir, ckpt.CONFIG_FILE)
    step = latest_checkpoint_step(workdir)
    if not os.path.exists(config_path):
        if step is not None:
            return "changed", (f"{workdir} holds checkpoints but no {ckpt.CONFIG_FILE}: it "
                               "is not a run of this notebook. Set OVERWRITE = True to start "
                               "over there, or pick another WORKDIR.")
        return "new", f"new run in {workdir}"
    with open(config_path) as f:
        stored = json.load(f)
    problems = ckpt.config_differences(stored, config)
    if problems:
        return "changed", (
            f"{workdir} holds a run of another config; the differences:\n  "
            + "\n  ".join(problems)
            + "\nA checkpoint only resumes the config that wrote it. Put the parameter "
              "cell back to resume that run, set OVERWRITE = True to start this config "
              "over there (its checkpoints and metrics are deleted), or set WORKDIR to "
              "another directory to keep both.")
    safe = ckpt.config_differences(stored, config, ignore=())
    note = "".join(f"\n  {line} (allowed when resuming)" for line in safe)
    if step is None:
        return "new", f"new run in {workdir} (its config is already there, no checkpoint)" + note
    return "resume", f"resuming from the checkpoint at step {step} in {workdir}" + note


def train_or_resume(config: Any, workdir: str, *, overwrite: bool = False,
                    quiet: bool = True) -> Any:
    """``train_and_evaluate(config, workdir)``, saying first whether it starts or resumes.

    Re-running the notebook's training cell (after a disconnect, with the workdir on
    Drive) continues from the last checkpoint; a finished run only reads its summary.

    Raises:
      ConfigChangedError: the workdir holds a run of another config and ``overwrite``
        is False; the message lists the differing keys and the ways out.
    """
    from sing_jax.train import train_and_evaluate

    kind, message = workdir_status(config, workdir)
    if kind == "changed":
        if not overwrite:
            raise ConfigChangedError(message)
        message = f"OVERWRITE = True: starting over in {workdir}"
    print(message, flush=True)
    return train_and_evaluate(config, workdir, overwrite=overwrite, quiet=quiet)


def epoch_records(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch records of a run (train/valid/test loss and accuracy, timings)."""
    from sing_jax.train import read_metrics

    return [r for r in read_metrics(workdir) if r.get("kind") == "epoch"]


def train_records(workdir: str) -> list[dict[str, Any]]:
    """The logged train-step records of a run (``step``, ``loss``, ``accuracy``, ...)."""
    from sing_jax.train import read_metrics

    return [r for r in read_metrics(workdir) if r.get("kind") == "train"]
