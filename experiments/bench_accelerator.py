"""One benchmark run for an accelerator: optimizer updates, SINGD steps, train steps, targets.

    PYTHONPATH=. python experiments/bench_accelerator.py --out report.md   # <= 8 min, 1 GPU
    PYTHONPATH=. python experiments/bench_accelerator.py --out r.md --smoke  # seconds, CPU

On whatever device JAX sees first (``jax.devices()[0]``), in one process, on
synthetic data, it measures three parts and writes one markdown report to ``--out``
and the same numbers as JSON next to it (``report.json``):

1. **Optimizer updates** (the pairs of ``bench_optimizers.py``): SING, AdamS,
   AdamSRT, AdamG, SGDMRT against optax.adamw / adam / sgd(momentum), on the
   parameter tree of ResNet-18 (CIFAR, 11.17M) and of ViT-B/16 (86.57M; the
   spherical optimizers treat every kernel per output channel). ``--update-steps``
   donated update+apply steps run inside one jitted ``fori_loop`` call, so that the
   host's dispatch of a few hundred leaves does not hide the device time; the
   gradient is scaled by ``1 + 1e-6 i`` at step ``i`` so that no work on it can be
   hoisted out of the loop. Each time comes with its memory-traffic floor: the bytes
   the step must read and write (``timing.update_floor_bytes``: parameters,
   gradients and state read once, parameters and state written once, Lookahead's
   slow weights 2/5 of the time) over the device's measured copy bandwidth.
2. **SINGD train steps** (the models of ``bench_singd.py``, batch 128): every
   structure at T=1 and T=10 on the MLP and the CNN, and a ViT-Tiny step (patch 16,
   width 192, depth 12, 224x224, batch 64; diagonal and dense at T=10), each against
   ``optax.sgd(momentum=0.9)`` and ``optax.adamw`` on the same model, timed
   interleaved window by window, and at T=1 on the MLP/CNN against PyTorch ``singd``
   on the same GPU. Memory per row: XLA's plan for the step (arguments + outputs -
   donated + temporaries, ``Compiled.memory_analysis``, every backend) and the
   process's peak device memory so far (``device.memory_stats()``; n/a where the
   backend has none, e.g. CPU). JAX does not reset that peak, so it is the row's own
   peak only where it rose during the row.
3. **Train steps** (``sing_jax.train.make_train_step``: jit over shard_map on one
   device, donated state, BatchNorm statistics updated): ResNet-20 and ResNet-18
   (CIFAR, 32x32), batch 128 and 512, float32 and bfloat16 compute
   (``StepOptions(compute_dtype=...)``, float32 master weights), in images/s, with
   SING against the same step with ``optax.adamw``, and against the same model with
   ``torch.optim.AdamW`` (fused) on the same GPU where PyTorch with CUDA is
   importable (channels-last, ``torch.autocast`` for bfloat16, eager; the column is
   skipped with the reason otherwise).

Timing everywhere: warm-up (compilation, reported separately) then the median of
repeats, calls of ours and the baselines taking turns (``timing``), every result
``block_until_ready`` (PyTorch: ``torch.cuda.synchronize``), buffers donated as the
real train step does.

Targets (checked in the report, a column saying met / not met):

- SING update <= 1.25x optax.adamw; AdamSRT <= 1.3x optax.adam; SGDMRT <= 1.5x
  optax.sgd(momentum); each within 1.2x of its own memory-traffic floor;
- SINGD diagonal T=10 step <= 1.1x SGD (every model);
- SINGD dense T=1 step at most 0.5x PyTorch ``singd`` on the same GPU (MLP, CNN);
- ResNet-18 train step images/s with SING >= 0.95x the same step with optax.adamw.

Budget. Sized for one H100 in at most 8 minutes, compilation included: each part
has a deadline (``--budget-s``, default 420 s from the start: optimizers by 20%,
SINGD by 50%, train steps by 100%); a row that would start after its part's
deadline is listed as skipped with the reason, so the run ends on time on a slower
device too. Rows run in priority order (the rows with targets first). A row that
fails (out of memory, a PyTorch error) is reported with its error and the run goes
on.

Left out, to fit the budget or the dependencies: the CPU-only settings of the other
benchmarks (XLA:CPU flags, glibc malloc), PyTorch at T=10 and on the ViT (no twin
here), ``torch.compile``, ImageNet-sized ResNets, multi-device steps, data loading
(``bench_data.py``), the per-layer SINGD pieces (``bench_singd.py --pieces``),
ablations of SING's parts (``bench_optimizers.py``), the
``--smoke`` plan's sizes (one tiny tree, the MLP at batch 8, a SmallCNN train step:
every part runs, the numbers mean nothing), float32 matmul precision
settings (each framework's default: XLA may use TF32 for float32 convolutions and
products on this GPU, PyTorch convolutions do).

What runs here is the textbook path of every rule: the library's CPU variants are
chosen by ``jax.lax.platform_dependent`` on CPU only, and none is a candidate for an
accelerator, so none is timed beside it. SING's rational softplus saves ``exp`` and
``log1p``, which cost nothing in a memory-bound update; SINGD's per-chunk convolution
statistics and per-column-block products trade parallel work for cache reuse, the
opposite of what a GPU wants.

Dependencies: jax, flax, optax, numpy and sing_jax's optimizers, models and train
step (``sing_jax.train``'s checkpoints and config loop, which need orbax and
ml_collections, load lazily and are not used); torch and ``singd`` where present.
No tfds, grain, orbax, ml_collections or matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = time.perf_counter()  # the budget counts from here, imports and device start included

if __name__ == "__main__":
    # PyTorch shares the GPU: JAX takes memory as it needs it instead of 75% up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sing_jax  # noqa: E402
from sing_jax.nn import models  # noqa: E402
from sing_jax.train import StepOptions  # noqa: E402

if __package__:  # imported as experiments.bench_accelerator (python -m, tests)
    from . import bench_optimizers, bench_singd, bench_train, timing  # noqa: E402
else:  # run by path: this script's folder is first on sys.path
    import bench_optimizers  # noqa: E402
    import bench_singd  # noqa: E402
    import bench_train  # noqa: E402
    import timing  # noqa: E402

SECTIONS = ("optimizers", "singd", "train")
# cumulative share of the budget by which each part's last row must have started
PART_DEADLINES = {"optimizers": 0.20, "singd": 0.50, "train": 1.0}
LOOKAHEAD_EVERY = bench_optimizers.LOOKAHEAD_CYCLE  # SING's default sync period


# ----------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, and at which sizes."""

    name: str
    bandwidth_bytes: int
    # part 1: (label, tree builder, channel grouping of the spherical optimizers)
    trees: tuple[tuple[str, Callable[[], dict], Callable], ...]
    optimizers: tuple[str, ...]  # names of bench_optimizers.optimizer_pairs()
    update_steps: int  # steps per timed call, whole Lookahead cycles
    update_repeats: int
    # part 2: rows in priority order, (model, structure, T)
    singd_rows: tuple[tuple[str, str, int], ...]
    singd_batch: int
    vit_tiny: dict  # ViT keyword arguments
    vit_batch: int
    singd_window: int  # at least this many steps per timed window (whole periods of T)
    singd_repeats: int
    # part 3: rows in priority order, (model, batch, dtype); the models
    train_rows: tuple[tuple[str, int, str], ...]
    train_models: dict[str, tuple[Callable, Callable, str]]  # jax, torch factory, size note
    train_window_s: float  # a timed window lasts about this long
    train_repeats: int


