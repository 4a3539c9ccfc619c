"""Step-by-step agreement with the float64 NumPy re-derivation of the spec, and reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sing_jax
from sing_jax import ChannelDims
from tests import numpy_reference as ref

STEPS = 25
SHAPES = [(5,), (4, 3), (3, 3, 2, 4)]  # 1-D, dense (in, out), conv (kH, kW, C_in, C_out)
SPECS = {
    "euclidean": [None, None, None],
    "per_output_channel": [(-1,), (-1,), (-1,)],
    "whole_leaf": [(), (), ()],
    "non_trailing_axis": [(0,), (0,), (2,)],
    "mixed": [None, (-1,), (2, 3)],
    # d = 1 everywhere: each optimizer must reduce to its Euclidean parent (spec section 2).
    "all_axes": [(0,), (0, 1), (0, 1, 2, 3)],
}


pytestmark = pytest.mark.usefixtures("x64")  # every test in float64 (tests/conftest.py)


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in SHAPES]


def grads_at(step, params):
    """Gradients that depend on the parameters, so errors would compound."""
    rng = np.random.default_rng(1000 + step)
    return [rng.normal(size=np.shape(p)) + 0.5 * np.asarray(p) for p in params]


def to_spec(axes_list):
    return [None if a is None else ChannelDims(a) for a in axes_list]


def run_both(tx, numpy_opt, params0, steps=STEPS):
    params = [jnp.asarray(p, jnp.float64) for p in params0]
    state = tx.init(params)
    update = jax.jit(tx.update)
    worst = 0.0
    for t in range(steps):
        g_np = grads_at(t, numpy_opt.p)
        g = [jnp.asarray(x) for x in grads_at(t, [np.asarray(p) for p in params])]
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        expected = numpy_opt.step(g_np)
        for got, want in zip(params, expected):
            assert got.dtype == jnp.float64
            err = np.max(np.abs(np.asarray(got) - want)) / (np.max(np.abs(want)) + 1e-30)
            worst = max(worst, err)
            assert err < 1e-6, f"step {t + 1}: relative error {err:.3g}"
    return params, state, worst


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("rt", [False, True])
def test_adams_and_adamsrt_match_numpy(spec_name, wd, rt):
    axes = SPECS[spec_name]
    params0 = initial_params()
    make = sing_jax.adamsrt if rt else sing_jax.adams
    tx = make(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd, channel_dims=to_spec(axes))
    numpy_opt = ref.NumpyAdamS(params0, axes, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=wd, rt=rt)
    run_both(tx, numpy_opt, params0)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("momentum,dampening,wd", [(0.0, 0.0, 0.0), (0.9, 0.0, 0.0),
                                                   (0.9, 0.1, 5e-2)])
def test_sgdmrt_matches_numpy(spec_name, momentum, dampening, wd):
    axes = SPECS[spec_name]
    params0 = initial_params()
    tx = sing_jax.sgdmrt(0.05, momentum=momentum, dampening=dampening, weight_decay=wd,
                         channel_dims=to_spec(axes))
    numpy_opt = ref.NumpySGDMRT(params0, axes, lr=0.05, momentum=momentum,
                                dampening=dampening, wd=wd)
    run_both(tx, numpy_opt, params0)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamg_matches_numpy(spec_name, wd):
    axes = SPECS[spec_name]
    params0 = initial_params()
    tx = sing_jax.adamg(1e-2, weight_decay=wd, channel_dims=to_spec(axes))
    numpy_opt = ref.NumpyAdamG(params0, axes, lr=1e-2, wd=wd)
    run_both(tx, numpy_opt, params0)


@pytest.mark.parametrize("spec_name", ["per_output_channel", "mixed", "all_axes"])
def test_adamg_single_element_spheres_matches_numpy(spec_name):
    # Spec section 6.1, the reference script as written: one-element channels of leaves
    # with a spec also go on the sphere (each element to +-1), with no weight decay.
    axes = SPECS[spec_name]
    params0 = initial_params()
    tx = sing_jax.adamg(1e-2, weight_decay=0.1, channel_dims=to_spec(axes),
                        single_element_spheres=True)
    numpy_opt = ref.NumpyAdamG(params0, axes, lr=1e-2, wd=0.1, single_element_spheres=True)
    params, _, _ = run_both(tx, numpy_opt, params0)
    if spec_name == "all_axes":  # every element is a channel of one: all snapped to +-1
        for p in params:
            np.testing.assert_allclose(np.abs(np.asarray(p)), 1.0, rtol=1e-7)


SING_VARIANTS = {
    "all_parts": {},
    "no_centralization": {"centralize": False},
    "no_normalization": {"normalize": False},
    "no_softplus": {"softplus_beta": None},
    "no_lookahead": {"lookahead_every": None},
    "no_weight_decay": {"weight_decay": 0.0},
    "lookahead_every_3_alpha_0.8": {"lookahead_every": 3, "lookahead_alpha": 0.8},
}


@pytest.mark.parametrize("variant", list(SING_VARIANTS))
def test_sing_matches_numpy(variant):
    kwargs = dict(learning_rate=2e-2, weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-8,
                  softplus_beta=50.0, centralize=True, normalize=True, lookahead_every=5,
                  lookahead_alpha=0.5)
    kwargs.update(SING_VARIANTS[variant])
    params0 = initial_params()
    tx = sing_jax.sing(**kwargs)
    numpy_opt = ref.NumpySING(
        params0, lr=kwargs["learning_rate"], b1=kwargs["b1"], b2=kwargs["b2"],
        wd=kwargs["weight_decay"], eps=kwargs["eps"],
        softplus=kwargs["softplus_beta"] is not None, beta=kwargs["softplus_beta"] or 1.0,
        grad_central=kwargs["centralize"], grad_norm=kwargs["normalize"],
        lookahead=kwargs["lookahead_every"] is not None, k=kwargs["lookahead_every"] or 1,
        alpha=kwargs["lookahead_alpha"])
    run_both(tx, numpy_opt, params0)


# ---------------------------------------------------------------------------------
# Reductions that must hold exactly


def run(tx, params0, steps=STEPS):
    params = [jnp.asarray(p, jnp.float64) for p in params0]
    state = tx.init(params)
    update = jax.jit(tx.update)
    trajectory = []
    for t in range(steps):
        g = [jnp.asarray(x) for x in grads_at(t, [np.asarray(p) for p in params])]
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append([np.asarray(p) for p in params])
    return trajectory


def assert_same_trajectory(a, b, rtol=1e-12):
    for step, (pa, pb) in enumerate(zip(a, b)):
        for x, y in zip(pa, pb):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-14,
                                       err_msg=f"step {step + 1}")


def coupled_adam(lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """``torch.optim.Adam`` with its coupled weight decay, written with optax pieces."""
    return optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(b1, b2, eps),
                       optax.scale_by_learning_rate(lr))


@pytest.mark.parametrize("make", [sing_jax.adams, sing_jax.adamsrt])
def test_euclidean_adams_is_adam_with_coupled_l2(make):
    params0 = initial_params()
    ours = run(make(3e-2, weight_decay=0.05, channel_dims=None), params0)
    # d = 1 everywhere: every element its own channel, given explicitly too.
    all_axes = [ChannelDims(tuple(range(len(s)))) for s in SHAPES]
    ours_explicit = run(make(3e-2, weight_decay=0.05, channel_dims=all_axes), params0)
    theirs = run(coupled_adam(3e-2, 0.05), params0)
    assert_same_trajectory(ours, theirs)
    assert_same_trajectory(ours_explicit, theirs)


def test_euclidean_sgdmrt_is_sgd_momentum():
    params0 = initial_params()
    ours = run(sing_jax.sgdmrt(0.05, momentum=0.9, weight_decay=0.01), params0)
    theirs = run(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9)),
                 params0)
    assert_same_trajectory(ours, theirs)


def test_sing_with_every_part_off_is_adamw():
    params0 = initial_params()
    ours = run(sing_jax.sing(1e-2, weight_decay=0.1, softplus_beta=None, centralize=False,
                             normalize=False, lookahead_every=None), params0)
    mask = lambda ps: [p.ndim > 1 for p in ps]  # noqa: E731
    theirs = run(optax.adamw(1e-2, weight_decay=0.1, mask=mask), params0)
    # sqrt(v)/sqrt(1-b2^t) vs sqrt(v/(1-b2^t)): equal up to one rounding.
    assert_same_trajectory(ours, theirs, rtol=1e-12)


def test_torch_adam_and_sgd_equal_euclidean_adams_and_sgdmrt():
    torch = pytest.importorskip("torch")
    params0 = initial_params()
    for ours_tx, make_torch in [
        (sing_jax.adamsrt(3e-2, weight_decay=0.05),
         lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.05)),
        (sing_jax.sgdmrt(0.05, momentum=0.9, weight_decay=0.01),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ]:
        ours = run(ours_tx, params0)
        tparams = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params0]
        opt = make_torch(tparams)
        for t in range(STEPS):
            grads = grads_at(t, [p.detach().numpy() for p in tparams])
            for p, g in zip(tparams, grads):
                p.grad = torch.tensor(g)
            opt.step()
            for got, want in zip(ours[t], tparams):
                np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------
# Lookahead and AdamG properties


def test_lookahead_transform_equals_optax_lookahead():
    params0 = initial_params()
    inner = optax.adam(1e-2)
    ours = run(optax.chain(inner, sing_jax.lookahead(sync_period=4, alpha=0.3)), params0)

    tx = optax.lookahead(optax.adam(1e-2), sync_period=4, slow_step_size=0.3)
    params = optax.LookaheadParams.init_synced([jnp.asarray(p) for p in params0])
    state = tx.init(params)
    for t in range(STEPS):
        g = [jnp.asarray(x) for x in grads_at(t, [np.asarray(p) for p in params.fast])]
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for got, want in zip(ours[t], params.fast):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14,
                                       err_msg=f"step {t + 1}")


@pytest.mark.parametrize("axes", [(-1,), (), (0,)])
def test_adamg_keeps_every_channel_on_the_unit_sphere(axes):
    params0 = initial_params()
    spec = [None, ChannelDims(axes), ChannelDims(axes)]
    trajectory = run(sing_jax.adamg(5e-2, channel_dims=spec), params0)
    for params in trajectory:
        for leaf, s in zip(params[1:], [axes, axes]):
            rows = ref.Rows(leaf.shape, s)
            np.testing.assert_allclose(rows.dot(leaf, leaf), 1.0, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda spec: sing_jax.adamsrt(2e-2, channel_dims=spec),
    lambda spec: sing_jax.sgdmrt(0.05, momentum=0.9, channel_dims=spec),
])
def test_transported_momentum_is_tangent_to_the_new_parameters(make):
    """<m, x_new> = 0 per channel after every RT step (up to the eps in AdamSRT's n)."""
    spec = [None, ChannelDims((-1,)), ChannelDims((-1,))]
    params = [jnp.asarray(p) for p in initial_params()]
    tx = make(spec)
    state = tx.init(params)
    for t in range(5):
        g = [jnp.asarray(x) for x in grads_at(t, [np.asarray(p) for p in params])]
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        inner = state[1].inner_state
        moment = inner.mu if hasattr(inner, "mu") else inner.momentum
        for leaf, m in zip(params[1:], moment[1:]):
            rows = ref.Rows(leaf.shape, (-1,))
            cos = rows.dot(np.asarray(m), leaf) / np.sqrt(
                rows.dot(np.asarray(m), np.asarray(m)) * rows.dot(leaf, leaf))
            np.testing.assert_allclose(cos, 0.0, atol=1e-7)
        # The Euclidean leaf is never transported, so its moment has a radial part.
        assert abs(float(np.vdot(np.asarray(moment[0]), np.asarray(params[0])))) > 1e-6


def test_lookahead_slow_weights_follow_the_syncs():
    params = [jnp.asarray(p) for p in initial_params()]
    tx = optax.chain(optax.sgd(0.1), sing_jax.lookahead(sync_period=2, alpha=0.5))
    state = tx.init(params)
    last_sync = params  # the slow weights start at the initial parameters
    for t in range(4):
        grads = [jnp.asarray(x) for x in grads_at(t, [np.asarray(p) for p in params])]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if (t + 1) % 2 == 0:  # a sync: the slow weights are the new parameters
            last_sync = params
        for s, e in zip(state[1].slow, last_sync):
            # p + (slow - p) is the slow weight up to one rounding
            np.testing.assert_allclose(np.asarray(s), np.asarray(e), rtol=1e-14, atol=1e-15)


def _rt_pair(kind, learning_rate, spec):
    """The fused RT transform and spherical_transport around the same inner transform."""
    if kind == "adamsrt":
        return (sing_jax.scale_by_adamsrt(learning_rate, 0.9, 0.99, 1e-8, spec),
                sing_jax.spherical_transport(sing_jax.scale_by_adams(0.9, 0.99, 1e-8, spec),
                                             learning_rate, spec, eps=1e-8))
    return (sing_jax.scale_by_sgdmrt(learning_rate, 0.9, 0.1, spec),
            sing_jax.spherical_transport(sing_jax.scale_by_momentum(0.9, 0.1),
                                         learning_rate, spec, eps=0.0,
                                         first_moments=("momentum",), second_moments=()))


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("kind", ["adamsrt", "sgdmrt"])
def test_fused_rt_equals_spherical_transport(spec_name, kind):
    """Same updates and the same state, leaf by leaf, with a learning-rate schedule."""
    spec = to_spec(SPECS[spec_name])
    fused, generic = _rt_pair(kind, optax.linear_schedule(0.05, 0.01, 10), spec)
    params = {name: [jnp.asarray(p) for p in initial_params()] for name in ("f", "g")}
    states = {"f": fused.init(params["f"]), "g": generic.init(params["g"])}
    assert jax.tree.structure(states["f"]) == jax.tree.structure(states["g"])
    for t in range(15):
        updates = {}
        for name, tx in (("f", fused), ("g", generic)):
            grads = [jnp.asarray(x)
                     for x in grads_at(t, [np.asarray(p) for p in params[name]])]
            updates[name], states[name] = jax.jit(tx.update)(grads, states[name],
                                                             params[name])
            params[name] = optax.apply_updates(params[name], updates[name])
        for got, want in zip(jax.tree.leaves((updates["f"], states["f"])),
                             jax.tree.leaves((updates["g"], states["g"]))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9,
                                       atol=1e-12, err_msg=f"step {t + 1}")


@pytest.mark.parametrize("make", [
    lambda spec: sing_jax.adamsrt(2e-2, weight_decay=0.1, channel_dims=spec),
    lambda spec: sing_jax.sgdmrt(0.05, momentum=0.9, weight_decay=0.1, channel_dims=spec),
    lambda spec: _rt_pair("sgdmrt", 0.05, spec)[1],
])
def test_a_channel_at_zero_keeps_finite_moments(make):
    """A channel with zero weights and gradients: <x_new, x_new> = 0, nothing becomes NaN."""
    spec = ChannelDims((-1,))
    params = [jnp.asarray(initial_params()[2]).at[..., 0].set(0.0)]
    tx = make(spec)
    state = tx.init(params)
    for t in range(3):
        grads = [jnp.asarray(grads_at(t, params)[0]).at[..., 0].set(0.0)]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))
        np.testing.assert_array_equal(np.asarray(params[0][..., 0]), 0.0)


