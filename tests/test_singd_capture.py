"""SINGD's layer capture on unmodified NNX models.

The Kronecker factors built from the captured inputs and output gradients equal the
exact GGN blocks computed with ``jax.jacrev`` in the settings where KFAC is exact
(batch of one; weight sharing in the "expand" / "reduce" settings of Eschenhagen et
al. 2023), for dense and conv layers with and without bias, stride, dilation, groups.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax._src.singd import capture as capture_lib


def weight_matrix(layer):
    """[W | b] in PyTorch orientation (d_o x d_K)."""
    k = layer.kernel[...]
    w = k.T if k.ndim == 2 else jnp.transpose(k, (3, 2, 0, 1)).reshape(k.shape[-1], -1)
    if layer.bias is not None:
        w = jnp.concatenate([w, layer.bias[...][:, None]], axis=1)
    return w


def kernel_and_bias(w, kernel_shape, has_bias):
    """Inverse of weight_matrix."""
    bias = w[:, -1] if has_bias else None
    w = w[:, :-1] if has_bias else w
    if len(kernel_shape) == 2:
        return w.T, bias
    kh, kw, cin, cout = kernel_shape
    return jnp.transpose(w.reshape(cout, cin, kh, kw), (2, 3, 1, 0)), bias


def exact_ggn(model, layer_name, x):
    """J^T J for the output z of ``model`` (loss 0.5 ||z||^2, Hessian I) w.r.t. [W | b]."""
    graphdef, state = nnx.split(model)
    layer = getattr(model, layer_name)
    kshape, has_bias = layer.kernel.shape, layer.bias is not None

    def out(w):
        pure = nnx.to_pure_dict(state)
        kernel, bias = kernel_and_bias(w, kshape, has_bias)
        pure[layer_name]["kernel"] = kernel
        if has_bias:
            pure[layer_name]["bias"] = bias
        st = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(st, pure)
        return nnx.merge(graphdef, st)(x).ravel()

    w0 = weight_matrix(layer)
    jac = jax.jacrev(out)(w0).reshape(-1, w0.size)
    return jac.T @ jac


def kfac_ggn(model, layer_name, x, kfac_approx):
    """kron(sum_k G_k^T G_k, A^T A) from captures of z_k (columns of the Hessian's root)."""
    num_out = model(x).size

    @nnx.jit
    def capture_k(model, x, k):
        _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: m(x).ravel()[k], model, x)
        cap = caps[layer_name]
        a = capture_lib.input_matrix(cap, kfac_approx)
        g = capture_lib.output_grad_matrix(cap, kfac_approx, loss_average=None)
        return a.T @ a, g.T @ g

    ggn_c = 0.0
    for k in range(num_out):
        ata, gtg = capture_k(model, x, jnp.asarray(k))
        ggn_c = ggn_c + gtg
    return jnp.kron(ggn_c, ata)


class MLP(nnx.Module):
    def __init__(self, bias, rngs):
        self.l1 = nnx.Linear(4, 5, use_bias=bias, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, use_bias=bias, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_factors_equal_the_exact_ggn_for_one_sample(bias):
    model = MLP(bias, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 4))
    for name in ("l1", "l2"):
        for approx in ("expand", "reduce"):  # identical without weight sharing
            np.testing.assert_allclose(kfac_ggn(model, name, x, approx),
                                       exact_ggn(model, name, x), rtol=1e-4, atol=1e-6)


class ConvOnly(nnx.Module):
    """Expand setting: the loss treats every output location independently."""

    def __init__(self, conv_kwargs, rngs):
        self.conv = nnx.Conv(rngs=rngs, **conv_kwargs)

    def __call__(self, x):
        return self.conv(x)