STRUCTURE_NAMES = tuple(bench_singd.STRUCTURES)
VIT_TINY = dict(num_classes=1000, image_size=224, patch_size=16, embed_dim=192, depth=12,
                num_heads=3)


def _priority_singd_rows(models_: tuple[str, ...], vit_rows) -> tuple:
    first = [("cnn", "diagonal", 10), ("cnn", "dense", 1), ("mlp", "diagonal", 10),
             ("mlp", "dense", 1)]
    rest = [(m, s, t) for m in models_ for s in STRUCTURE_NAMES for t in (1, 10)]
    rows = [r for r in first if r[0] in models_] + list(vit_rows)
    return tuple(rows + [r for r in rest if r not in rows])


FULL = Plan(
    name="full",
    bandwidth_bytes=2**30,
    trees=(("ResNet-18 (CIFAR)", bench_optimizers.resnet18_cifar_params,
            bench_optimizers.conv_channel_dims),
           ("ViT-B/16", bench_optimizers.vit_params, bench_optimizers.kernel_channel_dims)),
    optimizers=("sing", "adamsrt", "sgdmrt", "adams", "adamg"),
    update_steps=10, update_repeats=20,
    singd_rows=_priority_singd_rows(("cnn", "mlp"), [("vit", "diagonal", 10),
                                                     ("vit", "dense", 10)]),
    singd_batch=bench_singd.BATCH, vit_tiny=VIT_TINY, vit_batch=64,
    singd_window=10, singd_repeats=5,
    train_rows=tuple((m, b, d) for b in (128, 512) for m in ("ResNet-18", "ResNet-20")
                     for d in ("float32", "bfloat16")),
    train_models={
        "ResNet-20": (lambda **kw: models.resnet20(10, **kw), bench_train.torch_resnet20,
                      "0.27M, 32x32"),
        "ResNet-18": (lambda **kw: models.resnet18(10, **kw), bench_train.torch_resnet18,
                      "11.17M, CIFAR stem, 32x32")},
    train_window_s=0.25, train_repeats=5,
)