@pytest.mark.parametrize("beta,threshold", [(50.0, 20.0), (1.0, 20.0), (50.0, 5.0),
                                            (1.0, 100.0)])  # 100: past the rational's range
def test_softplus_denominator_float32_matches_float64_softplus(beta, threshold):
    # On CPU, float32 takes the rational tail instead of exp/log1p: it must agree with
    # PyTorch's rule, evaluated in float64, to float32 rounding over the whole range.
    d = np.concatenate([np.linspace(0.0, 1.5 * threshold / beta, 20001),
                        [threshold / beta, 1.0001 * threshold / beta, 10.0]])
    d = d.astype(np.float32).astype(np.float64)  # the inputs all three dtypes can hold

    def pytorch_rule(z):  # z = beta * d in the dtype under test decides the branch
        softplus = np.log1p(np.exp(np.minimum(beta * d, threshold))) / beta
        return np.where(np.asarray(z, np.float64) > threshold, d, softplus)

    expected = pytorch_rule(np.float32(beta) * d.astype(np.float32))
    ours32 = np.asarray(sing_jax.softplus_denominator(jnp.asarray(d, jnp.float32), beta,
                                                      threshold), np.float64)
    np.testing.assert_allclose(ours32, expected, rtol=3e-7)
    ours16 = sing_jax.softplus_denominator(jnp.asarray(d, jnp.bfloat16), beta, threshold)
    assert ours16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours16, np.float64), expected, rtol=2e-2)
    ours64 = np.asarray(sing_jax.softplus_denominator(jnp.asarray(d), beta, threshold))
    np.testing.assert_allclose(ours64, pytorch_rule(beta * d), rtol=1e-14)


