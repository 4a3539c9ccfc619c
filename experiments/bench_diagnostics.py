"""Cost of the recipes pieces in a jitted update: diagnostics, freezing, max-norm.

Times one jitted optimizer step (update + apply, params and state donated) on the
parameter shapes of a CIFAR ResNet-18 (~11M parameters), side by side in one
process, after warm-up, median of repeats:

  adam                       optax.adam
  adam+diagnostics           sing_jax.with_diagnostics(optax.adam, lr, channel_dims)
  adam+diag (no update)      the same without the update norm
  adam+max_norm              optax.chain(optax.adam, sing_jax.max_norm)
  adam frozen but head       sing_jax.head_only(optax.adam)  (state and work shrink)

Also prints the memory-traffic floor of adam (bytes read + written by the update,
over the measured copy bandwidth). The last line is the headline ratio:
diagnostics time / plain time.

    python experiments/bench_diagnostics.py [--repeats 20] [--width 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import sing_jax
from sing_jax import ChannelDims

if __package__:  # imported as experiments.bench_diagnostics (python -m, tests)
    from . import timing, xla_cpu
else:  # run by path: this script's folder is first on sys.path
    import timing
    import xla_cpu


def resnet18_shapes(width: int = 64, classes: int = 10) -> dict:
    shapes = {"stem": {"kernel": (3, 3, 3, width)}, "stem_bn": {"scale": (width,),
                                                                 "bias": (width,)}}
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        for block in range(2):
            name = f"layer{stage + 1}_{block}"
            first_in = cin if block == 0 else cout
            shapes[name] = {
                "conv1": {"kernel": (3, 3, first_in, cout)},
                "bn1": {"scale": (cout,), "bias": (cout,)},
                "conv2": {"kernel": (3, 3, cout, cout)},
                "bn2": {"scale": (cout,), "bias": (cout,)},
            }
            if block == 0 and first_in != cout:
                shapes[name]["shortcut"] = {"kernel": (1, 1, first_in, cout)}
                shapes[name]["shortcut_bn"] = {"scale": (cout,), "bias": (cout,)}
        cin = cout
    shapes["head"] = {"kernel": (cin, classes), "bias": (classes,)}
    return shapes


def make_tree(shapes, key):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([0.05 * jax.random.normal(k, s, jnp.float32)
                              for k, s in zip(keys, leaves)])


class Runner:
    """One jitted, donating step of ``tx``; ``run()`` takes one step and blocks."""

    def __init__(self, tx, params, grads):
        self.state = tx.init(params)
        self.grads = grads

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params = jax.tree.map(jnp.copy, params)
        for _ in range(3):
            self.run()
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))

    def run(self) -> None:
        self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    shapes = resnet18_shapes(args.width)
    params = make_tree(shapes, jax.random.key(0))
    grads = make_tree(shapes, jax.random.key(1))
    n = sum(x.size for x in jax.tree.leaves(params))
    spec = sing_jax.channel_dims_from_rules(
        params, [(r".*(conv\d|stem|shortcut)/kernel", ChannelDims((-1,)))])
    lr = 1e-3

    txs = {
        "adam": optax.adam(lr),
        "adam+diagnostics": sing_jax.with_diagnostics(optax.adam(lr), learning_rate=lr,
                                                      channel_dims=spec),
        "adam+diag (no update)": sing_jax.with_diagnostics(
            optax.adam(lr), learning_rate=lr, channel_dims=spec,
            metrics=("grad_norm", "param_norm", "effective_lr")),
        "adam+max_norm": optax.chain(optax.adam(lr), sing_jax.max_norm(3.0)),
        "adam frozen but head": sing_jax.head_only(optax.adam(lr)),
    }
    runners = {name: Runner(tx, params, grads) for name, tx in txs.items()}
    medians = timing.interleaved_medians({name: runner.run for name, runner in runners.items()},
                                          args.repeats, warmup_rounds=0)  # warmed up
    base = medians["adam"]
    diag = medians["adam+diagnostics"]
    rows = [(name, medians[name], runners[name].state_bytes) for name in txs]

    # adam reads g, m, v, p and writes m, v, p: 7 float32 per parameter.
    bandwidth = timing.copy_bandwidth(4 * n, args.repeats)
    floor = 7 * 4 * n / bandwidth
    print(f"device: {jax.devices()[0].device_kind}; params: {n / 1e6:.2f}M "
          f"({len(jax.tree.leaves(params))} leaves); copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"adam traffic floor {floor * 1e3:.2f} ms")
    print(f"{'transform':<24}{'median ms':>12}{'vs adam':>10}{'state MB':>10}")
    for name, seconds, state_bytes in rows:
        print(f"{name:<24}{seconds * 1e3:>12.2f}{seconds / base:>10.2f}"
              f"{state_bytes / 1e6:>10.1f}")
    print(f"headline: adam+diagnostics / adam = {diag / base:.2f}")


if __name__ == "__main__":
    xla_cpu.reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
