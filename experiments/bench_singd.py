"""Benchmark: SINGD train-step time and preconditioner memory, ours vs optax SGD and
AdamW vs PyTorch.

Models: an MLP 784-1024-1024-10 and a small CNN (3 conv + 2 dense on 32x32x3), batch
128; a ViT-Tiny (width 192, 12 blocks, 3 heads, MLP 768; Flax's
``nnx.MultiHeadAttention``, scanned blocks) on 32x32x3 with 8x8 patches, batch 32.
For each structure and T, the full jitted train step (forward, backward, capture,
preconditioner refresh every T steps, update; buffers donated) is timed against
``optax.sgd(momentum=0.9)`` (and, for the ViT, ``optax.adamw``) on the same model and
against the PyTorch ``singd`` package (if installed; MLP and CNN) on the same
architecture, in the same process.
Ours, SGD and PyTorch are timed interleaved, window by window, so that machine
noise hits them alike: per step, the median over ``--repeats`` rounds of windows of
at least ``--window`` steps (whole periods of ``T``), after a warm-up window each.
PyTorch at T > 1 is (refresh step + (T-1) x median skip step) / T, the refresh step
being its T=1 time, and its slow structures (a step over a second) get one-step
windows, so that they stay affordable. The memory column is the size of the
preconditioner state (K, C, m_K, m_C) in bytes.

    python experiments/bench_singd.py                 # everything (a few minutes)
    python experiments/bench_singd.py --quick         # CNN only, fewer structures
    python experiments/bench_singd.py --pieces        # per layer: curvature and
                                                      # natural gradient alone

The last line is the headline ratio: our T=1 step over the PyTorch step (worst
structure, CNN), our diagonal T=10 step over SGD (CNN), and our dense T=10 step
over AdamW (ViT-Tiny).

CPU settings, the same for our SINGD and the SGD baseline: the CNN pools with
:func:`sing_jax.nn.max_pool` (same values as ``nnx.max_pool``, a cheaper gradient),
and XLA:CPU (jaxlib 0.10) is asked to run convolutions with its Eigen kernels
rather than YNNPACK's, which are slower for these layer sizes (1.5x-2x), while
matrix products stay with YNNPACK one at a time, which is faster than Eigen for
the MLP's thin products
(``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`` in ``XLA_FLAGS``,
unless ``XLA_FLAGS`` already sets it; see docs/xla_cpu.md).
"""

from __future__ import annotations

import argparse
import os
import warnings

if __package__:  # imported as experiments.bench_singd (python -m, tests)
    from . import xla_cpu
else:  # run by path: this script's folder is first on sys.path
    import xla_cpu
if __name__ == "__main__":
    xla_cpu.set_cpu_flag()  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import sing_jax  # noqa: E402

if __package__:  # imported as experiments.bench_singd (python -m, tests)
    from . import timing  # noqa: E402
else:  # run by path: this script's folder is first on sys.path
    import timing  # noqa: E402

STRUCTURES = {  # ours -> PyTorch reference name
    "dense": "dense",
    "diagonal": "diagonal",
    "block_diagonal": "block30diagonal",
    "hierarchical": "hierarchical15_15",
    "tril_toeplitz": "triltoeplitz",
}
BATCH = 128
VIT_BATCH = 32