SMOKE = Plan(
    name="smoke",
    bandwidth_bytes=2**24,
    trees=(("ViT, depth 1, width 16",
            functools.partial(bench_optimizers.vit_params, num_classes=10, image_size=16,
                              embed_dim=16, depth=1, num_heads=2),
            bench_optimizers.kernel_channel_dims),),
    optimizers=("sing", "sgdmrt"),
    update_steps=5, update_repeats=2,
    singd_rows=(("mlp", "diagonal", 10),),
    singd_batch=8, vit_tiny=dict(num_classes=10, image_size=16, patch_size=8, embed_dim=16,
                                 depth=1, num_heads=2),
    vit_batch=4, singd_window=1, singd_repeats=2,
    train_rows=(("SmallCNN", 4, "float32"),),
    train_models={"SmallCNN": (lambda **kw: models.SmallCNN(10, in_channels=3, widths=(4, 8),
                                                            **kw),
                               None, "widths (4, 8) (smoke), 32x32")},
    train_window_s=0.0, train_repeats=2,
)


# --------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    section: str
    text: str
    applies: Callable[[dict], bool]
    metric: str  # a row field
    at_most: float | None = None
    at_least: float | None = None

    def check(self, row: dict) -> tuple[str, float | None]:
        value = row.get(self.metric)
        if row.get("status") != "ok" or value is None or not math.isfinite(value):
            return "not measured", None
        ok = ((self.at_most is None or value <= self.at_most)
              and (self.at_least is None or value >= self.at_least))
        return ("met" if ok else "not met"), value

    @property
    def bound(self) -> str:
        return f"<= {self.at_most}" if self.at_most is not None else f">= {self.at_least}"


def _optimizer_is(name):
    return lambda row: row["optimizer"] == name


TARGETS = (
    Target("optimizers", "SING update <= 1.25x optax.adamw", _optimizer_is("sing"),
           "ratio", at_most=1.25),
    Target("optimizers", "SING update within 1.2x of its floor", _optimizer_is("sing"),
           "ours_over_floor", at_most=1.2),
    Target("optimizers", "AdamSRT update <= 1.3x optax.adam", _optimizer_is("adamsrt"),
           "ratio", at_most=1.3),
    Target("optimizers", "AdamSRT update within 1.2x of its floor", _optimizer_is("adamsrt"),
           "ours_over_floor", at_most=1.2),
    Target("optimizers", "SGDMRT update <= 1.5x optax.sgd(momentum)", _optimizer_is("sgdmrt"),
           "ratio", at_most=1.5),
    Target("optimizers", "SGDMRT update within 1.2x of its floor", _optimizer_is("sgdmrt"),
           "ours_over_floor", at_most=1.2),
    Target("singd", "SINGD diagonal T=10 step <= 1.1x SGD",
           lambda r: r["structure"] == "diagonal" and r["T"] == 10, "ours_over_sgd",
           at_most=1.1),
    Target("singd", "SINGD dense T=1 step <= 0.5x PyTorch singd",
           lambda r: r["structure"] == "dense" and r["T"] == 1 and r["model"] in ("MLP", "CNN"),
           "ours_over_torch", at_most=0.5),
    Target("train", "ResNet-18 images/s with SING >= 0.95x optax.adamw",
           lambda r: r["model"] == "ResNet-18", "sing_over_adamw", at_least=0.95),
)


# ---------------------------------------------------------------------- environment