class ConvPoolLinear(nnx.Module):
    """Reduce setting: the conv output is averaged over locations, then mapped linearly."""

    def __init__(self, conv_kwargs, rngs):
        self.conv = nnx.Conv(rngs=rngs, **conv_kwargs)
        self.head = nnx.Linear(conv_kwargs["out_features"], 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.head(self.conv(x).mean(axis=(1, 2)))


CONV_CASES = {
    "bias_same": dict(in_features=2, out_features=3, kernel_size=(3, 3), padding="SAME"),
    "nobias_stride_valid": dict(in_features=2, out_features=2, kernel_size=(2, 3),
                                strides=(2, 1), padding="VALID", use_bias=False),
    "dilation_explicit": dict(in_features=2, out_features=2, kernel_size=(2, 2),
                              kernel_dilation=2, padding=((1, 0), (0, 1))),
    "groups": dict(in_features=4, out_features=4, kernel_size=(2, 2), padding="VALID",
                   feature_group_count=2),
}


def conv_input(case, hw=5):
    cin = CONV_CASES[case]["in_features"]
    groups = CONV_CASES[case].get("feature_group_count", 1)
    x = jax.random.normal(jax.random.key(2), (1, hw, hw, cin // groups))
    # grouped conv: one K is shared by all groups (inputs averaged over groups), which
    # is exact when every group sees the same input
    return jnp.tile(x, (1, 1, 1, groups))


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_expand_factors_equal_the_exact_ggn(case):
    model = ConvOnly(CONV_CASES[case], nnx.Rngs(0))
    x = conv_input(case, hw=4)
    np.testing.assert_allclose(kfac_ggn(model, "conv", x, "expand"),
                               exact_ggn(model, "conv", x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["bias_same", "groups"])
def test_conv_reduce_factors_equal_the_exact_ggn(case):
    model = ConvPoolLinear(CONV_CASES[case], nnx.Rngs(0))
    x = conv_input(case)
    np.testing.assert_allclose(kfac_ggn(model, "conv", x, "reduce"),
                               exact_ggn(model, "conv", x), rtol=1e-4, atol=1e-6)


class SeqNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, kernel_dilation=1, padding=1, rngs=rngs)
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.conv(x))  # (B, H', W', 4)
        h = jax.nn.gelu(self.proj(h))  # Linear with leading axes
        return self.head(h.mean(axis=(1, 2)))


def test_captured_statistics_reproduce_the_gradient_on_a_batch():
    """sum over rows of g a^T is the weight gradient (expand), for every layer."""
    model = SeqNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 7, 7, 3))
    y = jax.random.normal(jax.random.key(4), (3, 2))

    def loss_fn(m, x, y):
        return jnp.mean((m(x) - y) ** 2)

    loss, grads, caps = sing_jax.capture_value_and_grad(loss_fn, model, x, y)
    np.testing.assert_allclose(loss, loss_fn(model, x, y), rtol=1e-6)
    ref_grads = nnx.grad(loss_fn)(model, x, y)
    assert sorted(caps) == ["conv", "head", "proj"]
    for name, cap in caps.items():
        a = capture_lib.input_matrix(cap, "expand") * np.sqrt(cap_rows(cap))
        g = capture_lib.output_grad_matrix(cap, "expand", loss_average=None)
        layer_grads = ref_grads[name]
        got = g.T @ a  # (d_o, d_K)
        k = layer_grads["kernel"][...]
        w = k.T if k.ndim == 2 else jnp.transpose(k, (3, 2, 0, 1)).reshape(k.shape[-1], -1)
        want = jnp.concatenate([w, layer_grads["bias"][...][:, None]], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(grads[name]["kernel"][...], k, rtol=1e-5, atol=1e-7)


def cap_rows(cap):
    return capture_lib.input_matrix(cap, "expand").shape[0]


def test_loss_average_scalings():
    model = SeqNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 7, 7, 3))
    _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: jnp.mean(m(x) ** 2), model, x)
    cap = caps["proj"]  # output grads (3, 4, 4, 4)
    base = capture_lib.output_grad_matrix(cap, "expand", None)
    np.testing.assert_allclose(capture_lib.output_grad_matrix(cap, "expand", "batch"),
                               base * np.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(capture_lib.output_grad_matrix(cap, "expand", "batch+sequence"),
                               base * np.sqrt(3 * 16), rtol=1e-6)
    reduced = capture_lib.output_grad_matrix(cap, "reduce", None)
    np.testing.assert_allclose(reduced, cap.output_grads.sum(axis=(1, 2)), rtol=1e-6)
    a_red = capture_lib.input_matrix(cap, "reduce")
    want = jnp.concatenate([cap.inputs.mean(axis=(1, 2)), jnp.ones((3, 1))], 1) / np.sqrt(3)
    np.testing.assert_allclose(a_red, want, rtol=1e-6)


def test_layer_called_twice_is_an_error_and_unsupported_params_warn():
    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="'lin' was called more than once"):
        sing_jax.capture_value_and_grad(lambda m, x: m(x).sum(), Twice(nnx.Rngs(0)),
                                        jnp.ones((2, 3)))

    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.lin(x))

    with pytest.warns(UserWarning, match="module 'norm' holds parameters"):
        sing_jax.capture_value_and_grad(lambda m, x: m(x).sum(), WithNorm(nnx.Rngs(0)),
                                        jnp.ones((2, 3)))


