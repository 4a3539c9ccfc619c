"""Decay masks, L1, max-norm and per-leaf clipping, against NumPy re-derivations."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import sing_jax
from sing_jax import ChannelDims
from sing_jax._src.regularizers import named_leaves
from tests import _train_helpers as train_helpers


class Block(nnx.Module):
    def __init__(self, channels, rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


TinyResNet = functools.partial(train_helpers.TinyResNet, Block)


def resnet():
    return TinyResNet(rngs=nnx.Rngs(0))


def mask_by_path(mask_fn, params):
    flags = jax.tree.leaves(mask_fn(params))
    return {name: bool(f) for (name, _), f in zip(named_leaves(params), flags)}


KERNELS = {"stem/kernel", "blocks/0/conv1/kernel", "blocks/0/conv2/kernel",
           "blocks/1/conv1/kernel", "blocks/1/conv2/kernel", "head/kernel"}


# --- decay masks ------------------------------------------------------------------------


def test_decay_mask_on_a_resnet_decays_kernels_only():
    params = nnx.state(resnet(), nnx.Param)
    by_path = mask_by_path(sing_jax.decay_mask(), params)
    assert {p for p, f in by_path.items() if f} == KERNELS
    # Biases and BatchNorm scale/bias are the rest, none decayed.
    assert {p for p, f in by_path.items() if not f} == {
        "head/bias", "stem_bn/scale", "stem_bn/bias",
        *(f"blocks/{i}/bn{j}/{k}" for i in (0, 1) for j in (1, 2) for k in ("scale", "bias"))}
    # The same on the plain arrays the optimizer's update sees.
    plain = nnx.to_pure_dict(params)
    assert mask_by_path(sing_jax.decay_mask(), plain) == by_path


def test_decay_mask_include_and_exclude_patterns():
    params = nnx.state(resnet(), nnx.Param)
    mask = sing_jax.decay_mask(exclude=r"head/.*", include=r"stem_bn/scale")
    decayed = {p for p, f in mask_by_path(mask, params).items() if f}
    assert decayed == (KERNELS - {"head/kernel"}) | {"stem_bn/scale"}


def test_decay_mask_warns_about_a_pattern_matching_nothing():
    params = nnx.state(resnet(), nnx.Param)
    with pytest.warns(UserWarning, match=r"'.\*pos_embed' matches no parameter path"):
        sing_jax.decay_mask(exclude=r".*pos_embed")(params)


def test_add_weight_decay_skips_biases_and_norms():
    params = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)},
              "ln": {"scale": jnp.full((2,), 3.0)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(sing_jax.add_weight_decay(0.1), optax.sgd(0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * (1 + 0.1 * 2.0))
    np.testing.assert_allclose(updates["dense"]["bias"], -0.5)
    np.testing.assert_allclose(updates["ln"]["scale"], -0.5)


def test_decay_mask_in_optax_adamw_with_nnx_optimizer():
    model = resnet()
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-2, weight_decay=0.5, mask=sing_jax.decay_mask())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero_grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # With zero gradients only the decay moves: kernels shrink by (1 - lr*wd), the rest stay.
    for (name, b), (_, a) in zip(named_leaves(before), named_leaves(after)):
        if name in KERNELS:
            np.testing.assert_allclose(a, b * (1 - 1e-2 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


# --- L1 ---------------------------------------------------------------------------------


def test_add_l1_adds_sign_of_params_on_masked_leaves():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32).at[0, 0].set(0.0),
              "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx = sing_jax.add_l1(0.01)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["kernel"],
                               np.asarray(grads["kernel"]) + 0.01 * np.sign(params["kernel"]),
                               rtol=1e-6)
    assert float(out["kernel"][0, 0]) == float(grads["kernel"][0, 0])  # sign(0) = 0
    np.testing.assert_array_equal(out["bias"], grads["bias"])  # 1-D: not regularised
    tx_all = sing_jax.add_l1(0.01, mask=None)
    out_all, _ = tx_all.update(grads, tx_all.init(params), params)
    np.testing.assert_allclose(out_all["bias"],
                               np.asarray(grads["bias"]) + 0.01 * np.sign(params["bias"]),
                               rtol=1e-6)


def test_add_l1_accepts_a_schedule_and_drives_weights_to_zero():
    params = {"w": jnp.array([[0.3, -0.2], [0.05, 0.0]])}
    tx = optax.chain(sing_jax.add_l1(optax.linear_schedule(0.0, 1.0, 2)), optax.sgd(0.1))
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    u0, state = tx.update(zero, state, params)  # strength 0 at step 0
    np.testing.assert_array_equal(u0["w"], 0.0)
    u1, state = tx.update(zero, state, params)  # strength 0.5 at step 1
    np.testing.assert_allclose(u1["w"], -0.1 * 0.5 * np.sign(params["w"]))


# --- max-norm ---------------------------------------------------------------------------


def np_max_norm(w, r, reduce_axes):
    norm = np.sqrt(np.sum(w * w, axis=reduce_axes, keepdims=True))
    return np.where(norm > r, w * r / norm, w)


def test_max_norm_projects_long_neurons_and_leaves_short_ones_untouched():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(5, 4)).astype(np.float32)
    kernel[:, :2] *= 0.05  # neurons 0 and 1 are well inside the ball
    conv = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    params = {"dense": {"kernel": jnp.asarray(kernel), "bias": jnp.full((4,), 10.0)},
              "conv": {"kernel": jnp.asarray(conv)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx = optax.chain(optax.sgd(0.01), sing_jax.max_norm(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    plain = jax.tree.map(lambda p, g: np.asarray(p) - 0.01 * np.asarray(g), params, grads)
    # Every neuron's incoming weights (all axes but the last) end with norm <= r.
    for name, axes in (("dense", (0,)), ("conv", (0, 1, 2))):
        norms = np.sqrt(np.sum(np.asarray(new[name]["kernel"]) ** 2, axis=axes))
        assert np.all(norms <= 1.0 + 1e-6), norms
        np.testing.assert_allclose(new[name]["kernel"],
                                   np_max_norm(plain[name]["kernel"], 1.0, axes), rtol=1e-5)
    # Short neurons: the plain SGD step, bit for bit; the bias is not constrained.
    plain_step = optax.apply_updates(params, jax.tree.map(lambda g: -0.01 * g, grads))
    np.testing.assert_array_equal(new["dense"]["kernel"][:, :2],
                                  plain_step["dense"]["kernel"][:, :2])
    np.testing.assert_array_equal(new["dense"]["bias"], plain_step["dense"]["bias"])
    assert np.all(np.sqrt(np.sum(np.asarray(new["dense"]["kernel"][:, 2:]) ** 2, 0)) > 0.999)


def test_max_norm_with_pytorch_layout_and_under_nnx_optimizer():
    # PyTorch (out, in) weights: the neuron is axis 0, as in seed 003's apply_max_norm(dim=1).
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6)), jnp.float32) * 3
    params = {"weight": w}
    tx = sing_jax.max_norm(2.0, channel_dims=ChannelDims((0,)))
    updates, _ = tx.update({"weight": jnp.zeros_like(w)}, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["weight"])
    np.testing.assert_allclose(new, np_max_norm(np.asarray(w), 2.0, (1,)), rtol=1e-6)

    model = resnet()
    optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(5.0), sing_jax.max_norm(0.5)),
                              wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6, 6, 1)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    for name, leaf in named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        if name in KERNELS:
            axes = tuple(range(leaf.ndim - 1))
            assert np.all(np.sqrt(np.sum(np.asarray(leaf) ** 2, axis=axes)) <= 0.5 + 1e-6), name


def test_max_norm_runs_under_jit():
    params = {"k": jnp.ones((4, 2)) * 3.0}
    tx = sing_jax.max_norm(1.0)
    updates, _ = jax.jit(tx.update)({"k": jnp.zeros((4, 2))}, tx.init(params), params)
    np.testing.assert_allclose(params["k"] + updates["k"], 0.5, rtol=1e-6)


# --- clipping ---------------------------------------------------------------------------


def test_clip_by_leaf_norm_clips_each_leaf_separately():
    grads = {"a": jnp.full((4,), 3.0), "b": jnp.full((2, 2), 0.1)}
    tx = sing_jax.clip_by_leaf_norm(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(np.linalg.norm(out["a"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["a"], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], grads["b"])
    # optax's global version scales both by one factor instead.
    glob, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ratio = np.asarray(glob["b"]) / np.asarray(grads["b"])
    np.testing.assert_allclose(ratio, 1.0 / np.sqrt(36 + 0.04), rtol=1e-5)


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: sing_jax.add_weight_decay(-1e-4), r"weight_decay must be >= 0, got -0.0001"),
    (lambda: sing_jax.add_l1(-0.1), r"l1 must be >= 0, got -0.1"),
    (lambda: sing_jax.max_norm(0.0), r"max_value must be a number > 0, got 0.0"),
    (lambda: sing_jax.max_norm(-2), r"max_value must be a number > 0, got -2"),
    (lambda: sing_jax.clip_by_leaf_norm(-1.0), r"max_value must be a number > 0"),
    (lambda: sing_jax.decay_mask(min_ndim=-1), r"min_ndim must be an int >= 0"),
    (lambda: sing_jax.decay_mask(exclude="bias("), r"bad regex 'bias\('"),
])
def test_bad_arguments_raise_clear_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_max_norm_bad_spec_names_the_leaf():
    params = {"k": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match=r"k: ChannelDims axis 5 is out of range"):
        sing_jax.max_norm(1.0, channel_dims=ChannelDims((5,))).init(params)


def test_no_warning_when_patterns_match():
    params = nnx.state(resnet(), nnx.Param)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sing_jax.decay_mask(exclude=r"head/.*")(params)


def test_global_and_leaf_norm_clipping_do_not_change_sing_updates():
    # docs/recipes.md's claim: SING normalises each leaf, undoing any rescaling of a leaf.
    rng = np.random.default_rng(4)
    params = {"k": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    grads = jax.tree.map(lambda p: 50.0 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                         params)
    plain = sing_jax.sing(1e-2)
    ref, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    for clip in (optax.clip_by_global_norm(1.0), sing_jax.clip_by_leaf_norm(0.5)):
        tx = optax.chain(clip, sing_jax.sing(1e-2))
        out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), out, ref)
    # Clipping by value changes the direction, and so the update.
    tx = optax.chain(optax.clip(1.0), sing_jax.sing(1e-2))
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert not np.allclose(out["k"], ref["k"], rtol=1e-3)


def test_readme_chain_order():
    rng = np.random.default_rng(5)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                        "bias": jnp.zeros((4,))}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), sing_jax.add_l1(1e-5),
                     optax.adamw(0.5, weight_decay=1e-4, mask=sing_jax.decay_mask()),
                     sing_jax.max_norm(1.0))
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    norms = np.linalg.norm(np.asarray(params["dense"]["kernel"]), axis=0)
    assert np.all(norms <= 1.0 + 1e-6) and np.any(norms > 0.99)
    # Seed 004's recipe: the inner optimizer only steps every 8th call.
    steps_per_epoch = 10
    lr = sing_jax.schedules.damped_cosine(5e-3, total_epochs=300,
                                          steps_per_epoch=steps_per_epoch)
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(14.0),
                                      optax.lamb(lr, weight_decay=0.02,
                                                 mask=sing_jax.decay_mask())),
                          every_k_schedule=8)
    state, update = tx.init(params), jax.jit(tx.update)
    moved = []
    for _ in range(16):
        updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
        moved.append(bool(np.any(np.asarray(updates["dense"]["kernel"]) != 0)))
    assert moved == [False] * 7 + [True] + [False] * 7 + [True]


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       radius=st.floats(0.1, 5.0), scale=st.floats(0.01, 10.0), seed=st.integers(0, 1000))
def test_max_norm_property(shape, radius, scale, seed):
    rng = np.random.default_rng(seed)
    p = (scale * rng.normal(size=shape)).astype(np.float32)
    u = (scale * rng.normal(size=shape)).astype(np.float32)
    tx = sing_jax.max_norm(radius)
    out, _ = tx.update({"w": jnp.asarray(u)}, tx.init({"w": p}), {"w": jnp.asarray(p)})
    new = np.asarray(jnp.asarray(p) + out["w"])
    axes = tuple(range(len(shape) - 1))
    plain = np.asarray(jnp.asarray(p) + jnp.asarray(u))
    plain_norms = np.sqrt(np.sum(plain.astype(np.float64) ** 2, axis=axes))
    new_norms = np.sqrt(np.sum(new.astype(np.float64) ** 2, axis=axes))
    assert np.all(new_norms <= radius * (1 + 1e-5))
    # Channels clearly inside keep p + u bit for bit; clearly outside land on the sphere
    # (float32 rounding decides the ones within 1e-5 of r).
    inside = plain_norms <= radius * (1 - 1e-5)
    outside = plain_norms > radius * (1 + 1e-5)
    np.testing.assert_array_equal(new[..., inside], plain[..., inside])
    np.testing.assert_allclose(new_norms[outside], radius, rtol=1e-5)
