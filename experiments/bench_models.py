"""Forward+backward throughput of the benchmark models with different norms.

ResNet-20 (batch 128, 32x32) with BatchNorm vs LearnableScaler vs no norm, and a
ViT (patch 16, embed 192, depth 12, 3 heads, 224x224, batch 64) with LayerNorm vs
LearnableScaler, side by side in one process: jitted ``value_and_grad`` of the
cross-entropy (train mode, BatchNorm statistics updated), one warm-up call, then
the median of ``--repeats`` timed calls with ``block_until_ready``.

Seed 004 claims LearnableScaler is faster than LayerNorm/BatchNorm; the last line
prints the measured ratios, whatever they are.

    python experiments/bench_models.py            # the issue's sizes
    python experiments/bench_models.py --tiny     # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sing_jax.nn import models


def images_per_second(model: nnx.Module, batch: int, image: int, repeats: int,
                      dtype) -> tuple[float, float]:
    """(images/s, median seconds) of one jitted forward+backward pass."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, x, labels):
        # fresh Variables at the grad trace level: train mode writes batch statistics
        copy = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, rest))
        logits = copy(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()
        return loss, nnx.state(copy, nnx.Not(nnx.Param))

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    x = jax.random.normal(jax.random.key(0), (batch, image, image, 3), dtype)
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    jax.block_until_ready(step(params, rest, x, labels))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, rest, x, labels))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return batch / median, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-batch", type=int, default=128)
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--vit-image", type=int, default=224)
    parser.add_argument("--vit-depth", type=int, default=12)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tiny", action="store_true",
                        help="batch 8, ViT 32x32 depth 2: a smoke run")
    args = parser.parse_args()
    if args.tiny:
        args.resnet_batch, args.vit_batch, args.vit_image, args.vit_depth = 8, 8, 32, 2
        args.repeats = 2
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"dtype {args.dtype}, median of {args.repeats}")
    rows = []
    for norm in ("batch", "learnable_scaler", "none"):
        model = models.resnet20(10, norm=norm, dtype=dtype, rngs=nnx.Rngs(0))
        ips, sec = images_per_second(model, args.resnet_batch, 32, args.repeats, dtype)
        rows.append(("ResNet-20", norm, args.resnet_batch, sec, ips))
    for norm in ("layer", "learnable_scaler"):
        model = models.ViT(10, image_size=args.vit_image, patch_size=16, embed_dim=192,
                           depth=args.vit_depth, num_heads=3, norm=norm, dtype=dtype,
                           rngs=nnx.Rngs(0))
        ips, sec = images_per_second(model, args.vit_batch, args.vit_image, args.repeats,
                                     dtype)
        rows.append((f"ViT-16/192/{args.vit_depth}", norm, args.vit_batch, sec, ips))
    print(f"{'model':<16} {'norm':<17} {'batch':>5} {'s/step':>9} {'images/s':>10}")
    for name, norm, batch, sec, ips in rows:
        print(f"{name:<16} {norm:<17} {batch:>5} {sec:>9.4f} {ips:>10.1f}")
    speed = {(r[0].split("-")[0], r[1]): r[4] for r in rows}
    print(f"headline: LearnableScaler/BatchNorm ResNet-20 "
          f"{speed[('ResNet', 'learnable_scaler')] / speed[('ResNet', 'batch')]:.2f}x, "
          f"none/BatchNorm {speed[('ResNet', 'none')] / speed[('ResNet', 'batch')]:.2f}x, "
          f"LearnableScaler/LayerNorm ViT "
          f"{speed[('ViT', 'learnable_scaler')] / speed[('ViT', 'layer')]:.2f}x "
          "(images/s ratios, >1 means LearnableScaler is faster)")


if __name__ == "__main__":
    if __package__:  # python -m experiments.bench_models
        from experiments.xla_cpu import reuse_host_memory
    else:  # run by path: this script's folder is first on sys.path
        from xla_cpu import reuse_host_memory

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