def test_unsupported_conv_options_raise():
    conv = nnx.Conv(2, 2, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding='CIRCULAR' is not supported"):
        sing_jax.capture_value_and_grad(lambda m, x: m(x).sum(), conv, jnp.ones((1, 4, 4, 2)))
    conv1d = nnx.Conv(2, 2, (3,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="2-D nnx.Conv only"):
        sing_jax.capture_value_and_grad(lambda m, x: m(x).sum(), conv1d, jnp.ones((1, 4, 2)))


def test_capture_is_skipped_when_the_preconditioner_is_not_refreshed(monkeypatch):
    model = SeqNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))
    tx = sing_jax.singd(0.1, T=3)
    state = tx.init(nnx.state(model, nnx.Param))

    def loss_fn(m, x):
        return jnp.mean(m(x) ** 2)

    forwards = []
    real_forward = capture_lib._forward
    monkeypatch.setattr(capture_lib, "_forward",
                        lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    (loss0, grads0), stats0 = sing_jax.singd_value_and_grad(loss_fn, model, x, opt_state=state)
    assert forwards, "step 0 must capture"
    assert all(float(s.count) == 1 for s in stats0.values())
    forwards.clear()
    skipped_state = state._replace(count=jnp.asarray(1, jnp.int32))
    (loss1, grads1), stats1 = sing_jax.singd_value_and_grad(loss_fn, model, x,
                                                            opt_state=skipped_state)
    assert not forwards, "no capture work on a step with count % T != 0"
    assert all(float(s.count) == 0 for s in stats1.values())
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # under jit the count is traced: lax.cond picks the branch at run time
    @nnx.jit
    def stats_at(model, x, st):
        return sing_jax.singd_value_and_grad(loss_fn, model, x, opt_state=st)[1]

    traced0, traced1 = stats_at(model, x, state), stats_at(model, x, skipped_state)
    for name in traced0:
        np.testing.assert_allclose(traced0[name].h_k.to_dense(), stats0[name].h_k.to_dense(),
                                   rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(traced1[name].h_c.to_dense()).max()) == 0.0


def test_value_and_grad_keeps_batch_stats_and_aux():
    class BN(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    model = BN(nnx.Rngs(0))
    before = np.asarray(model.bn.mean[...]).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (value, grads), caps = sing_jax.singd_value_and_grad(
            lambda m, x: (jnp.mean(m(x) ** 2), {"n": x.shape[0]}), model,
            jnp.arange(6.0).reshape(2, 3), has_aux=True)
    loss, aux = value
    assert aux == {"n": 2} and np.isfinite(loss)
    assert not np.allclose(model.bn.mean[...], before), "batch statistics were updated"
    assert isinstance(caps["lin"], sing_jax.LayerCapture)
    updates, _ = sing_jax.singd(0.1).update(
        grads, sing_jax.singd(0.1).init(nnx.state(model, nnx.Param)),
        nnx.state(model, nnx.Param), singd_stats=caps)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    assert optax is not None


@pytest.mark.parametrize("case", ["bias_same", "nobias_stride_valid", "dilation_explicit"])
def test_patches_equal_conv_general_dilated_patches(case):
    kwargs = CONV_CASES[case]
    conv = nnx.Conv(rngs=nnx.Rngs(0), **kwargs)
    info = capture_lib.layer_info(conv, "conv")
    x = jax.random.normal(jax.random.key(5), (2, 7, 6, kwargs["in_features"]))
    want = jax.lax.conv_general_dilated_patches(
        x, info.kernel_shape[:2], info.strides, info.padding, rhs_dilation=info.dilation,
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(capture_lib.conv_patches(x, info), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_square_sums_equal_the_column_norms_of_the_factor_matrices(case, kfac_approx):
    """What a diagonal factor reads, computed without unfolding, equals diag(A^T A)."""
    kwargs = CONV_CASES[case]
    conv = nnx.Conv(rngs=nnx.Rngs(0), **kwargs)
    info = capture_lib.layer_info(conv, "conv")
    x = jax.random.normal(jax.random.key(6), (3, 7, 6, kwargs["in_features"]))
    cap = capture_lib.LayerCapture(x, conv(x), info)
    a = capture_lib.input_matrix(cap, kfac_approx)
    np.testing.assert_allclose(capture_lib.input_square_sums(cap, kfac_approx),
                               jnp.diag(a.T @ a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("chunk_images", [1, 2, 6])
def test_gram_statistics_summed_over_batch_chunks_equal_the_whole_patch_matrix(case,
                                                                             chunk_images):
    """Unfolding a few images at a time and summing gives the statistic of all of A."""
    kwargs = CONV_CASES[case]
    conv = nnx.Conv(rngs=nnx.Rngs(0), **kwargs)
    info = capture_lib.layer_info(conv, "conv")
    x = jax.random.normal(jax.random.key(7), (2, 3, 7, 6, kwargs["in_features"]))
    cap = capture_lib.LayerCapture(x, conv(x), info)
    a = capture_lib.input_matrix(cap, "expand")
    one_image = capture_lib.conv_patches(x[0, :1], info)
    budget = chunk_images * one_image.size * one_image.dtype.itemsize
    block = sing_jax.singd_structures.BlockDiagonalMatrix.zeros(a.shape[1], block_size=4)
    for statistic in (None, block.gram_statistic):  # None: the Gram matrix, its own way
        chunked = capture_lib.input_gram_statistic(cap, "expand", None, statistic,
                                                   max_chunk_bytes=budget)
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5,
                                                                  atol=1e-6),
                     chunked, a.T @ a if statistic is None else statistic(a))
    for kfac_approx in ("expand", "reduce"):  # not chunked: the Gram of input_matrix
        a = capture_lib.input_matrix(cap, kfac_approx)
        np.testing.assert_allclose(capture_lib.input_gram_statistic(cap, kfac_approx, None),
                                   a.T @ a, rtol=1e-5, atol=1e-6)
    # a budget below one image still unfolds one image at a time
    a = capture_lib.input_matrix(cap, "expand")
    np.testing.assert_allclose(capture_lib.input_gram_statistic(
        cap, "expand", None, max_chunk_bytes=1), a.T @ a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel, padding, dilation, bias, hw", [
    ((3, 3), "SAME", (1, 1), True, (6, 5)),
    ((2, 3), "VALID", (1, 1), False, (5, 6)),
    ((1, 3), "SAME", (1, 2), True, (4, 7)),
    ((3, 1), ((0, 2), (1, 1)), (2, 1), False, (7, 3)),
    ((5, 5), "SAME", (1, 1), True, (3, 4)),  # input smaller than the kernel
    ((2, 2), ((3, 0), (0, 4)), (1, 1), True, (4, 4)),  # padding wider than the kernel
    ((1, 1), "VALID", (1, 1), True, (3, 3)),
])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_stride_one_conv_gram_by_offsets_equals_the_gram_of_the_patches(
        kernel, padding, dilation, bias, hw, chunk_bytes):
    """The Gram assembled from shifted-input products equals A^T A of the unfolded
    patches, for every tap rectangle: asymmetric kernels and padding, dilation, empty
    taps, with and without bias, in one chunk or one image per chunk."""
    info = capture_lib.LayerInfo("conv", "conv", bias, kernel + (3, 2), (1, 1), padding,
                                 dilation)
    x = jax.random.normal(jax.random.key(8), (4,) + hw + (3,))
    a = capture_lib.input_matrix(capture_lib.LayerCapture(x, None, info), "expand")
    got = capture_lib.conv_gram_by_offsets(x, info, chunk_bytes)
    assert got.shape == (a.shape[1],) * 2
    np.testing.assert_allclose(got, a.T @ a, rtol=1e-5, atol=1e-6)
