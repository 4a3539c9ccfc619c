"""Images/s of a full ResNet-20 training step: our loop vs the same model and loop in PyTorch.

    python -m experiments.bench_train [--steps 20] [--repeats 3] [--batch 128]

Both sides: CIFAR ResNet-20 (BatchNorm, option-A zero-padded shortcuts), batch of
random 32x32x3 images, softmax cross-entropy, SGD with momentum 0.9 (lr 0.1), one
process, every CPU thread. Ours is ``sing_jax.train.make_train_step`` (jit over
shard_map on one device, donated state, BatchNorm statistics updated); PyTorch's is
``model.train(); loss.backward(); opt.step()`` in channels-last and default layouts
(the faster is reported). Median over repeats of ``steps`` steps after warm-up; the
first JAX step's compile time is reported separately. The last line is the headline
ratio (ours / PyTorch; above 1 means faster).

Run as a script, it gives XLA:CPU (jaxlib 0.10) the same setting as ``bench_singd.py``:
YNNPACK matrix products one at a time, Eigen convolutions
(``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce``), unless
``XLA_FLAGS`` already names the flag; see docs/xla_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

if __package__:  # python -m experiments.bench_train, tests
    from . import xla_cpu
else:  # run by path: this script's folder is first on sys.path
    import xla_cpu
if __name__ == "__main__":
    xla_cpu.set_cpu_flag()  # before jax is imported (see experiments/xla_cpu.py)


def bench_jax(batch: int, steps: int, repeats: int) -> tuple[float, float]:
    import jax
    import numpy as np
    import optax

    from sing_jax.nn.models import resnet20
    from sing_jax.train import TrainState, data_mesh, make_train_step, set_batch_norm_axis

    model = resnet20(10, rngs=__import__("flax").nnx.Rngs(0))
    set_batch_norm_axis(model)
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(model, tx, rng=0)
    step = make_train_step(tx, mesh=data_mesh(jax.devices()[:1]))
    state = step.place_state(state)
    rng = np.random.default_rng(0)
    batch_np = {"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
                "label": rng.integers(0, 10, batch).astype(np.int32)}
    batch_dev = step.place_batch(batch_np)
    t0 = time.perf_counter()
    state, metrics = step(state, batch_dev)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = step(state, batch_dev)
    jax.block_until_ready(metrics)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch_dev)
        jax.block_until_ready((state.params, metrics))
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates), compile_s


def _torch_resnet20():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            out = self.b2(self.c2(out))
            short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.pad:
                short = nn.functional.pad(short, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(out + short)

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for i, width in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(Block(cin, width, 2 if (i > 0 and j == 0) else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def bench_torch(batch: int, steps: int, repeats: int, channels_last: bool) -> float:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_resnet20()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        one()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = one()
        loss.item()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import jax

    jax_rate, compile_s = bench_jax(args.batch, args.steps, args.repeats)
    torch_default = bench_torch(args.batch, args.steps, args.repeats, channels_last=False)
    torch_cl = bench_torch(args.batch, args.steps, args.repeats, channels_last=True)
    torch_rate = max(torch_default, torch_cl)
    device = jax.devices()[0].device_kind
    print(f"ResNet-20 train step, batch {args.batch}, 32x32, SGD momentum "
          f"({device}, {os.cpu_count()} CPU threads; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    print(f"{'implementation':<34} {'images/s':>10}")
    print(f"{'sing_jax.train (jit+shard_map)':<34} {jax_rate:>10.1f}")
    print(f"{'PyTorch (NCHW)':<34} {torch_default:>10.1f}")
    print(f"{'PyTorch (channels_last)':<34} {torch_cl:>10.1f}")
    print(f"first JAX step (compile + run): {compile_s:.1f} s")
    ratio = jax_rate / torch_rate
    print(f"ours / PyTorch images/s: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    xla_cpu.reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