def vit_tiny(rngs):
    return sing_jax.nn.models.ViT(10, image_size=32, patch_size=8, embed_dim=192, depth=12,
                                  num_heads=3, attention="mha", scan_blocks=True,
                                  attn_extra_loss_layers=0, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(784, 1024, rngs=rngs)
        self.l2 = nnx.Linear(1024, 1024, rngs=rngs)
        self.l3 = nnx.Linear(1024, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.l1(x.reshape(x.shape[0], -1)))
        return self.l3(jax.nn.relu(self.l2(h)))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.c3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
        self.d1 = nnx.Linear(4 * 4 * 64, 256, rngs=rngs)
        self.d2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        for conv in (self.c1, self.c2, self.c3):
            x = sing_jax.nn.max_pool(jax.nn.relu(conv(x)), (2, 2))
        return self.d2(jax.nn.relu(self.d1(x.reshape(x.shape[0], -1))))


def torch_model(name):
    import torch

    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                             nn.ReLU(), nn.Linear(1024, 10))
    layers = []
    for cin, cout in ((3, 32), (32, 64), (64, 64)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def model_of(name):
    """The benchmark's ``"mlp"``, ``"cnn"`` or ``"vit"`` (ViT-Tiny), initialised from seed 0."""
    return {"mlp": MLP, "cnn": CNN, "vit": vit_tiny}[name](nnx.Rngs(0))


def data(name, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    batch = batch or (VIT_BATCH if name == "vit" else BATCH)
    shape = (batch, 28, 28, 1) if name == "mlp" else (batch, 32, 32, 3)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, 10, batch)


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def seconds_per_step(windows: dict, repeats: int) -> dict:
    """Seconds per step of each ``(run_window, steps)``: one warm-up window each, then
    ``repeats`` interleaved rounds; the median window time divided by its steps."""
    seconds = timing.interleaved_medians({name: run_window for name, (run_window, _)
                                           in windows.items()}, repeats)
    return {name: seconds[name] / steps for name, (_, steps) in windows.items()}


def jax_window(step, carry, fixed, steps):
    """A window of ``steps`` calls of ``*carry, loss = step(*carry, *fixed)``."""
    box = [carry]

    def window():
        for _ in range(steps):
            *new_carry, loss = step(*box[0], *fixed)
            box[0] = tuple(new_carry)
        loss.block_until_ready()

    return window


def singd_train_step(model, structure, T, x, y):
    """Our jitted SINGD train step on ``model`` (forward, backward, capture, update):
    ``(step, carry, fixed, preconditioner bytes)``, where ``step(*carry, *fixed)``
    returns ``(*new carry, loss)`` and donates the carry (parameters, optimizer state)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = sing_jax.singd(1e-2, T=T, structures=(structure, structure),
                        layers=sing_jax.singd_layers(model))
    state = jax.jit(tx.init)(params)  # one compilation, not one per leaf shape

    def step(params, opt_state, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)
        (loss, grads), stats = sing_jax.singd_value_and_grad(loss_fn, m, x, y,
                                                             opt_state=opt_state)
        updates, opt_state = tx.update(grads, opt_state, params, singd_stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.layers))
    return jax.jit(step, donate_argnums=(0, 1)), (params, state), (rest, x, y), nbytes


def optax_train_step(model, tx, x, y):
    """The same train step with an optax optimizer ``tx``: ``(step, carry, fixed)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, opt_state, rest, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return (jax.jit(step, donate_argnums=(0, 1)), (params, jax.jit(tx.init)(params)),
            (rest, x, y))


def ours_window(name, structure, T, steps):
    """Our SINGD train step on ``name``: a window of ``steps`` steps, and the bytes of
    the preconditioner state."""
    x, y = (jnp.asarray(a) for a in data(name))
    step, carry, fixed, nbytes = singd_train_step(model_of(name), structure, T, x, y)
    return jax_window(step, carry, fixed, steps), nbytes


def baseline_window(name, steps, tx):
    """An optax optimizer on the same model: a window of ``steps`` steps."""
    x, y = (jnp.asarray(a) for a in data(name))
    return jax_window(*optax_train_step(model_of(name), tx, x, y), steps)


def sgd_window(name, steps):
    """``optax.sgd(momentum=0.9)`` on the same model: a window of ``steps`` steps."""
    return baseline_window(name, steps, optax.sgd(1e-2, momentum=0.9))


def torch_step(name, structure, T, device="cpu", batch=BATCH):
    """One PyTorch ``singd`` step on the same architecture, or None without torch.

    On a CUDA ``device`` the step only queues the work: synchronise before reading a
    clock."""
    try:
        import torch
        from singd.optim.optimizer import SINGD
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torch_model(name).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, lr=1e-2, T=T, structures=(STRUCTURES[structure],) * 2)
    xb, yb = data(name, batch=batch)
    x = torch.tensor(xb.transpose(0, 3, 1, 2).copy(), device=device)
    y = torch.tensor(yb, device=device)

    def one_step():
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # singd's "naive implementation" notices
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    return one_step


