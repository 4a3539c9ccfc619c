"""Update+apply time of each sing_jax optimizer against its optax baseline, side by side.

On the parameter tree of ResNet-18 (CIFAR variant, 11.17M parameters, Flax
layout; a ViT-B/16's, 86.57M, with ``--tree vit-b16``), the jitted ``update`` +
``apply_updates`` step with donated params and state is timed for ours and the
baseline in the same process, interleaved step by step so that machine noise hits
both alike, and reported with the memory-traffic floor (bytes the step must read
and write, ``timing.update_floor_bytes``, divided by the measured copy
bandwidth). The time of a step is the mean over the five positions of a
Lookahead cycle of each position's median: SING's synchronising step and the
copy of the slow weights after it are dearer than its other three, so a plain
median over steps would land between the two kinds and report neither SING's
typical nor its average cost. For an optimizer without a cycle the five medians
agree up to noise.

A second table shows where the time goes: SING with its softplus denominator,
its Lookahead or its gradient standardisation switched off, and the three
per-channel inner products ``<p, p>``, ``<p, m>``, ``<m, m>`` that the RT steps
(and AdamG) take on every conv kernel, timed alone. On XLA:CPU each reduction is
its own pass over the leaf at a third to a half of the speed of an elementwise pass
(sibling reductions are not fused), so those inner products alone cost about
as much as a whole SGD-momentum step, and SING's two reductions per leaf
(per-channel means, then the sum of squares of the centred gradient) and its
softplus (an ``exp`` and a ``log1p`` per element) are most of its cost beyond
AdamW's. On accelerators, where the step is bound by memory traffic, none of these
dominates (``bench_accelerator.py`` measures that).

    python experiments/bench_optimizers.py [--repeats 100] [--only sgdmrt adamsrt]
                                           [--no-breakdown] [--tree vit-b16]

``experiments/bench_accelerator.py`` times the same pairs on an accelerator.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sing_jax
from sing_jax import ChannelDims

if __package__:  # imported as experiments.bench_optimizers (python -m, tests)
    from . import timing, xla_cpu
else:  # run by path: this script's folder is first on sys.path
    import timing
    import xla_cpu


def random_leaf(shape, scale: float, seed: int) -> jax.Array:
    """A float32 array of normal values times ``scale``, made by NumPy: no compilation
    per leaf shape (which costs seconds per tree on XLA:CPU)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(scale))