def torch_cuda_reason() -> str | None:
    """None where PyTorch can run on the GPU that JAX uses, else why it cannot."""
    platform_ = jax.devices()[0].platform
    if platform_ != "gpu":
        return f"JAX runs on {platform_}, not on a GPU that PyTorch could share"
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def singd_reason() -> str | None:
    """None where the PyTorch ``singd`` package can run on the GPU, else why not."""
    reason = torch_cuda_reason()
    if reason is not None:
        return reason
    try:
        import singd  # noqa: F401
    except ImportError as error:
        return f"the PyTorch singd package is not importable ({error})"
    return None


def _version(module_name: str) -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version(module_name)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return "not installed"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return "unknown"


def peak_device_bytes(device) -> int | None:
    """The process's peak device memory so far, or None where the backend keeps none."""
    stats = device.memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def planned_step_bytes(compiled) -> int | None:
    """XLA's plan of a compiled step's device memory: arguments, outputs that do not
    reuse a donated argument, and temporaries."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


class Budget:
    """Deadlines of the parts, counted from the start of the process."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    def deadline(self, section: str) -> float:
        return START + PART_DEADLINES[section] * self.budget_s

    def run_row(self, section: str, row: dict, measure: Callable[[], dict]) -> dict:
        """Fills ``row`` by ``measure()``; skipped after the deadline, an error kept."""
        if time.perf_counter() > self.deadline(section):
            row.update(status="skipped",
                       note=f"time budget: the {section} part had to start its rows by "
                            f"{PART_DEADLINES[section] * self.budget_s:.0f} s")
            return row
        log(f"{section}: {row['label']}")
        try:
            row.update(measure())
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - one failing row must not end the run
            traceback.print_exc(file=sys.stderr)
            row.update(status="error", note=f"{type(error).__name__}: {error}"[:400])
        return row


# ----------------------------------------------------------- part 1: optimizer updates

def looped_update(tx: optax.GradientTransformation, steps: int):
    """``steps`` donated update+apply steps in one jitted call.

    The gradient is scaled by ``1 + 1e-6 i`` at step ``i``: a loop-invariant gradient
    would let XLA hoist the work that depends on it alone (SING's standardisation,
    Adam's square) out of the loop.
    """
    def run(params, state, grads):
        def body(i, carry):
            params, state = carry
            scale = 1 + 1e-6 * i.astype(jnp.float32)
            step_grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
            updates, state = tx.update(step_grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, steps, body, (params, state))

    return jax.jit(run, donate_argnums=(0, 1))


