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


def jax_train_step(build_model, tx, batch: int, options=None):
    """The library's train step on one device for ``build_model(rngs=...)`` trained by
    ``tx``, and a seed-0 random batch of ``batch`` 32x32x3 images with 10 classes:
    ``(step, placed state, placed batch)``."""
    import jax
    import numpy as np
    from flax import nnx

    from sing_jax.train import (
        StepOptions,
        TrainState,
        data_mesh,
        make_train_step,
        set_batch_norm_axis,
    )

    def create_state():
        model = build_model(rngs=nnx.Rngs(0))
        set_batch_norm_axis(model)
        return TrainState.create(model, tx, rng=0)

    step = make_train_step(tx, mesh=data_mesh(jax.devices()[:1]),
                           options=options or StepOptions())
    # one compilation, not one per initialiser and leaf shape
    state = step.place_state(jax.jit(create_state)())
    rng = np.random.default_rng(0)
    placed = step.place_batch({
        "image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, batch).astype(np.int32)})
    return step, state, placed


def bench_jax(batch: int, steps: int, repeats: int) -> tuple[float, float]:
    import jax
    import optax

    from sing_jax.nn.models import resnet20

    step, state, batch_dev = jax_train_step(lambda rngs: resnet20(10, rngs=rngs),
                                            optax.sgd(0.1, momentum=0.9), batch)
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


def _torch_basic_block(cin, cout, stride, shortcut):
    """A PyTorch twin of ``sing_jax.nn.models.BasicBlock`` (``shortcut``: ``"pad"``, option
    A, or ``"projection"``, a 1x1 conv + BatchNorm)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin
            changes_shape = stride > 1 or cin != cout
            self.projection = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             nn.BatchNorm2d(cout))
                               if changes_shape and shortcut == "projection" else None)

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            out = self.b2(self.c2(out))
            if self.projection is not None:
                short = self.projection(x)
            else:
                short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
                if self.pad:
                    short = nn.functional.pad(short, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(out + short)

    return Block()


def _torch_resnet(widths, blocks_per_stage, shortcut, num_classes):
    from torch import nn

    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
              nn.ReLU()]
    cin = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks_per_stage):
            layers.append(_torch_basic_block(cin, width, 2 if (i > 0 and j == 0) else 1,
                                             shortcut))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def torch_resnet20(num_classes: int = 10):
    """PyTorch twin of ``sing_jax.nn.models.resnet20`` (option-A shortcuts, 0.27M parameters)."""
    return _torch_resnet((16, 32, 64), 3, "pad", num_classes)


def torch_resnet18(num_classes: int = 10, width: int = 64):
    """PyTorch twin of ``sing_jax.nn.models.resnet18`` (CIFAR stem, projection shortcuts;
    11.17M parameters at ``width=64``)."""
    return _torch_resnet((width, 2 * width, 4 * width, 8 * width), 2, "projection",
                         num_classes)


def torch_train_step(model, batch: int, *, device: str = "cpu", optimizer: str = "sgd",
                     channels_last: bool = False, autocast_dtype=None, image_size: int = 32):
    """One PyTorch training step of ``model`` on a fixed random batch, as a closure.

    ``model.train(); zero_grad; cross-entropy of model(x) (under ``torch.autocast`` with
    ``autocast_dtype``, float32 master weights); backward; opt.step()`` with
    ``optimizer`` ``"sgd"`` (lr 0.1, momentum 0.9) or ``"adamw"`` (fused on CUDA). On a
    CUDA ``device`` the closure only queues the work: synchronise before reading a clock.
    """
    import torch

    torch.manual_seed(0)
    device = torch.device(device)
    model = model.to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=5e-3,
                                fused=device.type == "cuda")
    else:
        raise ValueError(f"optimizer={optimizer!r}; expected 'sgd' or 'adamw'")
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return one


def bench_torch(batch: int, steps: int, repeats: int, channels_last: bool) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    one = torch_train_step(torch_resnet20(), batch, channels_last=channels_last)
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
