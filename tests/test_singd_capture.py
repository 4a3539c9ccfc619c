"""SINGD's layer capture on unmodified NNX models.

The Kronecker factors built from the captured inputs and output gradients equal the
exact GGN blocks computed with ``jax.jacrev`` in the settings where KFAC is exact
(batch of one; weight sharing in the "expand" / "reduce" settings of Eschenhagen et
al. 2023), for ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``
layers with and without bias, stride, dilation, groups. The statistics are read
through the public API: at initialisation the factors are the identity, so
``singd_curvature`` gives ``H_K = A^T A`` and ``H_C = G^T G`` themselves.
"""

import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax


def identity_curvature(model, captures, kfac_approx="expand", loss_average=None,
                       structure="dense"):
    """{layer: (A^T A, G^T G)} (dense; the diagonal for ``structure="diagonal"``)."""
    tx = sing_jax.singd(structures=(structure, structure), kfac_approx=kfac_approx,
                        loss_average=loss_average, layers=sing_jax.singd_layers(model),
                        other=None)
    state = tx.init(nnx.state(model, nnx.Param))
    curvature = sing_jax.singd_curvature(state, captures)
    return {path: (c.h_k.to_dense(), c.h_c.to_dense()) for path, c in curvature.items()}


def weight_matrix(layer, info):
    """[W | b] in PyTorch orientation (d_o x d_K), input features in SINGD's order."""
    k = layer.kernel[...]
    order = info.in_axes + info.out_axes
    w = jnp.transpose(k, order).reshape(info.dim_in, info.dim_out).T
    if layer.bias is not None:
        w = jnp.concatenate([w, layer.bias[...].reshape(-1, 1)], axis=1)
    return w


def kernel_and_bias(w, info, bias_shape):
    """Inverse of weight_matrix."""
    bias = w[:, -1].reshape(bias_shape) if bias_shape is not None else None
    w = w[:, :-1] if bias_shape is not None else w
    order = info.in_axes + info.out_axes
    permuted = w.T.reshape(tuple(info.kernel_shape[a] for a in order))
    return jnp.transpose(permuted, np.argsort(order)), bias


def exact_ggn(model, layer_name, x):
    """J^T J for the output z of ``model`` (loss 0.5 ||z||^2, Hessian I) w.r.t. [W | b]."""
    graphdef, state = nnx.split(model)
    layer = getattr(model, layer_name)
    info = sing_jax.singd_layers(model)[layer_name]
    bias_shape = None if layer.bias is None else layer.bias.shape

    def out(w):
        pure = nnx.to_pure_dict(state)
        kernel, bias = kernel_and_bias(w, info, bias_shape)
        pure[layer_name]["kernel"] = kernel
        if bias is not None:
            pure[layer_name]["bias"] = bias
        st = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(st, pure)
        return nnx.merge(graphdef, st)(x).ravel()

    w0 = weight_matrix(layer, info)
    jac = jax.jacrev(out)(w0).reshape(-1, w0.size)
    return jac.T @ jac


def kfac_ggn(model, layer_name, x, kfac_approx):
    """kron(sum_k G_k^T G_k, A^T A) from captures of z_k (columns of the Hessian's root)."""
    num_out = model(x).size

    @nnx.jit
    def factors_k(model, x, k):
        _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: m(x).ravel()[k], model, x)
        return identity_curvature(model, caps, kfac_approx)[layer_name]

    ggn_c = 0.0
    for k in range(num_out):
        ata, gtg = factors_k(model, x, jnp.asarray(k))
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