def torch_sync(device="cpu"):
    """Waits for the queued PyTorch work on ``device`` (CUDA work runs asynchronously)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def torch_window(one_step, steps, device="cpu"):
    """A window of ``steps`` PyTorch steps that returns when their work is done."""
    def window():
        for _ in range(steps):
            one_step()
        torch_sync(device)

    return window


def layer_piece_times(name, structure, repeats=20):
    """Where our T=1 step's preconditioner time goes, per layer of ``name``: the
    milliseconds of the curvature from the captured statistics and of the natural
    gradient, each jitted and timed alone (median of ``repeats``).

    Returns ``[(layer path, dim K, dim C, {"curvature": ms, "natural gradient": ms}),
    ...]``.
    """
    model = model_of(name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = sing_jax.singd(1e-2, T=1, structures=(structure, structure),
                        layers=sing_jax.singd_layers(model))
    layers = sing_jax.singd_state(tx.init(params)).layers
    x, y = (jnp.asarray(a) for a in data(name))
    merged = nnx.merge(graphdef, params, rest, copy=True)
    (_, grads), captures = sing_jax.singd_value_and_grad(loss_fn, merged, x, y)
    grad_leaves = dict(zip(sing_jax.leaf_paths(grads), jax.tree.leaves(grads), strict=True))

    def blocking(fn, *args):
        fn = jax.jit(fn)
        return lambda: jax.block_until_ready(fn(*args))

    rows = []
    for layer in layers:
        cfg = layer.config
        kernel = grad_leaves[f"{cfg.path}/kernel"]
        bias = grad_leaves.get(f"{cfg.path}/bias")
        seconds = timing.interleaved_medians({
            "curvature": blocking(type(layer).curvature, layer, captures[cfg.path]),
            "natural gradient": blocking(type(layer).natural_gradient, layer, kernel, bias),
        }, repeats)
        rows.append((cfg.path, cfg.dim_k, cfg.dim_c, {k: v * 1e3 for k, v in seconds.items()}))
    return rows


def print_piece_times(models, structures, repeats):
    print(f"{'model':<5} {'structure':<15} {'layer':<6} {'K':>5} {'C':>5} "
          f"{'curvature ms':>12} {'nat. grad ms':>12}")
    for name in models:
        for structure in structures:
            rows = layer_piece_times(name, structure, repeats)
            for path, dim_k, dim_c, ms in rows + [("total", "", "", {
                    key: sum(r[3][key] for r in rows) for key in rows[0][3]})]:
                print(f"{name:<5} {structure:<15} {path:<6} {dim_k:>5} {dim_c:>5} "
                      f"{ms['curvature']:>12.3f} {ms['natural gradient']:>12.3f}",
                      flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "vit"])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (default 5; 20 with --pieces)")
    parser.add_argument("--window", type=int, default=5,
                        help="steps per timed window (rounded up to whole periods of T)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="CNN only; dense, diagonal, tril_toeplitz")
    parser.add_argument("--pieces", action="store_true",
                        help="instead: per layer, the T=1 preconditioner pieces (curvature, "
                             "natural gradient) timed alone")
    args = parser.parse_args()
    # The ViT's norms and embeddings train with `other`, as intended: no notice per trace.
    warnings.filterwarnings("ignore", message="SINGD: module .* holds parameters")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick:
        args.models, args.structures = ["cnn"], ["dense", "diagonal", "tril_toeplitz"]
    if args.pieces:
        print_piece_times(args.models, args.structures, args.repeats or 20)
        return
    try:
        import torch

        torch.set_num_threads(max(1, len(jax.devices("cpu")) and 2))
    except ImportError:
        pass
    bandwidth = timing.copy_bandwidth()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    header = (f"{'model':<5} {'structure':<15} {'T':>3} {'ours ms':>9} {'sgd ms':>8} "
              f"{'adamw ms':>8} {'torch ms':>9} {'ours/torch':>10} {'ours/sgd':>9} "
              f"{'ours/adamw':>10} {'precond KiB':>11} {'floor ms':>8}")
    print(header)
    print("-" * len(header))
    worst_t1, diag_t10, vit_t10 = (float("nan"),) * 3  # nan: not measured in this run
    for name in args.models:
        model = model_of(name)
        param_bytes = sum(p.size * 4 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        for structure in args.structures:
            torch_refresh = None  # PyTorch's T=1 step: the refresh step of T > 1
            for T in sorted(args.T):
                steps = T * max(1, -(-args.window // T))  # whole periods, >= --window
                ours, nbytes = ours_window(name, structure, T, steps)
                windows = {"ours": (ours, steps), "sgd": (sgd_window(name, steps), steps)}
                if name == "vit":
                    windows["adamw"] = (baseline_window(name, steps, optax.adamw(1e-3)), steps)
                torch_one = None if args.no_torch or name == "vit" else torch_step(
                    name, structure, T)
                if torch_one is not None and T == 1:
                    # slow reference structures (PyTorch's naive Toeplitz): one step a window
                    torch_steps = 1 if timing.seconds_of(torch_one) > 1.0 else steps
                    windows["torch"] = (torch_window(torch_one, torch_steps), torch_steps)
                elif torch_one is not None:
                    # (refresh step + (T-1) skip steps) / T, skip steps timed here
                    torch_one()  # step 0 refreshes; the next T - 1 do not
                    windows["torch skip"] = (torch_window(torch_one, 1), 1)
                times = seconds_per_step(windows, args.repeats or 5)
                ref = times.get("torch", float("nan"))
                if "torch skip" in times:
                    ref = (torch_refresh + (T - 1) * times["torch skip"]) / T if (
                        torch_refresh is not None) else float("nan")
                torch_refresh = ref if T == 1 else torch_refresh
                ours, sgd = times["ours"], times["sgd"]
                adamw = times.get("adamw", float("nan"))
                # the update reads params, grads, momentum, the factors and writes
                # params, momentum (and the factors every T steps)
                floor = (5 * param_bytes + nbytes * (1 + 2 / T)) / bandwidth
                print(f"{name:<5} {structure:<15} {T:>3} {ours * 1e3:>9.1f} {sgd * 1e3:>8.1f} "
                      f"{adamw * 1e3:>8.1f} {ref * 1e3:>9.1f} {ours / ref:>10.2f} "
                      f"{ours / sgd:>9.2f} {ours / adamw:>10.2f} {nbytes / 1024:>11.1f} "
                      f"{floor * 1e3:>8.2f}", flush=True)
                if name == "cnn" and T == 1 and np.isfinite(ref):
                    worst_t1 = np.nanmax([worst_t1, ours / ref])
                if name == "cnn" and T == 10 and structure == "diagonal":
                    diag_t10 = ours / sgd
                if name == "vit" and T == 10 and structure == "dense":
                    vit_t10 = ours / adamw
    headline = [("ours/torch at T=1 (worst structure, CNN)", worst_t1, " (target <= 0.5)"),
                ("ours/sgd diagonal T=10 (CNN)", diag_t10, " (target <= 1.5)"),
                ("ours/adamw dense T=10 (ViT-Tiny)", vit_t10, "")]
    # only the ratios of the models and structures this run timed
    print("headline: " + "; ".join(f"{what} = {value:.2f}{target}"
                                   for what, value, target in headline if np.isfinite(value)))


if __name__ == "__main__":
    xla_cpu.reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
