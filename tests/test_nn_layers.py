"""sing_jax.nn: LearnableScaler, the norm factory, replace_norms, BN folding, MC dropout,
initialisation by activation and the extra activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sing_jax import nn as snn
from sing_jax._src.channels import leaf_paths
from sing_jax.nn.models import MLP, CifarResNet, ViT, resnet20


def _fast_rngs(seed: int = 0) -> nnx.Rngs:
    # RBG keys compile far faster than threefry for each new parameter shape; these
    # tests need parameters, not particular random statistics
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


# ------------------------------------------------------------------ LearnableScaler
@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 4, 4, 6)], ids=["tokens", "images"])
def test_learnable_scaler_is_a_x_plus_b(shape):
    scaler = snn.LearnableScaler(6, rngs=nnx.Rngs(0))
    scaler.bias[...] = jnp.arange(6.0) - 2.0
    x = jax.random.normal(jax.random.key(1), shape)
    expected = np.asarray(x) * np.asarray(scaler.scale[...]) + (np.arange(6.0) - 2.0)
    np.testing.assert_allclose(scaler(x), expected, rtol=1e-6, atol=1e-6)
    scaler.eval()  # no statistics: identical in both modes
    np.testing.assert_allclose(scaler(x), expected, rtol=1e-6, atol=1e-6)


def test_learnable_scaler_inits():
    reference = snn.LearnableScaler(4096, rngs=nnx.Rngs(0))
    a = np.asarray(reference.scale[...])
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1.0) < 0.05  # a ~ Normal(0, 1)
    np.testing.assert_array_equal(reference.bias[...], 0.0)
    ones = snn.LearnableScaler(8, scale_init="ones", rngs=nnx.Rngs(0))
    x = jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_array_equal(ones(x), x)
    with pytest.raises(ValueError, match="scale_init='unit'"):
        snn.LearnableScaler(8, scale_init="unit", rngs=nnx.Rngs(0))


def test_learnable_scaler_bf16_and_bad_channels():
    scaler = snn.LearnableScaler(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = scaler(jnp.ones((2, 3, 4), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.broadcast_to(np.asarray(scaler.scale[...]), (2, 3, 4)),
                               rtol=1e-2)
    with pytest.raises(ValueError, match="num_features=4"):
        scaler(jnp.ones((2, 3, 5)))


# ------------------------------------------------------------------ norm factory
@pytest.mark.parametrize("name", snn.NORM_NAMES)
def test_make_norm_builds_each_type(name):
    norm = snn.make_norm(name, 8, rngs=nnx.Rngs(0))
    assert type(norm) is snn.NORM_TYPES[name]
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8)) * 3.0 + 1.0
    y = norm(x)
    assert y.shape == x.shape
    if name == "layer":
        np.testing.assert_allclose(np.asarray(y).mean(-1), 0.0, atol=1e-5)
    if name == "rms":
        np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, -1)), 1.0, atol=1e-3)
    if name == "none":
        np.testing.assert_array_equal(y, x)


def test_make_norm_bad_input():
    with pytest.raises(ValueError, match=r"norm='batchnorm'.*allowed values.*'batch'"):
        snn.make_norm("batchnorm", 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups=3 does not divide num_features=8"):
        snn.make_norm("group", 8, num_groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm='bn'"):
        resnet20(norm="bn", rngs=nnx.Rngs(0))


def test_batch_norm_train_eval_and_running_stats():
    bn = snn.make_norm("batch", 3, rngs=nnx.Rngs(0), momentum=0.9)
    x = jax.random.normal(jax.random.key(0), (16, 2, 2, 3)) * 2.0 + 5.0
    xs = np.asarray(x).reshape(-1, 3)
    y = np.asarray(bn(x)).reshape(-1, 3)  # train mode: batch statistics
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-3)
    np.testing.assert_allclose(bn.mean[...], 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * xs.var(0), rtol=1e-4)
    bn.eval()  # running averages, no update
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    y_eval = np.asarray(bn(x)).reshape(-1, 3)
    np.testing.assert_allclose(y_eval, (xs - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], mean)


def test_batch_norm_unbiased_running_var_is_pytorchs():
    torch = pytest.importorskip("torch")
    ours = snn.make_norm("batch", 3, rngs=nnx.Rngs(0), unbiased_running_var=True)
    theirs = torch.nn.BatchNorm2d(3)  # momentum 0.1 = Flax's 0.9
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = (rng.normal(size=(5, 4, 4, 3)) * 2.0 + 1.0).astype(np.float32)
        y = ours(jnp.asarray(x))
        y_torch = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
        np.testing.assert_allclose(y, y_torch.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), rtol=1e-5)
    flax_like = snn.make_norm("batch", 3, rngs=nnx.Rngs(0))  # biased: var * (n-1)/n
    flax_like(jnp.asarray(x))
    n = 5 * 4 * 4
    fresh = snn.make_norm("batch", 3, rngs=nnx.Rngs(0), unbiased_running_var=True)
    fresh(jnp.asarray(x))
    np.testing.assert_allclose((np.asarray(fresh.var[...]) - 0.9) * (n - 1) / n,
                               np.asarray(flax_like.var[...]) - 0.9, rtol=1e-4)
    with pytest.raises(ValueError, match="unbiased_running_var=True is a BatchNorm option"):
        snn.make_norm("layer", 3, rngs=nnx.Rngs(0), unbiased_running_var=True)


def test_batch_norm_without_mask_is_flaxs_and_masked_ignores_padding():
    x = jax.random.normal(jax.random.key(0), (6, 3, 3, 4)) * 2.0 + 1.0
    ours, flax_bn = snn.make_norm("batch", 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(
        4, momentum=0.9, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.BatchNorm)
    np.testing.assert_array_equal(ours(x), flax_bn(x))
    np.testing.assert_array_equal(ours.var[...], flax_bn.var[...])
    # padding (any values) under a mask: the real rows' output and the statistics are
    # those of the real rows alone
    padded = jnp.concatenate([x[:4], jnp.full((2, 3, 3, 4), 1e3)])
    for unbiased in (False, True):
        real = snn.make_norm("batch", 4, rngs=nnx.Rngs(0), unbiased_running_var=unbiased)
        masked = snn.make_norm("batch", 4, rngs=nnx.Rngs(0), unbiased_running_var=unbiased)
        expected = real(x[:4])
        with snn.batch_mask(jnp.array([1, 1, 1, 1, 0, 0], bool)):
            got = masked(padded)
        np.testing.assert_allclose(got[:4], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(masked.mean[...], real.mean[...], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(masked.var[...], real.var[...], rtol=1e-5)
    with pytest.raises(ValueError, match=r"mask of shape \(5,\)"):
        masked(padded, mask=jnp.ones(5))


def test_batch_norm_masked_statistics_over_devices_weigh_by_count():
    # 8 simulated devices, 2 rows each; 5 real rows unevenly spread: 2, 1, 2, then none
    x = jax.random.normal(jax.random.key(1), (16, 2, 2, 3)) * 3.0 - 1.0
    mask = jnp.zeros(16, bool).at[jnp.array([0, 1, 3, 4, 5])].set(True)
    real = snn.make_norm("batch", 3, rngs=nnx.Rngs(0), unbiased_running_var=True)
    expected = real(x[mask])
    sharded = snn.make_norm("batch", 3, rngs=nnx.Rngs(0), unbiased_running_var=True)
    sharded.axis_name = "data"
    graphdef, state = nnx.split(sharded)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))

    def run(state, x, mask):
        module = nnx.merge(graphdef, state)
        with snn.batch_mask(mask):
            y = module(x)
        return y, nnx.state(module)

    y, new_state = jax.jit(jax.shard_map(
        run, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
            "data"), jax.sharding.PartitionSpec("data")),
        out_specs=(jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()),
        check_vma=False))(state, x, mask)
    np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], expected, rtol=1e-5, atol=1e-5)
    merged = nnx.merge(graphdef, new_state)
    np.testing.assert_allclose(merged.mean[...], real.mean[...], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(merged.var[...], real.var[...], rtol=1e-5)


# ------------------------------------------------------------------ replace_norms
def _small_vit(norm="layer"):
    return ViT(10, image_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
               norm=norm, rngs=_fast_rngs())


def test_replace_norms_layer_norm_to_learnable_scaler_in_vit():
    model = _small_vit()
    before = {"/".join(map(str, p)): np.asarray(v)
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    count = snn.replace_norms(model, nnx.LayerNorm,
                              lambda old: snn.LearnableScaler(old.num_features,
                                                              rngs=nnx.Rngs(1)))
    assert count == 5  # two per block and the final norm
    assert not any(isinstance(m, nnx.LayerNorm) for _, m in nnx.iter_modules(model))
    after = {"/".join(map(str, p)): np.asarray(v)
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    norm_keys = {k for k in before if "norm" in k}
    assert len(norm_keys) == 10
    for key in set(before) - norm_keys:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    for key in norm_keys:  # same names (scale, bias), new values
        assert key in after
    assert not np.array_equal(after["blocks/0/norm1/scale"], before["blocks/0/norm1/scale"])
    # the swapped model equals one built with norm="learnable_scaler" given the same norms
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    reference = _small_vit("learnable_scaler")
    nnx.update(reference, nnx.state(model))
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-6)


def test_frozen_norm_affine_marks_exactly_the_layer_norm_affines():
    model = _small_vit()
    params = nnx.state(model, nnx.Param)
    mask = snn.frozen_norm_affine(model)(params)
    flags = dict(zip(leaf_paths(params), jax.tree.leaves(mask)))
    frozen = {p for p, f in flags.items() if f}
    assert frozen == {f"{m}/{v}" for m in ("blocks/0/norm1", "blocks/0/norm2",
                                           "blocks/1/norm1", "blocks/1/norm2", "norm")
                      for v in ("scale", "bias")}


def test_replace_norms_by_name_and_bad_factory():
    model = _small_vit()
    assert snn.replace_norms(model, nnx.LayerNorm, "rms", rngs=nnx.Rngs(0)) == 5
    assert isinstance(model.blocks[1].norm2, nnx.RMSNorm)
    with pytest.raises(ValueError, match="num_features=3"):
        snn.replace_norms(model, nnx.RMSNorm,
                          lambda old: snn.LearnableScaler(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="rngs= is required"):
        snn.replace_norms(model, nnx.RMSNorm, "layer")


# ------------------------------------------------------------------ BN folding
def _trained_stats(model, x, steps=3):
    model.train()
    for i in range(steps):
        model(x * (1.0 + 0.3 * i) + 0.2 * i)
    model.eval()


def test_fold_batch_norms_cifar_resnet_equals_eval_model():
    model = CifarResNet(8, rngs=_fast_rngs())  # ResNet-20's blocks, one per stage
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    _trained_stats(model, x)
    expected = model(x)
    folded = snn.fold_batch_norms(model, x)
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(folded))
    assert sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model)) == 7
    # tolerance: float32 rounding of the rescaled kernels, relative to the logits' scale
    np.testing.assert_allclose(folded(x), expected, rtol=1e-4, atol=1e-4)
    assert folded.stem.conv.bias is not None  # the bias-free conv gained the BN shift


def test_fold_batch_norms_mlp_linear_and_strict():
    model = MLP(12, (16, 16), 5, norm="batch", rngs=_fast_rngs())
    x = jax.random.normal(jax.random.key(2), (8, 12))
    _trained_stats(model, x)
    folded = snn.fold_batch_norms(model, x)
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)

    class ReluThenNorm(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(jax.nn.relu(self.linear(x)))

    with pytest.raises(ValueError, match=r"\['bn'\]"):
        snn.fold_batch_norms(ReluThenNorm(), jnp.ones((2, 4)))
    kept = snn.fold_batch_norms(ReluThenNorm(), jnp.ones((2, 4)), strict=False)
    assert isinstance(kept.bn, nnx.BatchNorm)


# ------------------------------------------------------------------ MC dropout
class _LinearDropout(nnx.Module):
    def __init__(self, rate):
        self.dropout = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=0))
        self.linear = nnx.Linear(6, 3, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.linear(self.dropout(x))


def test_mc_dropout_matches_linear_expectation_and_variance():
    rate, n = 0.3, 4000
    model = _LinearDropout(rate)
    x = jax.random.normal(jax.random.key(5), (2, 6))
    model.eval()
    mean, std = snn.mc_dropout_predict(model, x, n, key=1, transform=None)
    assert model.dropout.deterministic is True  # the model's own mode is untouched
    expected = np.asarray(model(x))  # inverted dropout: E[f] is the deterministic pass
    w = np.asarray(model.linear.kernel[...])
    expected_var = (np.asarray(x) ** 2) @ (w ** 2) * rate / (1 - rate)
    np.testing.assert_allclose(std ** 2, expected_var, rtol=0.1)
    # 5 standard errors of the mean
    assert np.all(np.abs(np.asarray(mean) - expected) < 5 * np.sqrt(expected_var / n))


def test_mc_dropout_probabilities_and_errors():
    model = MLP(8, (32,), 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 8))
    mean, std = snn.mc_dropout_predict(model, x, 64, key=0)
    np.testing.assert_allclose(np.asarray(mean).sum(-1), 1.0, rtol=1e-5)
    assert mean.shape == std.shape == (3, 4) and float(std.max()) > 0
    mean2, _ = snn.mc_dropout_predict(model, x, 64, key=0)
    np.testing.assert_array_equal(mean, mean2)
    with pytest.raises(ValueError, match="no nnx.Dropout"):
        snn.mc_dropout_predict(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x[:, :2], 4, key=0)
    with pytest.raises(ValueError, match="num_samples=1"):
        snn.mc_dropout_predict(model, x, 1, key=0, ddof=1)


# ------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("activation,expected", [
    ("tanh", lambda fi, fo: 2.0 / (fi + fo)),
    ("none", lambda fi, fo: 2.0 / (fi + fo)),
    ("relu", lambda fi, fo: 2.0 / fi),
    ("gelu", lambda fi, fo: 2.0 / fi),
    ("swiglu", lambda fi, fo: 2.0 / fi),
    ("selu", lambda fi, fo: 1.0 / fi),
    ("leaky_relu", lambda fi, fo: 2.0 / (1 + 0.01 ** 2) / fi),
])
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_init_variance_matches_table(activation, expected, distribution):
    shape = (3, 3, 32, 96)  # conv kernel: fan_in = 288, fan_out = 864
    w = np.asarray(snn.init_for_activation(activation, distribution=distribution)(
        jax.random.key(0), shape, jnp.float32))
    var = expected(288, 864)
    n = w.size
    # sampling error of a variance: var * sqrt(2 / n) (normal), smaller for uniform
    assert abs(w.var() - var) < 4 * var * np.sqrt(2.0 / n), (w.var(), var)
    assert abs(w.mean()) < 4 * np.sqrt(var / n)


def test_init_bad_name_and_reinit_zero_bias():
    with pytest.raises(ValueError, match="activation='softsign'"):
        snn.init_for_activation("softsign")
    assert snn.init_scheme("mish") == "he" and snn.init_scheme("sigmoid") == "glorot"
    model = MLP(64, (256,), 10, rngs=_fast_rngs())
    model.linears[0].bias[...] = jnp.ones(256)
    assert snn.reinit_by_activation(model, "selu", rngs=nnx.Rngs(1)) == 2
    np.testing.assert_array_equal(model.linears[0].bias[...], 0.0)
    var = float(np.var(np.asarray(model.linears[0].kernel[...])))
    assert abs(var - 1.0 / 64) < 4 * (1.0 / 64) * np.sqrt(2.0 / (64 * 256))


def test_pytorch_default_init_bounds_and_reinit():
    w = np.asarray(snn.pytorch_default_kernel_init()(jax.random.key(0), (3, 3, 32, 96)))
    bound = 1 / np.sqrt(288)  # fan_in = 3 * 3 * 32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.03)
    b = np.asarray(snn.pytorch_default_bias_init(288)(jax.random.key(1), (4000,)))
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.99 * bound
    model = CifarResNet(8, width=4, init="by_activation", rngs=_fast_rngs())
    model.stem.norm.scale[...] = jnp.full(4, 3.0)
    count = snn.reinit_pytorch_default(model, rngs=_fast_rngs(2))
    assert count == 7 + 7 + 1  # convs, BatchNorms, head
    np.testing.assert_array_equal(model.stem.norm.scale[...], 1.0)
    head_bound = 1 / np.sqrt(16)
    assert 0 < np.abs(np.asarray(model.head.bias[...])).max() <= head_bound
    kernel = np.asarray(model.stages[2][0].conv_norm1.conv.kernel[...])
    assert np.abs(kernel).max() <= 1 / np.sqrt(3 * 3 * 8)
    with pytest.raises(ValueError, match=r"init='torch'; allowed values: \('by_activation'"):
        resnet20(init="torch", rngs=_fast_rngs())


# ------------------------------------------------------------------ activations
def test_extra_activations():
    x = jnp.linspace(-3.0, 3.0, 13)
    np.testing.assert_allclose(snn.relu_squared(x), np.maximum(np.asarray(x), 0) ** 2)
    np.testing.assert_allclose(snn.mish(x), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-6)
    z = jax.random.normal(jax.random.key(0), (2, 8))
    z1, z2 = np.asarray(z[:, :4]), np.asarray(z[:, 4:])
    np.testing.assert_allclose(snn.swiglu(z, 1.5), z1 / (1 + np.exp(-1.5 * z1)) * z2,
                               rtol=1e-5)
    gate = snn.SwiGLU(8, 4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(gate(z), snn.swiglu(gate.proj(z)), rtol=1e-6)
    with pytest.raises(ValueError, match="odd size 3"):
        snn.swiglu(jnp.ones((2, 3)))
    prelu = snn.PReLU(0.25)
    np.testing.assert_allclose(prelu(x), np.where(x >= 0, x, 0.25 * np.asarray(x)))


def test_rrelu_train_and_eval():
    rrelu = snn.RReLU(0.1, 0.3, rngs=nnx.Rngs(0))
    x = -jnp.ones((1000,))
    slopes = -np.asarray(rrelu(x))
    assert slopes.min() >= 0.1 and slopes.max() <= 0.3 and slopes.std() > 0.04
    np.testing.assert_array_equal(rrelu(jnp.ones(4)), 1.0)
    rrelu.eval()
    np.testing.assert_allclose(rrelu(x), -0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="lower=0.5, upper=0.2"):
        snn.RReLU(0.5, 0.2)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 7, 3), (2, 2), None, "VALID"),      # odd sizes: VALID drops the remainder
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 10, 4), (3,), None, "VALID"),          # 1-D
    ((2, 9, 9, 2), (3, 3), (2, 2), "VALID"),    # overlapping: nnx.max_pool itself
    ((2, 8, 8, 2), (2, 2), None, "SAME"),
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_nnx_max_pool_in_values_and_gradients(shape, window, strides, padding,
                                                              ties):
    x = jax.random.normal(jax.random.key(0), shape)
    if ties:  # rounded: many windows hold their maximum twice
        x = jnp.round(x)
    ours = lambda x: snn.max_pool(x, window, strides, padding)  # noqa: E731
    flax_pool = lambda x: nnx.max_pool(x, window, strides=strides or window,  # noqa: E731
                                       padding=padding)
    np.testing.assert_array_equal(ours(x), flax_pool(x))
    weights = jnp.arange(flax_pool(x).size).reshape(flax_pool(x).shape)
    grad = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) * weights))(x)  # noqa: E731
    np.testing.assert_array_equal(grad(ours), grad(flax_pool))
    tangent = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_array_equal(jax.jvp(ours, (x,), (tangent,))[1],
                                  jax.jvp(flax_pool, (x,), (tangent,))[1])