class Only(nnx.Module):
    """Expand setting: the loss treats every position independently."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


class PoolLinear(nnx.Module):
    """Reduce setting: the layer's output is averaged over positions, then mapped."""

    def __init__(self, layer, features, rngs):
        self.layer = layer
        self.head = nnx.Linear(features, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        out = self.layer(x)
        return self.head(out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1))


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
    model = Only(nnx.Conv(rngs=nnx.Rngs(0), **CONV_CASES[case]))
    x = conv_input(case, hw=4)
    np.testing.assert_allclose(kfac_ggn(model, "layer", x, "expand"),
                               exact_ggn(model, "layer", x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["bias_same", "groups"])
def test_conv_reduce_factors_equal_the_exact_ggn(case):
    kwargs = CONV_CASES[case]
    model = PoolLinear(nnx.Conv(rngs=nnx.Rngs(0), **kwargs), kwargs["out_features"],
                       nnx.Rngs(1))
    x = conv_input(case)
    np.testing.assert_allclose(kfac_ggn(model, "layer", x, "reduce"),
                               exact_ggn(model, "layer", x), rtol=1e-4, atol=1e-6)


LINEAR_MAPS = {  # (layer, input shape of one example, output features if one axis)
    "linear_general_split_out": (
        lambda r: nnx.LinearGeneral(4, (2, 3), rngs=r), (3, 4), None),
    "linear_general_two_in_axes": (
        lambda r: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=r), (3, 2, 3), 4),
    "linear_general_leading_axis": (
        lambda r: nnx.LinearGeneral(3, 2, axis=1, use_bias=False, rngs=r), (3, 2), 2),
    "einsum_heads": (
        lambda r: nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=r), (3, 4), None),
    "einsum_transposed_out": (  # the output features come before the positions
        lambda r: nnx.Einsum("btd,kd->bkt", (5, 4), (5, 1), rngs=r), (3, 4), None),
    "einsum_ellipsis": (
        lambda r: nnx.Einsum("...d,dk->...k", (4, 2), rngs=r), (2, 3, 4), 2),
}


@pytest.mark.parametrize("case", list(LINEAR_MAPS))
def test_linear_general_and_einsum_factors_equal_the_exact_ggn(case):
    make, shape, features = LINEAR_MAPS[case]
    x = jax.random.normal(jax.random.key(3), (1, *shape))
    model = Only(make(nnx.Rngs(0)))
    np.testing.assert_allclose(kfac_ggn(model, "layer", x, "expand"),
                               exact_ggn(model, "layer", x), rtol=1e-4, atol=1e-5)
    if features is not None:  # pooling the positions of a one-axis output: reduce
        pooled = PoolLinear(make(nnx.Rngs(0)), features, nnx.Rngs(1))
        np.testing.assert_allclose(kfac_ggn(pooled, "layer", x, "reduce"),
                                   exact_ggn(pooled, "layer", x), rtol=1e-4, atol=1e-6)


class SeqNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, kernel_dilation=1, padding=1, rngs=rngs)
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.conv(x))  # (B, H', W', 4)
        h = jax.nn.gelu(self.proj(h))  # Linear with leading axes
        return self.head(h.mean(axis=(1, 2)))


def patches(x, info):
    """Unfolded conv input in SINGD's (channel, kernel row, kernel column) order."""
    return jax.lax.conv_general_dilated_patches(
        x, info.kernel_shape[:2], info.strides, info.padding, rhs_dilation=info.dilation,
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=jax.lax.Precision.HIGHEST)


def test_captured_rows_reproduce_the_gradient_on_a_batch():
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
        (a,), (g,) = cap.inputs, cap.output_grads
        if name == "conv":
            a = patches(a, cap.info)
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        info = cap.info
        k = ref_grads[name]["kernel"][...]
        w = jnp.transpose(k, info.in_axes + info.out_axes).reshape(info.dim_in, -1).T
        want = jnp.concatenate([w, ref_grads[name]["bias"][...][:, None]], axis=1)
        got = g.T @ jnp.concatenate([a, jnp.ones((a.shape[0], 1))], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(grads[name]["kernel"][...], k, rtol=1e-5, atol=1e-7)


def test_loss_average_scalings_and_reduce():
    model = SeqNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 7, 7, 3))
    _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: jnp.mean(m(x) ** 2), model, x)
    (a,), (g,) = caps["proj"].inputs, caps["proj"].output_grads  # (3, 4, 4, 4) each
    base = identity_curvature(model, caps, loss_average=None)["proj"][1]
    for average, terms in (("batch", 3), ("batch+sequence", 3 * 16)):
        np.testing.assert_allclose(identity_curvature(model, caps, loss_average=average)
                                   ["proj"][1], base * terms, rtol=1e-5)
    ata, gtg = identity_curvature(model, caps, "reduce")["proj"]
    g_sum = g.sum(axis=(1, 2))
    np.testing.assert_allclose(gtg, g_sum.T @ g_sum, rtol=1e-5, atol=1e-8)
    a_mean = jnp.concatenate([a.mean(axis=(1, 2)), jnp.ones((3, 1))], 1)
    np.testing.assert_allclose(ata, a_mean.T @ a_mean / 3, rtol=1e-5)


