"""Every optimizer trains a small NNX CNN with BatchNorm through ``nnx.Optimizer``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax import ChannelDims

STEPS = 300
LOSS_FACTOR = 10.0  # final training loss at least this many times below the initial one


class SmallCNN(nnx.Module):
    def __init__(self, rngs, classes=4):
        self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def synthetic_task(n=128, classes=4):
    """Labels from a fixed random teacher on local image features."""
    kx, kt = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (n, 8, 8, 3))
    teacher = jax.random.normal(kt, (3 * 4, classes))
    patches = x[:, ::4, ::4, :].reshape(n, -1)[:, :12]
    y = jnp.argmax(patches @ teacher, axis=-1)
    return x, y


def conv_spec(params):
    """ChannelDims((-1,)) for the conv kernels (each feeds a BatchNorm), None elsewhere."""
    return sing_jax.channel_dims_from_rules(params, [(r"conv\d/kernel", ChannelDims((-1,)))])


OPTIMIZERS = {
    "sing": lambda: sing_jax.sing(5e-3, weight_decay=5e-4),
    "adams": lambda: sing_jax.adams(1e-2, channel_dims=conv_spec),
    "adamsrt": lambda: sing_jax.adamsrt(1e-2, b2=0.99, channel_dims=conv_spec),
    "sgdmrt": lambda: sing_jax.sgdmrt(0.1, momentum=0.9, weight_decay=1e-4,
                                      channel_dims=conv_spec),
    "adamg": lambda: sing_jax.adamg(1e-2, channel_dims=conv_spec),
}


@functools.cache  # each optimizer trains once per session; tests only read the results
def train(name):
    model = SmallCNN(nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
    x, y = synthetic_task()

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    return model, optimizer, losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loss_goes_down(name):
    _, _, losses = train(name)
    assert np.all(np.isfinite(losses))
    assert losses[-1] * LOSS_FACTOR < losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", ["adamsrt", "sgdmrt"])
def test_rt_training_keeps_the_spherical_structure(name):
    model, optimizer, _ = train(name)
    x, _ = synthetic_task()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    apply = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(x))
    reference = apply(params)

    # The trained network computes the same function when each conv output channel
    # is rescaled by a random positive factor (train-mode BatchNorm follows it).
    key = jax.random.key(7)
    rescaled = dict(params)
    for conv in ("conv1", "conv2"):
        key, sub = jax.random.split(key)
        kernel = params[conv]["kernel"]
        factors = jnp.exp(jax.random.uniform(sub, kernel.shape[-1:], minval=-1.0, maxval=1.0))
        rescaled[conv] = {"kernel": kernel * factors}
    np.testing.assert_allclose(apply(rescaled), reference, rtol=2e-3, atol=2e-3)
    # That invariance is the architecture's (it holds for any weights), which is what
    # lets RT treat the conv kernels as spheres; the tolerance above is tight enough to
    # see a rescaling the model is not invariant to, the head's output channels.
    head = dict(rescaled, head=dict(params["head"], kernel=params["head"]["kernel"] * 1.5))
    assert np.max(np.abs(np.asarray(apply(head) - reference))) > 10 * 2e-3

    # And the transported momentum is tangent to each conv channel's sphere.
    opt_state = nnx.as_pure(optimizer.opt_state)
    inner = opt_state[1].inner_state
    moment = inner.mu if name == "adamsrt" else inner.momentum
    for conv in ("conv1", "conv2"):
        w, m = params[conv]["kernel"], moment[conv]["kernel"]
        dot = jnp.sum(w * m, axis=(0, 1, 2))
        cos = dot / jnp.sqrt(jnp.sum(w * w, axis=(0, 1, 2)) * jnp.sum(m * m, axis=(0, 1, 2)))
        assert float(jnp.max(jnp.abs(cos))) < 1e-3