def _compiled_run(jitted, carry, fixed):
    """AOT-compiles ``jitted(*carry, *fixed)``: (compiled, seconds to compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*carry, *fixed).compile()
    return compiled, time.perf_counter() - start


def prepare_update(tx, params0, grads, plan: Plan, bandwidth: float) -> dict:
    """One optimizer's looped update on a copy of ``params0``, compiled: the closure
    that advances it by one call, its floor in ms per step and its compile seconds."""
    params = jax.tree.map(jnp.copy, params0)
    state = jax.jit(tx.init)(params)  # one compilation, not one per leaf shape
    floor_ms = timing.update_floor_bytes(params, state, LOOKAHEAD_EVERY) / bandwidth * 1e3
    compiled, compile_s = _compiled_run(looped_update(tx, plan.update_steps),
                                        (params, state), (grads,))
    box = [(params, state)]

    def advance():
        box[0] = jax.block_until_ready(compiled(*box[0], grads))

    return {"advance": advance, "floor_ms": floor_ms, "compile_s": compile_s}


def part_optimizers(plan: Plan, budget: Budget, bandwidth: float) -> list[dict]:
    rows = []
    for tree_label, build_tree, channel_dims in plan.trees:
        rows += _tree_rows(plan, budget, bandwidth, tree_label, build_tree, channel_dims)
    return rows


def _tree_rows(plan: Plan, budget: Budget, bandwidth: float, tree_label: str,
               build_tree: Callable[[], dict], channel_dims: Callable) -> list[dict]:
    tree: dict[str, Any] = {}  # params and grads, built on the first row that runs

    def measure(ours, base) -> dict:
        if not tree:
            tree["params"] = params = build_tree()
            seeds = iter(range(1000, 10**6))
            tree["grads"] = jax.tree.map(
                lambda p: bench_optimizers.random_leaf(p.shape, 1e-2, next(seeds)), params)
        params, grads = tree["params"], tree["grads"]
        ours_run = prepare_update(ours, params, grads, plan, bandwidth)
        base_run = prepare_update(base, params, grads, plan, bandwidth)
        seconds = timing.interleaved_medians(
            {"ours": ours_run["advance"], "base": base_run["advance"]}, plan.update_repeats)
        ours_ms = seconds["ours"] / plan.update_steps * 1e3
        base_ms = seconds["base"] / plan.update_steps * 1e3
        return {"parameters_m": sum(p.size for p in jax.tree.leaves(params)) / 1e6,
                "ours_ms": ours_ms, "baseline_ms": base_ms, "ratio": ours_ms / base_ms,
                "ours_floor_ms": ours_run["floor_ms"],
                "ours_over_floor": ours_ms / ours_run["floor_ms"],
                "baseline_floor_ms": base_run["floor_ms"],
                "baseline_over_floor": base_ms / base_run["floor_ms"],
                "compile_s": ours_run["compile_s"] + base_run["compile_s"]}

    pairs = {pair[0]: pair for pair in bench_optimizers.optimizer_pairs(channel_dims)}
    rows = []
    for name in plan.optimizers:
        _, ours, base_name, base, _ = pairs[name]
        row = {"label": f"{tree_label} / {name}", "tree": tree_label, "parameters_m": None,
               "optimizer": name, "baseline": base_name, "note": ""}
        rows.append(budget.run_row("optimizers", row, functools.partial(measure, ours, base)))
    return rows


# ---------------------------------------------------------------- part 2: SINGD steps

def _vit_data(plan: Plan, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = plan.vit_tiny["image_size"]
    x = rng.normal(size=(plan.vit_batch, size, size, 3)).astype(np.float32)
    return x, rng.integers(0, plan.vit_tiny["num_classes"], plan.vit_batch)


# One transformation each (optax transformations hold no state): their jitted inits
# are then traced once, not again for every row.
BASELINES = {"sgd": optax.sgd(1e-2, momentum=0.9),
             "adamw": optax.adamw(1e-3, weight_decay=1e-4)}


class SingdModel:
    """One model of part 2: its data, and its SGD and AdamW steps compiled once."""

    LABELS = {"mlp": "MLP", "cnn": "CNN", "vit": "ViT-Tiny"}

    def __init__(self, name: str, plan: Plan):
        self.name, self.plan = name, plan
        self.label = self.LABELS[name]
        if name == "vit":
            x, y = _vit_data(plan)
        else:
            x, y = bench_singd.data(name, batch=plan.singd_batch)
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        self.compiled = {}  # "sgd"/"adamw" -> the compiled step

    def model(self):
        if self.name == "vit":
            from flax import nnx

            return models.ViT(**self.plan.vit_tiny, rngs=nnx.Rngs(0))
        return bench_singd.model_of(self.name)

    def baseline(self, which: str):
        """``(compiled step, fresh carry, fixed arguments)`` of a baseline: compiled on
        the first call, a fresh carry every call (a timed window donates its carry)."""
        step, carry, fixed = bench_singd.optax_train_step(self.model(), BASELINES[which],
                                                          self.x, self.y)
        if which not in self.compiled:
            self.compiled[which] = _compiled_run(step, carry, fixed)[0]
        return self.compiled[which], carry, fixed


def torch_singd_window(name: str, structure: str, batch: int, steps: int,
                       device: str = "cuda") -> tuple[Callable[[], None], int]:
    """PyTorch ``singd`` at T=1 on ``bench_singd``'s ``name``: (window, its steps), one
    step a window where a step takes over a second (the naive reference structures)."""
    one = bench_singd.torch_step(name, structure, 1, device=device, batch=batch)
    one()  # warm-up: allocations, cuDNN's choices
    bench_singd.torch_sync(device)
    one_s = timing.seconds_of(lambda: (one(), bench_singd.torch_sync(device)))
    steps = 1 if one_s > 1.0 else steps
    return bench_singd.torch_window(one, steps, device), steps


def torch_train_window(build_torch: Callable, batch: int, dtype: str, window_s: float,
                       device: str = "cuda") -> tuple[Callable[[], None], int]:
    """The same model trained by PyTorch (AdamW, fused on CUDA; channels-last;
    ``torch.autocast`` for bfloat16): (window of about ``window_s``, its steps)."""
    import torch

    torch.backends.cudnn.benchmark = True
    one = bench_train.torch_train_step(
        build_torch(), batch, device=device, optimizer="adamw", channels_last=True,
        autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    for _ in range(3):  # cuDNN's algorithm search, the allocator's warm-up
        one()
    bench_singd.torch_sync(device)
    steps = _steps_for(window_s, timing.seconds_of(lambda: (one(), bench_singd.torch_sync(device))))
    return bench_singd.torch_window(one, steps, device), steps


def part_singd(plan: Plan, budget: Budget, torch_reason: str | None) -> list[dict]:
    device = jax.devices()[0]
    models_: dict[str, SingdModel] = {}
    rows = []
    for name, structure, T in plan.singd_rows:
        label = SingdModel.LABELS[name]
        row = {"label": f"{label} {structure} T={T}", "model": label, "structure": structure,
               "T": T}

        def measure(name=name, structure=structure, T=T):
            if name not in models_:
                models_[name] = SingdModel(name, plan)
            model = models_[name]
            steps = T * max(1, -(-plan.singd_window // T))  # whole periods of T
            step, carry, fixed, precond_bytes = bench_singd.singd_train_step(
                model.model(), structure, T, model.x, model.y)
            compiled, compile_s = _compiled_run(step, carry, fixed)
            windows = {"ours": (bench_singd.jax_window(compiled, carry, fixed, steps), steps)}
            for key in BASELINES:
                windows[key] = (bench_singd.jax_window(*model.baseline(key), steps), steps)
            torch_note = None
            if name == "vit":
                torch_note = "no PyTorch twin of this model here"
            elif T != 1:
                torch_note = "PyTorch timed at T=1 only"
            elif torch_reason is not None:
                torch_note = torch_reason
            else:
                windows["torch"] = torch_singd_window(name, structure, plan.singd_batch, steps)
            seconds = bench_singd.seconds_per_step(windows, plan.singd_repeats)
            ours_ms, sgd_ms, adamw_ms = (seconds[k] * 1e3 for k in ("ours", "sgd", "adamw"))
            torch_ms = seconds["torch"] * 1e3 if "torch" in seconds else None
            return {
                "ours_ms": ours_ms, "sgd_ms": sgd_ms, "adamw_ms": adamw_ms,
                "ours_over_sgd": ours_ms / sgd_ms, "ours_over_adamw": ours_ms / adamw_ms,
                "torch_ms": torch_ms,
                "ours_over_torch": None if torch_ms is None else ours_ms / torch_ms,
                "precond_kib": precond_bytes / 1024,
                "step_mib": _mib(planned_step_bytes(compiled)),
                "sgd_step_mib": _mib(planned_step_bytes(model.compiled["sgd"])),
                "process_peak_mib": _mib(peak_device_bytes(device)),
                "compile_s": compile_s,
                "note": torch_note or ""}

        rows.append(budget.run_row("singd", row, measure))
    return rows


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


# ---------------------------------------------------------------- part 3: train steps

def _jax_train_window(build_model, tx, batch: int, dtype: str):
    """The library's train step on one device: (window factory, compile seconds, step s)."""
    options = StepOptions(compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    step, state, placed = bench_train.jax_train_step(build_model, tx, batch, options)
    box = [state]

    def one():
        box[0], metrics = step(box[0], placed)
        return metrics

    compile_s = timing.seconds_of(lambda: jax.block_until_ready(one()))
    step_s = timing.seconds_of(lambda: jax.block_until_ready(one()))

    def window(steps):
        def run():
            for _ in range(steps):
                metrics = one()
            jax.block_until_ready((box[0].params, metrics))

        return run

    return window, compile_s, step_s


def _steps_for(window_s: float, step_s: float) -> int:
    """Steps of a timed window: about ``window_s`` long, whole Lookahead cycles."""
    steps = max(1, min(100, round(window_s / max(step_s, 1e-6))))
    return LOOKAHEAD_EVERY * -(-steps // LOOKAHEAD_EVERY)


def part_train(plan: Plan, budget: Budget, torch_reason: str | None) -> list[dict]:
    rows = []
    for model_name, batch, dtype in plan.train_rows:
        build_jax, build_torch, size = plan.train_models[model_name]
        row = {"label": f"{model_name} batch {batch} {dtype}", "model": model_name,
               "size": size, "batch": batch, "dtype": dtype}

        def measure(build_jax=build_jax, build_torch=build_torch, batch=batch, dtype=dtype):
            windows, compile_s = {}, {}
            for key, tx in (("sing", sing_jax.sing(5e-3, weight_decay=5e-4)),
                            ("adamw", optax.adamw(5e-4, weight_decay=5e-3))):
                make_window, compile_s[key], step_s = _jax_train_window(build_jax, tx, batch,
                                                                        dtype)
                steps = _steps_for(plan.train_window_s, step_s)
                windows[key] = (make_window(steps), steps)
            note = torch_reason or ""
            if torch_reason is None:
                windows["torch"] = torch_train_window(build_torch, batch, dtype,
                                                      plan.train_window_s)
            seconds = bench_singd.seconds_per_step(windows, plan.train_repeats)
            rate = {key: batch / s for key, s in seconds.items()}
            torch_rate = rate.get("torch")
            return {
                "sing_images_s": rate["sing"], "adamw_images_s": rate["adamw"],
                "sing_over_adamw": rate["sing"] / rate["adamw"],
                "torch_adamw_images_s": torch_rate,
                "adamw_over_torch": None if torch_rate is None else rate["adamw"] / torch_rate,
                "sing_over_torch": None if torch_rate is None else rate["sing"] / torch_rate,
                "compile_s": compile_s["sing"] + compile_s["adamw"], "note": note}

        rows.append(budget.run_row("train", row, measure))
    return rows


# --------------------------------------------------------------------------- report

# section -> (title, [(field, header, format)])
COLUMNS = {
    "optimizers": ("1. Optimizer updates (update + apply, donated, ms per step)", [
        ("tree", "tree", "s"), ("parameters_m", "params (M)", ".2f"),
        ("optimizer", "ours", "s"), ("baseline", "baseline", "s"),
        ("ours_ms", "ours ms", ".3f"), ("baseline_ms", "base ms", ".3f"),
        ("ratio", "ours/base", ".2f"), ("ours_floor_ms", "ours floor ms", ".3f"),
        ("ours_over_floor", "ours/floor", ".2f"), ("baseline_floor_ms", "base floor ms", ".3f"),
        ("baseline_over_floor", "base/floor", ".2f"), ("compile_s", "compile s", ".1f"),
        ("target", "target", "s"), ("status", "status", "s"), ("note", "note", "s")]),
    "singd": ("2. SINGD train steps (ms per step; memory in MiB)", [
        ("model", "model", "s"), ("structure", "structure", "s"), ("T", "T", "d"),
        ("ours_ms", "ours ms", ".2f"), ("sgd_ms", "SGD ms", ".2f"),
        ("adamw_ms", "AdamW ms", ".2f"), ("ours_over_sgd", "ours/SGD", ".2f"),
        ("ours_over_adamw", "ours/AdamW", ".2f"), ("torch_ms", "PyTorch ms", ".2f"),
        ("ours_over_torch", "ours/PyTorch", ".2f"), ("precond_kib", "precond KiB", ".0f"),
        ("step_mib", "step MiB (XLA plan)", ".1f"),
        ("sgd_step_mib", "SGD step MiB (XLA plan)", ".1f"),
        ("process_peak_mib", "process peak MiB", ".1f"), ("compile_s", "compile s", ".1f"),
        ("target", "target", "s"), ("status", "status", "s"), ("note", "note", "s")]),
    "train": ("3. Train steps (images/s)", [
        ("model", "model", "s"), ("size", "size", "s"), ("batch", "batch", "d"),
        ("dtype", "dtype", "s"), ("sing_images_s", "SING img/s", ".0f"),
        ("adamw_images_s", "optax.adamw img/s", ".0f"),
        ("sing_over_adamw", "SING/adamw", ".2f"),
        ("torch_adamw_images_s", "PyTorch AdamW img/s", ".0f"),
        ("adamw_over_torch", "adamw/PyTorch", ".2f"),
        ("sing_over_torch", "SING/PyTorch", ".2f"), ("compile_s", "compile s", ".1f"),
        ("target", "target", "s"), ("status", "status", "s"), ("note", "note", "s")]),
}


def check_targets(sections: dict[str, list[dict]]) -> list[dict]:
    """Every (target, row it applies to), checked; also sets each row's ``target``
    field: ``-`` (none applies), ``met`` (all met) or what is not met or not measured."""
    results = []
    verdicts: dict[int, list[str]] = {}
    for target in TARGETS:
        rows = [row for row in sections.get(target.section, []) if target.applies(row)]
        if not rows:
            results.append({"target": target.text, "section": target.section,
                            "row": "(no such row in this run)", "metric": target.metric,
                            "value": None, "bound": target.bound, "status": "not measured"})
        for row in rows:
            status, value = target.check(row)
            results.append({"target": target.text, "section": target.section,
                            "row": row["label"], "metric": target.metric, "value": value,
                            "bound": target.bound, "status": status})
            verdicts.setdefault(id(row), []).append(
                f"not met ({target.metric} {value:.3f}, {target.bound})"
                if status == "not met" else status)
    for rows in sections.values():
        for row in rows:
            row_verdicts = verdicts.get(id(row), [])
            failing = [v for v in row_verdicts if v != "met"]
            row["target"] = ("-" if not row_verdicts else "met" if not failing
                             else "; ".join(dict.fromkeys(failing)))
    return results


def _cell(value: Any, fmt: str) -> str:
    if fmt == "s" and value == "":
        return ""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if fmt == "s":
        return str(value).replace("|", "/").replace("\n", " ")
    return format(value, fmt)


def markdown(meta: dict, targets: list[dict], sections: dict[str, list[dict]]) -> str:
    lines = [f"# sing_jax accelerator benchmark ({meta['plan']})", ""]
    for key in ("device", "platform", "devices", "copy_bandwidth_gb_s", "jax", "jaxlib",
                "flax", "optax", "torch", "singd", "sing_jax_commit", "python", "date_utc",
                "command", "budget_s", "wall_s"):
        lines.append(f"- {key}: {_cell(meta.get(key), '.1f' if key.endswith('_s') else 's')}")
    lines += ["", "## Targets", "",
              "| target | row | value | bound | status |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['row']} | {_cell(t['value'], '.3f')} | "
                     f"{t['bound']} | {t['status']} |")
    met = sum(t["status"] == "met" for t in targets)
    missing = sum(t["status"] == "not measured" for t in targets)
    lines += ["", f"{met} of {len(targets)} target checks met, {missing} not measured."]
    for section in SECTIONS:
        title, columns = COLUMNS[section]
        lines += ["", f"## {title}", "",
                  "| " + " | ".join(header for _, header, _ in columns) + " |",
                  "|" + "---|" * len(columns)]
        for row in sections.get(section, []):
            lines.append("| " + " | ".join(_cell(row.get(field), fmt)
                                           for field, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="the markdown report; the JSON goes next to it (.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: a well-formed report in seconds on a CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds by which the last row must have started "
                             "(default 420; 600 with --smoke)")
    parser.add_argument("--parts", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the parts to run (default: all)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    budget_s = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 420.0)
    if budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {budget_s}")
    budget = Budget(budget_s)
    # Models are initialised from the "rbg" PRNG: its programs compile in seconds less
    # than threefry's (a SmallCNN with SING on XLA:CPU: 0.9 s against 22 s); the timed
    # steps draw no random numbers.
    jax.config.update("jax_default_prng_impl", "rbg")
    device = jax.devices()[0]
    log(f"device {device.device_kind} ({device.platform}); plan {plan.name}")
    torch_reason = torch_cuda_reason()
    bandwidth = timing.copy_bandwidth(plan.bandwidth_bytes)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    sections: dict[str, list[dict]] = {section: [] for section in SECTIONS}
    if "optimizers" in args.parts:
        sections["optimizers"] = part_optimizers(plan, budget, bandwidth)
    if "singd" in args.parts:
        sections["singd"] = part_singd(plan, budget, singd_reason())
    if "train" in args.parts:
        sections["train"] = part_train(plan, budget, torch_reason)
    targets = check_targets(sections)
    for section, rows in sections.items():  # a skipped or failed row has every field too
        for row in rows:
            for field, _, _ in COLUMNS[section][1]:
                row.setdefault(field, "" if field == "note" else None)
    torch_version = _version("torch")
    meta = {
        "plan": plan.name, "device": device.device_kind, "platform": device.platform,
        "devices": jax.device_count(), "copy_bandwidth_gb_s": bandwidth / 1e9,
        "jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": torch_version + ("" if torch_reason is None else f" ({torch_reason})"),
        "singd": _version("singd"), "sing_jax_commit": _git_commit(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                         else sys.argv[1:])),
        "budget_s": budget_s, "wall_s": time.perf_counter() - START,
    }
    report = {"meta": meta, "targets": targets,
              "sections": {section: {"title": COLUMNS[section][0],
                                     "columns": [field for field, _, _ in COLUMNS[section][1]],
                                     "rows": sections[section]}
                           for section in SECTIONS}}
    text = markdown(meta, targets, sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