class Shared(nnx.Module):
    """One Linear applied to two inputs (shared weights), on a sequence."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x1, x2 = x[..., :3], x[..., 3:]
        return self.head(jnp.tanh(self.lin(x1)) * self.lin(x2)).mean(axis=1)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_a_layer_called_twice_sums_or_averages_its_calls(kfac_approx):
    """expand: every position of both calls is a row; reduce: per example, the inputs
    averaged over positions and calls, the output gradients summed."""
    model = Shared(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (4, 5, 6))  # (batch, positions, 2 x 3)

    def loss_fn(m, x):
        return jnp.mean(jnp.sum(m(x) ** 2, axis=-1))

    _, _, caps = sing_jax.capture_value_and_grad(loss_fn, model, x)
    assert len(caps["lin"].inputs) == 2
    ata, gtg = identity_curvature(model, caps, kfac_approx, "batch")["lin"]

    # by hand: the two calls' inputs, and the loss's gradients w.r.t. their outputs
    lin, head = model.lin, model.head
    s1, s2 = lin(x[..., :3]), lin(x[..., 3:])
    g1, g2 = jax.grad(lambda s1, s2: jnp.mean(jnp.sum(
        head(jnp.tanh(s1) * s2).mean(axis=1) ** 2, axis=-1)), argnums=(0, 1))(s1, s2)
    ones = jnp.ones((4, 5, 1))
    a1, a2 = (jnp.concatenate([x[..., i:i + 3], ones], -1) for i in (0, 3))
    if kfac_approx == "expand":
        a = jnp.concatenate([a1, a2], axis=1).reshape(-1, 4)
        g = jnp.concatenate([g1, g2], axis=1).reshape(-1, 4)
        want_a, want_g = a.T @ a / a.shape[0], g.T @ g * 4
    else:
        a = (a1.mean(axis=1) + a2.mean(axis=1)) / 2
        g = g1.sum(axis=1) + g2.sum(axis=1)
        want_a, want_g = a.T @ a / 4, g.T @ g * 4
    np.testing.assert_allclose(ata, want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gtg, want_g, rtol=1e-5, atol=1e-9)


class ScaledLinear(nnx.Linear):
    """A user subclass with its own __call__ around the Flax layer's."""

    def __call__(self, x):
        return 2.0 * super().__call__(x + 1.0)


class Inherits(nnx.Linear):
    """A user subclass that keeps nnx.Linear's __call__."""


class OwnMath(nnx.Linear):
    """A subclass that does not call nnx.Linear's __call__: nothing to capture."""

    def __call__(self, x):
        return x @ self.kernel[...]