def resnet18_cifar_params(num_classes: int = 10, width: int = 64) -> dict:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), Flax layout, BatchNorm scales/biases.

    ``width`` is the first stage's channel count (stages of ``width * (1, 2, 4, 8)``).
    """
    seeds = iter(range(64))
    params: dict = {}

    def conv(name, k, cin, cout):
        params[name] = {"kernel": random_leaf((k, k, cin, cout), 0.05, next(seeds))}

    def bn(name, c):
        params[name] = {"scale": jnp.asarray(np.ones(c, np.float32)),
                        "bias": jnp.asarray(np.zeros(c, np.float32))}

    conv("stem", 3, 3, width)
    bn("stem_bn", width)
    cin = width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            stride_block = block == 0 and stage > 0
            prefix = f"layer{stage + 1}_{block}"
            conv(f"{prefix}_conv1", 3, cin, cout)
            bn(f"{prefix}_bn1", cout)
            conv(f"{prefix}_conv2", 3, cout, cout)
            bn(f"{prefix}_bn2", cout)
            if stride_block:
                conv(f"{prefix}_shortcut", 1, cin, cout)
                bn(f"{prefix}_shortcut_bn", cout)
            cin = cout
    params["fc"] = {"kernel": random_leaf((8 * width, num_classes), 0.05, next(seeds)),
                    "bias": jnp.asarray(np.zeros(num_classes, np.float32))}
    return params


def vit_params(num_classes: int = 1000, image_size: int = 224, patch_size: int = 16,
               embed_dim: int = 768, depth: int = 12, num_heads: int = 12) -> dict:
    """The parameter tree of :class:`sing_jax.nn.models.ViT` as a plain dict (the
    defaults: ViT-B/16, 86.57M parameters for 1000 classes): norm scales one, biases
    zero, the other leaves normal times 0.02. Only the shapes come from the model, so
    nothing is compiled."""
    from flax import nnx

    from sing_jax.nn.models import ViT

    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ViT(
        num_classes, image_size=image_size, patch_size=patch_size, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, rngs=nnx.Rngs(0))), nnx.Param))
    seeds = iter(range(10**6))

    def leaf(path, shape):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.asarray((np.ones if name == "scale" else np.zeros)(shape.shape,
                                                                          shape.dtype))
        return random_leaf(shape.shape, 0.02, next(seeds))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def conv_channel_dims(params):
    """The seed 001 grouping: every conv kernel per output channel, the rest Euclidean."""
    return sing_jax.channel_dims_from_rules(params, [(r".*(conv\d|stem|shortcut)/kernel",
                                                      ChannelDims((-1,)))])


def kernel_channel_dims(params):
    """Every conv and dense kernel per output channel, the rest Euclidean (a ViT has no
    conv named like ResNet's, and the RT steps should do their per-channel work on it)."""
    return sing_jax.channel_dims_from_rules(params, [(r".*kernel$", ChannelDims((-1,)))])


def optimizer_pairs(channel_dims=conv_channel_dims):
    """``(name, ours, baseline name, baseline, target ratio on XLA:CPU or None)`` for
    each of our optimizers; the spherical ones group leaves by ``channel_dims``."""
    return [
        ("sing", sing_jax.sing(5e-3, weight_decay=5e-4), "optax.adamw",
         optax.adamw(5e-4, weight_decay=5e-3), 1.3),
        ("adams", sing_jax.adams(1e-3, channel_dims=channel_dims), "optax.adam",
         optax.adam(1e-3), 1.5),
        ("adamsrt", sing_jax.adamsrt(1e-3, channel_dims=channel_dims), "optax.adam",
         optax.adam(1e-3), 1.5),
        ("adamg", sing_jax.adamg(1e-3, channel_dims=channel_dims), "optax.adam",
         optax.adam(1e-3), None),
        ("sgdmrt", sing_jax.sgdmrt(0.1, momentum=0.9, channel_dims=channel_dims),
         "optax.sgd(momentum=0.9)", optax.sgd(0.1, momentum=0.9), 2.0),
    ]


# the trees ``--tree`` offers: (builder, the spherical optimizers' channel grouping)
TREES = {"resnet18": (resnet18_cifar_params, conv_channel_dims),
         "vit-b16": (vit_params, kernel_channel_dims)}


def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


# SING's Lookahead cycle (``lookahead_every=5``): the period of the per-step statistic.
LOOKAHEAD_CYCLE = 5


def interleaved_medians(runs: dict[str, tuple[Callable, Any]], repeats: int,
                        ) -> dict[str, float]:
    """Milliseconds per ``carry = fn(carry)`` for each ``(fn, carry)``, runs interleaved.

    ``repeats`` timed calls each, a multiple of :data:`LOOKAHEAD_CYCLE`; the time
    is the mean over the cycle's positions of each position's median
    (``timing.interleaved_medians`` with that period).
    """
    carries = {label: carry for label, (_, carry) in runs.items()}

    def advance(label, fn):
        carries[label] = jax.block_until_ready(fn(carries[label]))

    seconds = timing.interleaved_medians(
        {label: functools.partial(advance, label, fn) for label, (fn, _) in runs.items()},
        repeats, period=LOOKAHEAD_CYCLE)
    return {label: s * 1e3 for label, s in seconds.items()}


def optimizer_run(tx, params0, grads) -> tuple[Callable, Any]:
    """One donated update+apply step as ``(params, state) -> (params, state)``."""
    step = make_step(tx)
    params = jax.tree.map(jnp.copy, params0)
    return (lambda carry: step(*carry, grads)), (params, tx.init(params))


def rt_inner_products_run(params0, grads) -> tuple[Callable, Any]:
    """The three per-channel inner products the RT steps take on every conv kernel, alone.

    ``<p, p>``, ``<p, m>`` and ``<m, m>`` per output channel: the least reduction
    work a transport needs beyond the SGD-momentum step (see the module docstring).
    """
    kernels = [p for p in jax.tree.leaves(params0) if p.ndim == 4]
    moments = [g for g in jax.tree.leaves(grads) if g.ndim == 4]

    @jax.jit
    def inner_products(ps, ms):
        axes = (0, 1, 2)
        return [(jnp.sum(p * p, axes), jnp.sum(p * m, axes), jnp.sum(m * m, axes))
                for p, m in zip(ps, ms)]

    return (lambda carry: (*carry[:2], inner_products(*carry[:2]))), (kernels, moments, None)


def breakdown(params0, grads, repeats: int) -> None:
    """Where SING's and RT's time goes: ablations and the reductions alone, one run."""
    adamw, sgdm = "optax.adamw", "optax.sgd(momentum=0.9)"
    # label -> (optimizer or run, the row it is compared with)
    rows = {
        adamw: (optax.adamw(5e-4, weight_decay=5e-3), None),
        "sing": (sing_jax.sing(5e-3, weight_decay=5e-4), adamw),
        "sing, softplus_beta=None": (
            sing_jax.sing(5e-3, weight_decay=5e-4, softplus_beta=None), adamw),
        "sing, lookahead_every=None": (
            sing_jax.sing(5e-3, weight_decay=5e-4, lookahead_every=None), adamw),
        "sing, centralize=normalize=False": (
            sing_jax.sing(5e-3, weight_decay=5e-4, centralize=False, normalize=False), adamw),
        sgdm: (optax.sgd(0.1, momentum=0.9), None),
        "RT's 3 inner products alone": (rt_inner_products_run(params0, grads), sgdm),
    }
    runs = {label: optimizer_run(tx, params0, grads)
            if isinstance(tx, optax.GradientTransformation) else tx
            for label, (tx, _) in rows.items()}
    ms = interleaved_medians(runs, repeats)
    print("\nwhere the time goes (one run, interleaved):")
    for label, (_, base) in rows.items():
        relative = "" if base is None else f"{ms[label] / ms[base]:6.2f} x {base}"
        print(f"  {label:<34} {ms[label]:8.2f} ms  {relative}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100,
                        help=f"timed steps per optimizer, a multiple of {LOOKAHEAD_CYCLE}")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="optimizers to run (default: all): sing adams adamsrt adamg sgdmrt")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the table of where SING's and RT's time goes")
    parser.add_argument("--tree", choices=sorted(TREES), default="resnet18",
                        help="the parameter tree (default: resnet18, CIFAR variant)")
    args = parser.parse_args()
    build_tree, channel_dims = TREES[args.tree]
    pairs = optimizer_pairs(channel_dims)
    known = [pair[0] for pair in pairs]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown optimizer(s) {unknown}; choose from {known}")
    if args.repeats < 1 or args.repeats % LOOKAHEAD_CYCLE:
        parser.error(f"--repeats: {args.repeats} is not a positive multiple of "
                     f"{LOOKAHEAD_CYCLE} (one Lookahead cycle)")

    params0 = build_tree()
    n_params = sum(p.size for p in jax.tree.leaves(params0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-2,
                         params0)
    bandwidth = timing.copy_bandwidth()
    print(f"{args.tree} parameter tree: {n_params / 1e6:.2f}M parameters, "
          f"{len(jax.tree.leaves(params0))} leaves; devices: {jax.devices()[0].platform} x"
          f"{jax.device_count()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'optimizer':<10} {'baseline':<24} {'ours ms':>8} {'base ms':>8} "
              f"{'ratio':>6} {'floor ms':>8} {'target':>7}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, ours, base_name, base, target in pairs:
        if args.only and name not in args.only:
            continue
        ms = interleaved_medians({"ours": optimizer_run(ours, params0, grads),
                                  "base": optimizer_run(base, params0, grads)},
                                 args.repeats)
        ratio = ms["ours"] / ms["base"]
        floor_ms = timing.update_floor_bytes(
            params0, jax.eval_shape(ours.init, params0), LOOKAHEAD_CYCLE) / bandwidth * 1e3
        if target is not None:
            worst = max(worst, ratio / target)
        target_str = "-" if target is None else f"<={target}"
        print(f"{name:<10} {base_name:<24} {ms['ours']:8.2f} {ms['base']:8.2f} {ratio:6.2f} "
              f"{floor_ms:8.2f} {target_str:>7}")
    print(f"headline: worst ratio/target = {worst:.2f} (<= 1.00 meets every target)")
    if not args.no_breakdown:
        breakdown(params0, grads, args.repeats)


if __name__ == "__main__":
    xla_cpu.reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
