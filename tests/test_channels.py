"""ChannelDims, spec resolution, rules, auto-detection, and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax import ChannelDims
from sing_jax._src.channels import resolve_channel_dims


def test_channel_dims_is_a_hashable_pytree_leaf():
    spec = {"a": ChannelDims((-1,)), "b": ChannelDims(()), "c": ChannelDims(0)}
    assert jax.tree.leaves(spec) == [ChannelDims((-1,)), ChannelDims(()), ChannelDims((0,))]
    assert ChannelDims((-1,)) == ChannelDims([-1])
    assert hash(ChannelDims(())) == hash(ChannelDims(()))
    assert ChannelDims().axes == (-1,)


def test_resolution_of_every_spec_form():
    params = {"k": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)}
    tree = resolve_channel_dims({"k": ChannelDims((-1,)), "b": None}, params)
    fn = resolve_channel_dims(sing_jax.output_channel_dims, params)
    single = resolve_channel_dims(ChannelDims(()), params)
    assert tree == fn
    assert [g.group_axes for g in tree] == [None, (0, 1, 2)]
    assert [g.group_size for g in tree] == [1, 18]
    assert [g.group_size for g in single] == [4, 72]
    assert [g.group_size for g in resolve_channel_dims(None, params)] == [1, 1]
    non_trailing = resolve_channel_dims({"k": ChannelDims((2,)), "b": None}, params)
    assert non_trailing[1].group_axes == (0, 1, 3)


def test_rules_first_match_wins_default_and_unmatched_warning():
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 4))}, "head": {"kernel": jnp.ones((4, 2)),
                                                                    "bias": jnp.ones(2)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = sing_jax.channel_dims_from_rules(params, [
            (r"conv.*/kernel", ChannelDims((-1,))),
            (r".*kernel", ChannelDims(())),
            (r"nothing/matches/this", ChannelDims(())),
        ])
    assert spec == {"conv1": {"kernel": ChannelDims((-1,))},
                    "head": {"kernel": ChannelDims(()), "bias": None}}
    assert any("nothing/matches/this" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="expected ChannelDims"):
        sing_jax.channel_dims_from_rules(params, [(r".*", (-1,))])
    with pytest.raises(ValueError, match="bad regex"):
        sing_jax.channel_dims_from_rules(params, [(r"(", None)])


# ---------------------------------------------------------------------------------
# Auto-detection on NNX models


class Block(nnx.Module):
    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.shortcut = nnx.data(None)
        if stride != 1 or cin != cout:
            self.shortcut = nnx.data(nnx.Conv(cin, cout, (1, 1), strides=stride,
                                              use_bias=False, rngs=rngs))
            self.bn_sc = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        sc = x if self.shortcut is None else self.bn_sc(self.shortcut(x))
        return nnx.relu(y + sc)


class TinyResNet(nnx.Module):
    def __init__(self, rngs, width=4, classes=3):
        self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.block1 = Block(width, width, 1, rngs)
        self.block2 = Block(width, 2 * width, 2, rngs)
        self.head = nnx.Linear(2 * width, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean(axis=(1, 2)))


class LayerNormMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.ln(self.fc1(x))))


def functional(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # plain arrays: merged afresh inside every trace
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), nnx.as_pure(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_detect_finds_exactly_the_conv_kernels_that_feed_a_batchnorm(dtype):
    model = TinyResNet(nnx.Rngs(0))
    model.train()  # batch statistics: the scale invariance holds
    apply_fn, params = functional(model)
    # bfloat16 rounding alone moves the outputs by more than the float32 tolerance;
    # the default tolerance follows the dtype.
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3), dtype)
    spec, report = sing_jax.detect_channel_dims(apply_fn, params, x)
    found = {path for path, s in zip(_paths(params), jax.tree.leaves(
        spec, is_leaf=lambda s: s is None or isinstance(s, ChannelDims))) if s is not None}
    kernels = {p for p in _paths(params) if p.endswith("kernel") and "head" not in p}
    assert found == kernels
    assert all(s in (None, ChannelDims((-1,))) for s in jax.tree.leaves(
        spec, is_leaf=lambda s: s is None or isinstance(s, ChannelDims)))
    assert "head/kernel: not scale invariant" in report
    # The detected spec plugs straight into the optimizers.
    tx = sing_jax.adamsrt(1e-3, channel_dims=spec)
    tx.init(params)


def test_detect_finds_the_layerwise_group_before_layernorm():
    model = LayerNormMLP(nnx.Rngs(0))
    apply_fn, params = functional(model)
    spec, report = sing_jax.detect_channel_dims(apply_fn, params, jnp.ones((4, 6)) +
                                                jax.random.normal(jax.random.key(2), (4, 6)))
    assert spec["fc1"]["kernel"] == ChannelDims(())
    assert spec["fc2"]["kernel"] is None
    assert "fc1/kernel: invariant as a whole" in report


def _paths(tree):
    from sing_jax._src.channels import leaf_paths
    return leaf_paths(tree)


# ---------------------------------------------------------------------------------
# nnx.Optimizer: init sees an nnx.State of Variables, update sees plain arrays


@pytest.mark.parametrize("make", [
    lambda spec: sing_jax.sing(1e-2, weight_decay=1e-3),
    lambda spec: sing_jax.adams(1e-2, channel_dims=spec),
    lambda spec: sing_jax.adamsrt(1e-2, channel_dims=spec),
    lambda spec: sing_jax.sgdmrt(0.05, momentum=0.9, channel_dims=spec),
    lambda spec: sing_jax.adamg(1e-2, channel_dims=spec),
])
def test_every_optimizer_works_inside_nnx_optimizer(make):
    model = LayerNormMLP(nnx.Rngs(0))
    spec = sing_jax.output_channel_dims  # a callable spec works on both tree kinds
    optimizer = nnx.Optimizer(model, make(spec), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (16, 6))
    y = jax.random.normal(jax.random.key(1), (16, 2))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------
# Bad input


def test_axis_out_of_range_names_the_leaf():
    params = {"layer": {"kernel": jnp.ones((4, 3))}}
    tx = sing_jax.adams(channel_dims={"layer": {"kernel": ChannelDims((2,))}})
    with pytest.raises(ValueError, match=r"layer/kernel: ChannelDims axis 2 is out of range.*"
                                         r"ndim=2.*-2\.\.1"):
        tx.init(params)


def test_spec_on_a_scalar_leaf_is_refused():
    with pytest.raises(ValueError, match=r"temperature: .*0-d leaf"):
        sing_jax.adamsrt(channel_dims={"temperature": ChannelDims(())}).init(
            {"temperature": jnp.ones(())})


def test_spec_tree_that_does_not_match_the_params():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"spec has 1 leaves but the params have 2.*\['b'\]"):
        sing_jax.adams(channel_dims={"a": ChannelDims()}).init(params)
    with pytest.raises(ValueError, match=r"does not match the params: found spec entry 'c'"):
        sing_jax.sgdmrt(channel_dims={"a": None, "c": None}).init(params)
    with pytest.raises(ValueError, match=r"spec leaf at a/0 is -1; .*wrap a tuple"):
        sing_jax.adamg(channel_dims={"a": (-1,), "b": None}).init(params)
    with pytest.raises(ValueError, match="repeats an axis"):
        sing_jax.adams(channel_dims={"a": ChannelDims((0, -2)), "b": None}).init(params)


@pytest.mark.parametrize("call, message", [
    (lambda: sing_jax.sing(-1e-3), r"sing: learning_rate=-0.001 .* >= 0"),
    (lambda: sing_jax.sing(1e-3, b1=1.0), r"sing: b1=1.0 is outside \[0, 1\)"),
    (lambda: sing_jax.sing(1e-3, b2=-0.1), r"sing: b2=-0.1 is outside \[0, 1\)"),
    (lambda: sing_jax.sing(1e-3, lookahead_alpha=1.5),
     r"sing: lookahead_alpha=1.5 is outside \[0, 1\]"),
    (lambda: sing_jax.sing(1e-3, lookahead_every=0), r"lookahead_every=0 .* integer >= 1"),
    (lambda: sing_jax.sing(1e-3, weight_decay=-1.0), r"weight_decay=-1.0"),
    (lambda: sing_jax.adams(-1.0), r"adams: learning_rate=-1.0"),
    (lambda: sing_jax.adamsrt(1e-3, b1=1.2), r"adamsrt: b1=1.2"),
    (lambda: sing_jax.sgdmrt(-0.1), r"sgdmrt: learning_rate=-0.1"),
    (lambda: sing_jax.sgdmrt(0.1, momentum=1.5), r"momentum=1.5 is outside \[0, 1\]"),
    (lambda: sing_jax.adamg(1e-3, b2=1.0), r"adamg: b2=1.0"),
    (lambda: sing_jax.adams(optax.linear_schedule(-1.0, 1.0, 10)),
     r"adams: learning_rate=-1.0"),
    (lambda: sing_jax.lookahead(3, alpha=-0.5), r"lookahead: alpha=-0.5"),
    # A string (e.g. a config value read as text) is named, not converted or passed on.
    (lambda: sing_jax.sing("1e-3"), r"sing: learning_rate='1e-3' is a string"),
    (lambda: sing_jax.sgdmrt(0.1, momentum="0.9"), r"momentum='0.9' is a string"),
])
def test_bad_hyperparameters(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_transforms_that_own_the_learning_rate_need_params():
    params = {"w": jnp.ones((2, 3))}
    for tx in [sing_jax.adamsrt(), sing_jax.sgdmrt(), sing_jax.adamg(), sing_jax.sing(1e-3)]:
        state = tx.init(params)
        with pytest.raises(ValueError, match="params"):
            tx.update(params, state)


@pytest.mark.parametrize("axes", [(0.9,), 1.0, True, (True,), "ab", None])
def test_channel_dims_refuses_axes_that_are_not_ints(axes):
    # int() would truncate 0.9 to axis 0 and True to axis 1: a typo must not pick an axis.
    with pytest.raises(TypeError, match="ChannelDims"):
        ChannelDims(axes)


def test_rules_see_namedtuple_and_dataclass_field_names():
    from typing import NamedTuple

    from flax import struct

    class Layer(NamedTuple):
        kernel: jax.Array
        bias: jax.Array

    @struct.dataclass
    class Net:
        conv: Layer
        head: Layer

    params = Net(conv=Layer(jnp.ones((3, 3, 2, 4)), jnp.zeros(4)),
                 head=Layer(jnp.ones((4, 3)), jnp.zeros(3)))
    from sing_jax._src.channels import leaf_paths
    assert leaf_paths(params) == ["conv/kernel", "conv/bias", "head/kernel", "head/bias"]
    spec = sing_jax.channel_dims_from_rules(params, [(r"conv/kernel", ChannelDims((-1,)))])
    assert jax.tree.leaves(spec, is_leaf=lambda x: x is None) == [
        ChannelDims((-1,)), None, None, None]
    # ...while a Flax Variable's trailing ``.value`` is still left out of the path.
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    assert sorted(leaf_paths(state)) == ["bias", "kernel"]


def test_callable_specs_under_inject_hyperparams_fail_loudly_and_static_args_work():
    params = {"conv": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.ones_like(p) + p, params)
    # inject_hyperparams calls every callable keyword with the step count; without the
    # check this silently made every leaf Euclidean.
    with pytest.raises(ValueError, match=r"output_channel_dims .*step count.*static_args"):
        optax.inject_hyperparams(sing_jax.adamsrt)(
            learning_rate=1e-2, channel_dims=sing_jax.output_channel_dims).init(params)
    with pytest.raises(ValueError, match=r"matrix_mask .*inject_hyperparams"):
        optax.inject_hyperparams(sing_jax.sing)(
            learning_rate=1e-2, weight_decay_mask=sing_jax.matrix_mask).init(params)
    injected = optax.inject_hyperparams(sing_jax.adamsrt, static_args=("channel_dims",))(
        learning_rate=1e-2, channel_dims=sing_jax.output_channel_dims)
    plain = sing_jax.adamsrt(1e-2, channel_dims=sing_jax.output_channel_dims)
    got, _ = injected.update(grads, injected.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # Injected hyper-parameters are float32 arrays: eps=1e-8 rounds slightly.
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-8)


def test_softplus_beta_must_be_positive():
    with pytest.raises(ValueError, match=r"sing: softplus_beta=0.0 .* > 0"):
        sing_jax.sing(1e-3, softplus_beta=0.0)
    with pytest.raises(ValueError, match=r"softplus_beta=-1.0"):
        sing_jax.scale_by_softplus_adam(softplus_beta=-1.0)


@pytest.mark.parametrize("make", [sing_jax.adams, sing_jax.adamsrt, sing_jax.sgdmrt,
                                  sing_jax.adamg])
def test_a_full_model_spec_works_inside_masked_and_partition(make):
    params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 5))},
              "bias": jnp.zeros(5), "head": jnp.ones((5, 2))}
    spec = {"conv": {"kernel": ChannelDims((-1,))}, "bias": None, "head": None}
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
    full = make(channel_dims=spec)
    want, _ = full.update(grads, full.init(params), params)
    labels = {"conv": {"kernel": "sphere"}, "bias": "other", "head": "other"}
    for tx in [optax.masked(make(channel_dims=spec), jax.tree.map(lambda s: s == "sphere",
                                                                  labels)),
               optax.partition({"sphere": make(channel_dims=spec),
                                "other": optax.adam(1e-3)}, labels)]:
        got, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(got["conv"]["kernel"], want["conv"]["kernel"], rtol=1e-6)
    # A spec that does not cover the masked params' paths is still an error naming them.
    with pytest.raises(ValueError, match=r"Params without a spec: \['conv/kernel'\]"):
        optax.masked(make(channel_dims={"bias": None, "head": None}),
                     {"conv": {"kernel": True}, "bias": False, "head": False}).init(params)
