"""Train a small CNN on the embedded digits data with SINGD, SGD and AdamW.

    python experiments/singd_example.py [--steps 150]

The data is the package's embedded ``digits`` dataset (scikit-learn's bundled 8x8
handwritten digits, built into TFDS offline on first use), so nothing is
downloaded. Prints the training loss of the three optimizers side by side and the
test accuracy at the end.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sing_jax
import sing_jax.data


class SmallCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)  # trained by SINGD's `other` (AdamW)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h)).mean(axis=(1, 2))
        return self.head(self.norm(h))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def digits_batches(batch: int, seed: int = 0):
    """An endless stream of ``(images, labels)`` train batches of the embedded digits."""
    ds = sing_jax.data.make_dataset("digits", batch, seed=seed, num_local_devices=1)
    for b in ds.train:
        yield b["image"][0], b["label"][0]  # drop the (single) device axis


def digits_test_set():
    ds = sing_jax.data.make_dataset("digits", 64, num_local_devices=1)
    images, labels = [], []
    for b in ds.test:  # padded to whole batches: keep the real examples
        mask = b["mask"][0]
        images.append(b["image"][0][mask])
        labels.append(b["label"][0][mask])
    return np.concatenate(images), np.concatenate(labels)


def train(name: str, tx: optax.GradientTransformation, steps: int, batch: int):
    model = SmallCNN(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    use_singd = name == "singd"

    @jax.jit
    def step(params, opt_state, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)
        if use_singd:
            (loss, grads), stats = sing_jax.singd_value_and_grad(loss_fn, m, x, y,
                                                                 opt_state=opt_state)
            updates, opt_state = tx.update(grads, opt_state, params, singd_stats=stats)
        else:
            loss, grads = jax.value_and_grad(
                lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True), x, y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    # The same seed for every optimizer: they see the same batches in the same order.
    for _, (x, y) in zip(range(steps), digits_batches(batch)):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    if use_singd:
        print(sing_jax.singd_report(opt_state))
    return nnx.merge(graphdef, params, rest), losses


def example_optimizers() -> dict[str, optax.GradientTransformation]:
    """The three optimizers compared. SINGD's factors take small steps (lr_cov=0.01) and
    are refreshed every 5 steps: with lr_cov=0.05 this small CNN diverges."""
    return {
        "singd": sing_jax.singd(0.05, momentum=0.9, T=5, lr_cov=0.01, damping=1e-3,
                                structures=("dense", "dense"), other=optax.adamw(3e-3)),
        "sgd": optax.sgd(0.05, momentum=0.9),
        "adamw": optax.adamw(3e-3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    x_test, y_test = digits_test_set()
    optimizers = example_optimizers()
    curves, accuracy = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, tx in optimizers.items():
            model, curves[name] = train(name, tx, args.steps, args.batch)
            accuracy[name] = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
    print(f"{'step':>5} " + " ".join(f"{n:>8}" for n in optimizers))
    for t in range(0, args.steps, max(1, args.steps // 10)):
        window = slice(max(0, t - 4), t + 1)  # mean of the last few steps
        print(f"{t:>5} " + " ".join(f"{np.mean(curves[n][window]):>8.3f}" for n in optimizers))
    print("test accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in accuracy.items()))


if __name__ == "__main__":
    from experiments.xla_cpu import reuse_host_memory

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
