"""Freezing by regex / module type, bit-exactness, empty optimizer state, transfer learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax._src.regularizers import named_leaves
from tests import _train_helpers as train_helpers

# --- small models -----------------------------------------------------------------------


TinyResNet = functools.partial(train_helpers.TinyResNet, train_helpers.ResidualConvBlock)


class TransformerBlock(nnx.Module):
    def __init__(self, dim, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False,
                                           rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), 0.1))  # LayerScale

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.gamma[...] * self.mlp(self.ln2(x))


class TinyTransformer(nnx.Module):
    def __init__(self, dim=8, depth=3, classes=3, *, rngs):
        self.embed = nnx.Linear(4, dim, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(dim, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


def ce_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(ce_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def image_batch():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(8, 6, 6, 1)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, size=8)))


def token_batch():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.normal(size=(4, 5, 4)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, size=4)))


def snapshot(model):
    return dict(named_leaves(jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model,
                                                                            nnx.Param)))))


def changed_paths(before, after):
    return {n for n in before if not np.array_equal(before[n], after[n])}


def state_array_sizes(opt_state):
    return sum(np.size(x) for x in jax.tree.leaves(nnx.as_pure(opt_state)))


# --- masks --------------------------------------------------------------------------------


def test_freeze_by_module_type_under_nnx_optimizer_is_bit_exact_and_stateless():
    model = TinyResNet(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    frozen = sing_jax.frozen_by_module_type(model, nnx.BatchNorm)
    frozen_names = set(sing_jax.frozen_paths(frozen, params))
    assert frozen_names == {f"{m}/{k}" for m in ("stem_bn", "blocks/0/bn", "blocks/1/bn")
                            for k in ("scale", "bias")}
    optimizer = nnx.Optimizer(model, sing_jax.freeze(optax.adamw(1e-2), frozen), wrt=nnx.Param)
    before = snapshot(model)
    x, y = image_batch()
    for _ in range(3):
        train_step(model, optimizer, x, y)
    after = snapshot(model)
    assert changed_paths(before, after) == set(before) - frozen_names
    # Adam keeps mu and nu only for the trainable leaves (plus step counters).
    trainable_size = sum(np.size(v) for n, v in before.items() if n not in frozen_names)
    assert state_array_sizes(optimizer.opt_state) == 2 * trainable_size + 1


def test_freeze_on_plain_params_with_optax():
    model = TinyTransformer(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plain = nnx.to_pure_dict(params)
    frozen = sing_jax.frozen_by_regex([r"embed/.*", r"blocks/0/.*"])
    tx = sing_jax.freeze(optax.adam(1e-2), frozen)
    state = tx.init(plain)
    x, y = token_batch()

    @jax.jit
    def grad_fn(p):
        def loss(p):
            fresh = jax.tree.map(lambda v: v, params)  # new Variables to write into
            nnx.replace_by_pure_dict(fresh, p)
            return ce_loss(nnx.merge(graphdef, fresh, rest), x, y)
        return jax.grad(loss)(p)

    new, update = plain, jax.jit(tx.update)
    for _ in range(2):
        grads = grad_fn(new)
        updates, state = update(grads, state, new)
        new = optax.apply_updates(new, updates)
    before, after = dict(named_leaves(plain)), dict(named_leaves(new))
    frozen_names = {n for n in before if n.startswith(("embed/", "blocks/0/"))}
    assert frozen_names and changed_paths(before, after) == set(before) - frozen_names
    mu = state.inner_states["trainable"].inner_state[0].mu
    kept = [n for (n, _), leaf in zip(named_leaves(plain), jax.tree.leaves(
        mu, is_leaf=lambda v: isinstance(v, optax.MaskedNode)))
            if not isinstance(leaf, optax.MaskedNode)]
    assert set(kept) == set(before) - frozen_names


def test_a_mask_tree_built_on_the_nnx_state_works_under_nnx_optimizer():
    model = TinyResNet(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    frozen_tree = sing_jax.frozen_by_regex(r"stem.*")(params)  # an nnx.State of bools
    optimizer = nnx.Optimizer(model, sing_jax.freeze(optax.sgd(0.1), frozen_tree),
                              wrt=nnx.Param)
    before = snapshot(model)
    train_step(model, optimizer, *image_batch())
    assert changed_paths(before, snapshot(model)) == {
        n for n in before if not n.startswith("stem")}
    with pytest.raises(ValueError, match=r"no entry for parameter 'head/bias'"):
        sing_jax.freeze(optax.sgd(0.1), {"head": {"kernel": True}}).init(
            {"head": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}})


def test_freeze_all_but_the_head():
    model = TinyTransformer(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, sing_jax.head_only(optax.sgd(0.1)), wrt=nnx.Param)
    before = snapshot(model)
    train_step(model, optimizer, *token_batch())
    assert changed_paths(before, snapshot(model)) == {"head/kernel", "head/bias"}


def test_unfreeze_top_k_blocks():
    model = TinyTransformer(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    names = [n for n, _ in named_leaves(params)]
    for k, open_blocks in ((0, ()), (1, ("blocks/2/",)), (2, ("blocks/1/", "blocks/2/"))):
        frozen = set(sing_jax.frozen_paths(sing_jax.unfreeze_top_blocks(k), params))
        trainable = set(names) - frozen
        assert trainable == {n for n in names if n.startswith(("head/", *open_blocks))}, k
    optimizer = nnx.Optimizer(model, sing_jax.freeze(optax.adam(1e-2),
                                                     sing_jax.unfreeze_top_blocks(1)),
                              wrt=nnx.Param)
    before = snapshot(model)
    train_step(model, optimizer, *token_batch())
    assert changed_paths(before, snapshot(model)) == {
        n for n in names if n.startswith(("head/", "blocks/2/"))}


def test_layernorm_and_layerscale_affine_freeze_of_sing_advice():
    model = TinyTransformer(depth=2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    frozen = sing_jax.frozen_norm_affine(model, patterns=r"blocks/\d+/gamma")
    expect = {f"blocks/{i}/{ln}/{k}" for i in range(2) for ln in ("ln1", "ln2")
              for k in ("scale", "bias")}
    expect |= {f"blocks/{i}/gamma" for i in range(2)} | {"norm/scale", "norm/bias"}
    assert set(sing_jax.frozen_paths(frozen, params)) == expect
    # With one of this library's optimizers: SING keeps them frozen bit for bit.
    optimizer = nnx.Optimizer(model, sing_jax.freeze(sing_jax.sing(1e-2), frozen), wrt=nnx.Param)
    before = snapshot(model)
    for _ in range(2):
        train_step(model, optimizer, *token_batch())
    assert changed_paths(before, snapshot(model)) == set(before) - expect


def test_reuse_layers_copies_body_params_and_batch_stats():
    source = TinyResNet(classes=3, rngs=nnx.Rngs(0))
    source.stem_bn.mean[...] = jnp.arange(4.0)  # a running statistic to carry over
    target = TinyResNet(classes=5, rngs=nnx.Rngs(1))
    copied = sing_jax.reuse_layers(source, target, include=r"(stem|stem_bn|blocks)/.*")
    assert "stem_bn/mean" in copied and "blocks/1/conv/kernel" in copied
    assert not any(c.startswith("head/") for c in copied)
    np.testing.assert_array_equal(target.stem_bn.mean[...], jnp.arange(4.0))
    np.testing.assert_array_equal(target.blocks[0].conv.kernel[...],
                                  source.blocks[0].conv.kernel[...])
    fresh = TinyResNet(classes=5, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(target.head.kernel[...], fresh.head.kernel[...])
    with pytest.raises(ValueError, match=r"head/bias has shape \(3,\) in the source but "
                                         r"\(5,\) in the target"):
        sing_jax.reuse_layers(source, target, include=r".*")


# --- bad input --------------------------------------------------------------------------


def test_regex_matching_nothing_warns_with_the_pattern():
    params = nnx.state(TinyResNet(rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.warns(UserWarning, match=r"pattern 'encoder/.\*' matches no parameter path"):
        sing_jax.frozen_by_regex(r"encoder/.*")(params)
    with pytest.warns(UserWarning, match=r"no submodule of type LayerNorm"):
        sing_jax.frozen_by_module_type(TinyResNet(rngs=nnx.Rngs(0)), nnx.LayerNorm)


@pytest.mark.parametrize("make,match", [
    (lambda: sing_jax.unfreeze_top_blocks(-1), r"num_blocks must be an int >= 0, got -1"),
    (lambda: sing_jax.unfreeze_top_blocks(1, block_pattern=r"blocks/\d+/.*"),
     r"must capture the block index"),
    (lambda: sing_jax.frozen_by_regex(r"head/[.*"), r"bad regex 'head/\[\.\*'"),
])
def test_bad_arguments_raise_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- transfer learning on the digits ------------------------------------------------------


class DigitsMLP(nnx.Module):
    def __init__(self, classes, rngs):
        self.body1 = nnx.Linear(64, 64, rngs=rngs)
        self.body2 = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(nnx.relu(self.body2(nnx.relu(self.body1(x))))))


def accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(model(x), -1) == y))


def test_transfer_learning_learns_a_new_task_faster_than_from_scratch():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = jnp.asarray(x[perm] / 16.0, jnp.float32), jnp.asarray(y[perm])
    # Task A: the ten digits. Task B: odd vs even, from 30 labelled images only.
    xa, ya = x[:800], y[:800]
    xb_train, yb_train = x[800:830], y[800:830] % 2
    xb_test, yb_test = x[830:], y[830:] % 2

    model_a = DigitsMLP(10, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model_a, optax.adam(3e-3), wrt=nnx.Param)
    for _ in range(100):
        train_step(model_a, optimizer, xa, ya)
    assert accuracy(model_a, xa, ya) > 0.95

    steps = 10
    model_b = DigitsMLP(2, nnx.Rngs(1))
    copied = sing_jax.reuse_layers(model_a, model_b, include=r"(body1|body2|norm)/.*")
    assert len(copied) == 6
    body = snapshot(model_b)
    # Phase 1: the new head only.
    optimizer = nnx.Optimizer(model_b, sing_jax.head_only(optax.adam(3e-2)), wrt=nnx.Param)
    for _ in range(steps):
        train_step(model_b, optimizer, xb_train, yb_train)
    assert changed_paths(body, snapshot(model_b)) == {"head/kernel", "head/bias"}
    transfer_phase1 = accuracy(model_b, xb_test, yb_test)
    # Phase 2: everything, the reused body with a 30x lower learning rate.
    optimizer = nnx.Optimizer(
        model_b, sing_jax.finetune(optax.adam(3e-2), optax.adam(1e-3)), wrt=nnx.Param)
    for _ in range(steps):
        train_step(model_b, optimizer, xb_train, yb_train)
    assert changed_paths(body, snapshot(model_b)) == set(body)
    transfer_phase2 = accuracy(model_b, xb_test, yb_test)

    scratch = DigitsMLP(2, nnx.Rngs(1))
    optimizer = nnx.Optimizer(scratch, optax.adam(3e-2), wrt=nnx.Param)
    for _ in range(steps):
        train_step(scratch, optimizer, xb_train, yb_train)
    scratch_phase1 = accuracy(scratch, xb_test, yb_test)
    for _ in range(steps):
        train_step(scratch, optimizer, xb_train, yb_train)
    scratch_phase2 = accuracy(scratch, xb_test, yb_test)

    assert transfer_phase1 > 0.85, transfer_phase1
    assert transfer_phase1 > scratch_phase1 + 0.05, (transfer_phase1, scratch_phase1)
    assert transfer_phase2 > scratch_phase2, (transfer_phase2, scratch_phase2)