class Subclasses(nnx.Module):
    def __init__(self, rngs):
        self.scaled = ScaledLinear(3, 4, rngs=rngs)
        self.inherits = Inherits(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.inherits(jnp.tanh(self.scaled(x)))


def test_subclasses_are_captured_at_the_flax_layers_call():
    model = Subclasses(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (5, 3))

    def loss_fn(m, x):
        return jnp.sum(m(x) ** 2)

    _, grads, caps = sing_jax.capture_value_and_grad(loss_fn, model, x)
    assert sorted(caps) == ["inherits", "scaled"]
    (a,), (g,) = caps["scaled"].inputs, caps["scaled"].output_grads
    np.testing.assert_allclose(a, x + 1.0, rtol=1e-6)  # the Flax layer's input
    # the gradient w.r.t. the Flax layer's output: its kernel gradient is A^T G
    np.testing.assert_allclose(a.T @ g, grads["scaled"]["kernel"][...], rtol=1e-5)
    assert type(model.scaled) is ScaledLinear  # the user's model is untouched

    own = Only(OwnMath(3, 2, rngs=nnx.Rngs(0)))
    state = sing_jax.singd(0.1, T=1).init(nnx.state(own, nnx.Param))
    with pytest.raises(ValueError, match=r"no statistics captured for registered layer "
                                         r"'layer'.*does not call the Flax layer"):
        sing_jax.singd_value_and_grad(lambda m, x: jnp.sum(m(x)), own, x, opt_state=state)


def test_two_threads_capturing_at_once_equal_one_after_the_other():
    models = [SeqNet(nnx.Rngs(0)), Shared(nnx.Rngs(1))]
    inputs = [jax.random.normal(jax.random.key(7), (2, 7, 7, 3)),
              jax.random.normal(jax.random.key(8), (2, 5, 6))]

    def capture(model, x):
        return sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m(x) ** 2), model, x)

    alone = [capture(m, x) for m, x in zip(models, inputs, strict=True)]
    together = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        for _ in range(3):  # eager: every capture traces again, interleaved
            together[i] = capture(models[i], inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(together, alone, strict=True):
        assert sorted(got[2]) == sorted(want[2])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["bias_same", "nobias_stride_valid", "dilation_explicit"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv_statistics_equal_those_of_the_unfolded_patches(case, kfac_approx):
    """A^T A as every structure takes it (dense: by shifted products for stride 1;
    diagonal: square sums; block-diagonal: diagonal blocks) equals the statistic of
    the patches ``conv_general_dilated_patches`` unfolds."""
    kwargs = CONV_CASES[case]
    conv = nnx.Conv(rngs=nnx.Rngs(0), **kwargs)
    model = Only(conv)
    x = jax.random.normal(jax.random.key(5), (2, 7, 6, kwargs["in_features"]))
    _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m(x) ** 2), model, x)
    p = patches(x, caps["layer"].info)
    if kfac_approx == "reduce":
        p = p.mean(axis=(1, 2))
    rows = p.reshape(-1, p.shape[-1])
    if conv.bias is not None:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1))], axis=1)
    want = rows.T @ rows / rows.shape[0]
    dense = identity_curvature(model, caps, kfac_approx)["layer"][0]
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    diagonal = identity_curvature(model, caps, kfac_approx, structure="diagonal")["layer"][0]
    np.testing.assert_allclose(diagonal, jnp.diag(jnp.diag(want)), rtol=1e-5, atol=1e-6)
    block = sing_jax.singd_structures.structure("block_diagonal", block_size=4)
    blocks = identity_curvature(model, caps, kfac_approx, structure=block)["layer"][0]
    mask = np.equal.outer(np.arange(want.shape[0]) // 4, np.arange(want.shape[0]) // 4)
    np.testing.assert_allclose(blocks, want * mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel, padding, dilation, bias, hw", [
    ((2, 3), "VALID", (1, 1), False, (5, 6)),
    ((1, 3), "SAME", (1, 2), True, (4, 7)),
    ((3, 1), ((0, 2), (1, 1)), (2, 1), False, (7, 3)),
    ((5, 5), "SAME", (1, 1), True, (3, 4)),  # input smaller than the kernel
    ((2, 2), ((3, 0), (0, 4)), (1, 1), True, (4, 4)),  # padding wider than the kernel
    ((1, 1), "VALID", (1, 1), True, (3, 3)),
])
def test_stride_one_conv_gram_equals_the_gram_of_the_patches(kernel, padding, dilation,
                                                             bias, hw):
    """The Gram matrix assembled from shifted-input products, for every tap rectangle:
    asymmetric kernels and padding, dilation, empty taps, with and without bias."""
    conv = nnx.Conv(3, 2, kernel, padding=padding, kernel_dilation=dilation, use_bias=bias,
                    rngs=nnx.Rngs(0))
    model = Only(conv)
    x = jax.random.normal(jax.random.key(8), (4, *hw, 3))
    _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m(x)), model, x)
    p = patches(x, caps["layer"].info)
    rows = p.reshape(-1, p.shape[-1])
    if bias:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1))], axis=1)
    np.testing.assert_allclose(identity_curvature(model, caps)["layer"][0],
                               rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strides, hw, structure", [
    (1, 32, "dense"),  # the Gram by shifted products
    (2, 64, "dense"),  # the Gram of the unfolded patches
    (2, 64, "block_diagonal"),  # the diagonal blocks of the unfolded patches
])
def test_conv_statistics_of_a_large_batch_equal_those_of_the_patches(strides, hw, structure):
    """Sums over 16 images that the CPU path takes a few images at a time (patches of
    0.6-0.9 MB an image) equal the statistic of all the patches at once."""
    conv = nnx.Conv(16, 4, (3, 3), strides=strides, rngs=nnx.Rngs(0))
    model = Only(conv)
    x = jax.random.normal(jax.random.key(9), (16, hw, hw, 16))
    _, _, caps = sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m(x)), model, x)
    p = patches(x, caps["layer"].info)
    rows = jnp.concatenate([p.reshape(-1, p.shape[-1]), jnp.ones((p[..., 0].size, 1))], 1)
    want = rows.T @ rows / rows.shape[0]
    spec = sing_jax.singd_structures.structure(structure, block_size=30) if (
        structure == "block_diagonal") else structure
    got = identity_curvature(model, caps, structure=spec)["layer"][0]
    if structure == "block_diagonal":
        mask = np.equal.outer(np.arange(145) // 30, np.arange(145) // 30)
        want = want * mask
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unsupported_layers_raise_naming_them():
    def capture(layer, x):
        return sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m(x)), Only(layer), x)

    conv = nnx.Conv(2, 2, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding='CIRCULAR' is not supported"):
        capture(conv, jnp.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="'layer': SINGD supports 2-D nnx.Conv only"):
        capture(nnx.Conv(2, 2, (3,), rngs=nnx.Rngs(0)), jnp.ones((1, 4, 2)))
    batched = nnx.Einsum("bd,bdk->bk", (2, 3, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'layer': nnx.Einsum equation 'bd,bdk->bk' has "
                                         r"kernel letters \['b'\] in both"):
        capture(batched, jnp.ones((2, 3)))
    other_equation = Only(nnx.Einsum("bd,dk->bk", (3, 4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'layer': called with einsum_str 'bk,dk->bd', "
                                         r"registered with 'bd,dk->bk'"):
        sing_jax.capture_value_and_grad(lambda m, x: jnp.sum(m.layer(x, "bk,dk->bd")),
                                        other_equation, jnp.ones((2, 4)))
    per_batch = nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'layer': nnx.LinearGeneral with batch_axis"):
        capture(per_batch, jnp.ones((2, 3)))
    # singd_layers leaves them out, with a warning, for `other` to train
    with pytest.warns(UserWarning, match="SINGD leaves out layer 'layer'"):
        assert sing_jax.singd_layers(Only(batched)) == {}


def test_capture_is_skipped_when_the_preconditioner_is_not_refreshed():
    model = SeqNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))
    tx = sing_jax.singd(0.1, T=3)
    state = tx.init(nnx.state(model, nnx.Param))
    traces = []

    def loss_fn(m, x):
        traces.append(1)
        return jnp.mean(m(x) ** 2)

    (loss0, grads0), stats0 = sing_jax.singd_value_and_grad(loss_fn, model, x, opt_state=state)
    assert len(traces) == 2, "step 0: the capture traces the loss twice (shapes, then values)"
    assert all(float(s.count) == 1 for s in stats0.values())
    traces.clear()
    skipped_state = state._replace(count=jnp.asarray(1, jnp.int32))
    (loss1, grads1), stats1 = sing_jax.singd_value_and_grad(loss_fn, model, x,
                                                            opt_state=skipped_state)
    assert len(traces) == 1, "no capture work on a step with count % T != 0"
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
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(
        nnx.state(BN(nnx.Rngs(0)))), "the capture leaves nothing behind"
    tx = sing_jax.singd(0.1)
    updates, _ = tx.update(grads, tx.init(nnx.state(model, nnx.Param)),
                           nnx.state(model, nnx.Param), singd_stats=caps)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    assert optax is not None
