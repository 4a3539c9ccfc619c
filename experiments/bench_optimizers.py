"""Update+apply time of each sing_jax optimizer against its optax baseline, side by side.

On the parameter tree of ResNet-18 (CIFAR variant, 11.17M parameters, Flax
layout), the jitted ``update`` + ``apply_updates`` step with donated params and
state is timed for ours and the baseline in the same process, interleaved
repeat by repeat so that machine noise hits both alike; the median is reported
with the memory-traffic floor (bytes the step must read and write divided by
the measured copy bandwidth).

    python experiments/bench_optimizers.py [--repeats 20] [--only sgdmrt adamsrt]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sing_jax
from sing_jax import ChannelDims


def resnet18_cifar_params(num_classes: int = 10) -> dict:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), Flax layout, BatchNorm scales/biases."""
    key = iter(jax.random.split(jax.random.key(0), 64))
    params: dict = {}

    def conv(name, k, cin, cout):
        params[name] = {"kernel": jax.random.normal(next(key), (k, k, cin, cout)) * 0.05}

    def bn(name, c):
        params[name] = {"scale": jnp.ones(c), "bias": jnp.zeros(c)}

    conv("stem", 3, 3, 64)
    bn("stem_bn", 64)
    cin = 64
    for stage, cout in enumerate([64, 128, 256, 512]):
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
    params["fc"] = {"kernel": jax.random.normal(next(key), (512, num_classes)) * 0.05,
                    "bias": jnp.zeros(num_classes)}
    return params


def conv_channel_dims(params):
    """The seed 001 grouping: every conv kernel per output channel, the rest Euclidean."""
    return sing_jax.channel_dims_from_rules(params, [(r".*(conv\d|stem|shortcut)/kernel",
                                                      ChannelDims((-1,)))])


# (name, ours, baseline name, baseline, tensors read+written per element, target ratio)
def optimizer_pairs():
    return [
        ("sing", sing_jax.sing(5e-3, weight_decay=5e-4), "optax.adamw",
         optax.adamw(5e-4, weight_decay=5e-3), 9, 1.3),
        ("adams", sing_jax.adams(1e-3, channel_dims=conv_channel_dims), "optax.adam",
         optax.adam(1e-3), 5, 1.5),
        ("adamsrt", sing_jax.adamsrt(1e-3, channel_dims=conv_channel_dims), "optax.adam",
         optax.adam(1e-3), 5, 1.5),
        ("adamg", sing_jax.adamg(1e-3, channel_dims=conv_channel_dims), "optax.adam",
         optax.adam(1e-3), 5, None),
        ("sgdmrt", sing_jax.sgdmrt(0.1, momentum=0.9, channel_dims=conv_channel_dims),
         "optax.sgd(momentum=0.9)", optax.sgd(0.1, momentum=0.9), 5, 2.0),
    ]


def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def copy_bandwidth(num_bytes: int = 256 * 2 ** 20, repeats: int = 10) -> float:
    """Bytes per second of a jitted read+write of a large float32 array."""
    x = jnp.ones(num_bytes // 4, jnp.float32)
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * num_bytes / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="optimizers to run (default: all): sing adams adamsrt adamg sgdmrt")
    args = parser.parse_args()
    pairs = optimizer_pairs()
    known = [pair[0] for pair in pairs]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown optimizer(s) {unknown}; choose from {known}")

    params0 = resnet18_cifar_params()
    n_params = sum(p.size for p in jax.tree.leaves(params0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-2,
                         params0)
    bandwidth = copy_bandwidth()
    print(f"ResNet-18 (CIFAR) parameter tree: {n_params / 1e6:.2f}M parameters, "
          f"{len(jax.tree.leaves(params0))} leaves; devices: {jax.devices()[0].platform} x"
          f"{jax.device_count()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'optimizer':<10} {'baseline':<24} {'ours ms':>8} {'base ms':>8} "
              f"{'ratio':>6} {'floor ms':>8} {'target':>7}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, ours, base_name, base, tensors, target in pairs:
        if args.only and name not in args.only:
            continue
        runs = {}
        for label, tx in (("ours", ours), ("base", base)):
            params = jax.tree.map(jnp.copy, params0)
            state = tx.init(params)
            step = make_step(tx)
            params, state = step(params, state, grads)  # compile + warm-up
            jax.block_until_ready(params)
            runs[label] = [step, params, state, []]
        for _ in range(args.repeats):
            for run in runs.values():  # interleaved: noise hits both alike
                step, params, state, times = run
                t0 = time.perf_counter()
                params, state = step(params, state, grads)
                jax.block_until_ready((params, state))
                times.append(time.perf_counter() - t0)
                run[1], run[2] = params, state
        ours_ms = statistics.median(runs["ours"][3]) * 1e3
        base_ms = statistics.median(runs["base"][3]) * 1e3
        ratio = ours_ms / base_ms
        floor_ms = tensors * 4 * n_params / bandwidth * 1e3
        if target is not None:
            worst = max(worst, ratio / target)
        target_str = "-" if target is None else f"<={target}"
        print(f"{name:<10} {base_name:<24} {ours_ms:8.2f} {base_ms:8.2f} {ratio:6.2f} "
              f"{floor_ms:8.2f} {target_str:>7}")
    print(f"headline: worst ratio/target = {worst:.2f} (<= 1.00 meets every target)")


if __name__ == "__main__":
    main()
