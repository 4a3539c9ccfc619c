"""Small models and data shared by the training tests (not a test module)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


class TinyConvNet(nnx.Module):
    """conv -> BatchNorm -> relu -> mean pool -> dense: small, but has BN statistics."""

    def __init__(self, num_classes: int = 3, channels: int = 4, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, channels, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(channels, rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))


class ConvBNNet(nnx.Module):
    """conv (no bias) -> BatchNorm -> relu -> mean pool -> dense head, on RGB images."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


class ResidualConvBlock(nnx.Module):
    """x + BatchNorm(conv(x)), then relu."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(x + self.bn(self.conv(x)))


class TinyResNet(nnx.Module):
    """stem conv -> BatchNorm -> relu, two residual ``block(channels, rngs)``, mean pool,
    dense head: the module paths (stem, stem_bn, blocks, head) the freezing and
    regulariser tests select by."""

    def __init__(self, block, channels: int = 4, classes: int = 3, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, channels, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(channels, rngs=rngs)
        self.blocks = nnx.List([block(channels, rngs) for _ in range(2)])
        self.head = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def tiny_batch(n: int = 16, seed: int = 0, size: int = 6, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.normal(size=(n, size, size, 1)).astype(np.float32) + labels[:, None, None, None]
    return {"image": images, "label": labels}