@pytest.mark.parametrize("beta", [50.0, 1.0])
def test_cpu_softplus_equals_the_textbook_form_to_float32_rounding(beta):
    # The CPU variant (a rational tail chosen by jax.lax.platform_dependent) against the
    # form every other backend computes, logaddexp(beta d, 0) / beta, both in float32.
    d = jnp.linspace(0.0, 30.0 / beta, 50001, dtype=jnp.float32)
    ours = jax.jit(lambda d: sing_jax.softplus_denominator(d, beta))(d)
    z = beta * d
    textbook = jnp.where(z > 20.0, d, jnp.logaddexp(z, 0.0) / beta)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(textbook), rtol=3.5e-7)


@pytest.mark.parametrize("beta,threshold", [(50.0, 20.0), (1.0, 20.0), (50.0, 5.0),
                                            (1.0, 100.0)])
def test_float32_softplus_adam_direction_matches_float64_rule(beta, threshold):
    # Over the whole range of z = beta d the direction must give m / softplus_beta(d)
    # to float32 rounding. With b1 = b2 = 0 and one step, m = g and d = |g|. (Not at
    # beta d = threshold itself, where rounding picks the branch.) Without x64, as
    # users run it: with it the bias corrections are float64 scalars and promote z.
    jax.config.update("jax_enable_x64", False)  # the fixture restores it
    d = np.concatenate([np.linspace(0.0, 1.5 * threshold / beta, 20001)[1:],
                        [0.9999 * threshold / beta, 1.0001 * threshold / beta, 10.0]])
    g = (d * np.where(np.arange(d.size) % 2, 1.0, -1.0)).astype(np.float32)
    tx = sing_jax.scale_by_softplus_adam(b1=0.0, b2=0.0, softplus_beta=beta,
                                         softplus_threshold=threshold)
    grads = jnp.asarray(g)
    direction, _ = jax.jit(tx.update)(grads, tx.init(grads))
    assert direction.dtype == jnp.float32
    softplus = ref.softplus_torch(np.abs(g.astype(np.float64)), beta, threshold)
    np.testing.assert_allclose(np.asarray(direction, np.float64), g / softplus, rtol=3e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_sing_centralisation_zeroes_single_input_kernels_like_the_spec(normalize):
    # With one element per output channel the channel mean is the gradient itself:
    # spec section 1 (and the reference) zero it; the optimizer must not skip it.
    shapes = [(1, 4), (1, 1, 1, 3), (5,)]
    rng = np.random.default_rng(3)
    params0 = [rng.normal(size=s) for s in shapes]
    tx = sing_jax.sing(2e-2, weight_decay=0.1, b2=0.99, normalize=normalize,
                       lookahead_every=None)
    numpy_opt = ref.NumpySING(params0, lr=2e-2, b2=0.99, wd=0.1, grad_norm=normalize,
                              lookahead=False)
    params, _, _ = run_both(tx, numpy_opt, params0, steps=6)
    decay = (1 - 2e-2 * 0.1) ** 6  # only the weight decay moves the two kernels
    for got, start in zip(params[:2], params0[:2]):
        np.testing.assert_allclose(np.asarray(got), start * decay, rtol=1e-9)


def test_fused_sgdmrt_keeps_leaves_apart_with_empty_and_non_finite_leaves():
    """Empty leaves pass through, and a NaN or inf in one leaf's buffer does not reach
    any other leaf: every finite leaf matches the generic transport."""
    spec = [None, ChannelDims((-1,)), None, ChannelDims((-1,)), None]
    rng = np.random.default_rng(0)
    shapes = [(0,), (3, 3, 2, 4), (0, 3), (4, 3), (5,)]
    params0 = [jnp.asarray(rng.normal(size=s)) for s in shapes]
    fused, generic = _rt_pair("sgdmrt", 0.05, spec)
    for bad in (np.nan, np.inf):
        params = {"f": params0, "g": params0}
        states = {"f": fused.init(params0), "g": generic.init(params0)}
        for _ in range(3):
            grads = [jnp.asarray(rng.normal(size=s)) for s in shapes]
            grads[1] = grads[1].at[0, 0, 0, 0].set(bad)  # the leaf before the (4, 3) one
            for name, tx in (("f", fused), ("g", generic)):
                updates, states[name] = jax.jit(tx.update)(grads, states[name], params[name])
                params[name] = optax.apply_updates(params[name], updates)
        for i in (0, 2, 3, 4):
            assert bool(jnp.all(jnp.isfinite(params["f"][i])))
            np.testing.assert_allclose(np.asarray(params["f"][i]), np.asarray(params["g"][i]),
                                       rtol=1e-9, atol=1e-12, err_msg=f"leaf {i}, {bad}")
