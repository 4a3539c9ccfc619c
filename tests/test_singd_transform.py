"""The SINGD optax transform: contract, `other`, overrides, schedules, errors, IKFAC,
gradient accumulation, data parallelism, mixed precision and checkpoints."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sing_jax

S = sing_jax.singd_structures


class Net(nnx.Module):
    """Conv + LayerNorm + Linear: two registered layers and two `other` params."""

    def __init__(self, rngs, dtype=jnp.float32, strides=2):
        self.conv = nnx.Conv(2, 3, (3, 3), strides=strides, param_dtype=dtype, dtype=dtype,
                             rngs=rngs)
        self.norm = nnx.LayerNorm(3, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(3, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
        return self.head(self.norm(h))


def loss_fn(model, x, y):
    return jnp.mean(jnp.sum((model(x) - y) ** 2, axis=-1))


def batch(key=0, n=8, dtype=jnp.float32):
    kx, ky = jax.random.split(jax.random.key(key))
    return (jax.random.normal(kx, (n, 6, 6, 2), dtype), jax.random.normal(ky, (n, 2), dtype))


def raw_captures(strides=2):
    """Params, gradients and raw per-layer captures of ``Net`` on one batch."""
    x, y = batch()
    model = Net(nnx.Rngs(0), strides=strides)
    params = nnx.state(model, nnx.Param)
    (_, grads), caps = sing_jax.singd_value_and_grad(loss_fn, model, x, y)
    return params, grads, caps


def quiet(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn(*a, **k)
    return wrapper


def make_step(tx, graphdef, axis_name=None):
    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        (loss, grads), stats = sing_jax.singd_value_and_grad(
            loss_fn, model, x, y, opt_state=opt_state, axis_name=axis_name)
        updates, opt_state = tx.update(grads, opt_state, params, singd_stats=stats)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return optax.apply_updates(params, updates), rest, opt_state, loss
    return step


def setup(tx, dtype=jnp.float32):
    model = Net(nnx.Rngs(0), dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest, tx.init(params)


# --- contract ---------------------------------------------------------------------------
@quiet
def test_jit_no_recompilation_stable_state_and_loss_decreases():
    tx = sing_jax.singd(0.05, T=2, lr_cov=0.05, structures=("diagonal", "dense"))
    graphdef, params, rest, state = setup(tx)
    step = jax.jit(make_step(tx, graphdef))
    x, y = batch()
    def signature(st):
        leaves, treedef = jax.tree.flatten(st)
        return treedef, [(a.shape, a.dtype) for a in leaves]

    shapes = signature(state)
    losses = []
    for _ in range(6):
        params, rest, state, loss = step(params, rest, state, x, y)
        losses.append(float(loss))
        assert signature(state) == shapes
    assert step._cache_size() == 1
    assert int(state.count) == 6
    assert losses[-1] < 0.8 * losses[0], losses


@quiet
@pytest.mark.parametrize("period", [1, 3, 10])
def test_kept_outer_products_change_only_the_work(period):
    # Dense factors keep S S^T where d < T n (conv K: d=19, n=3; conv C: d=3, n=19;
    # head K: d=4, n=2; head C: d=2, n=4): the same training (float64, so that only
    # rounding differs), with S S^T equal to the factors' product after every refresh.
    kwargs = dict(learning_rate=0.05, T=period, lr_cov=0.05, alpha1=0.5,
                  preconditioner_dtype=jnp.float64)
    runs = []
    with jax.enable_x64(True):
        for flag in (True, False):
            tx = sing_jax.singd(**kwargs, cache_outer_products=flag)
            graphdef, params, rest, state = setup(tx, jnp.float64)
            step = jax.jit(make_step(tx, graphdef))
            for t in range(2 * period + 1):
                params, rest, state, _ = step(params, rest, state,
                                              *batch(t, dtype=jnp.float64))
            runs.append(jax.device_get((params, state)))
    (p1, s1), (p2, s2) = runs
    expected = {"conv": (19 < 3 * period, True), "head": (4 < 2 * period, True)}
    for lp, lp_plain in zip(s1.layers, s2.layers, strict=True):
        kept = (lp.k_outer is not None, lp.c_outer is not None)
        assert kept == expected[lp.config.path], (lp.config.path, kept)
        assert lp_plain.k_outer is None and lp_plain.c_outer is None
        for factor, outer in ((lp.k, lp.k_outer), (lp.c, lp.c_outer)):
            if outer is not None:
                mat = np.asarray(factor.to_dense())
                np.testing.assert_allclose(outer, mat @ mat.T, rtol=1e-12)
    for a, b in zip(jax.tree.leaves((p1, [(lp.k, lp.c) for lp in s1.layers])),
                    jax.tree.leaves((p2, [(lp.k, lp.c) for lp in s2.layers])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    registered = {row[0]: row[6] for row in s1.registration.value.layers}
    registered_plain = {row[0]: row[6] for row in s2.registration.value.layers}
    assert registered["head"] == registered_plain["head"] + 8 * (
        (4 * 4 if expected["head"][0] else 0) + 2 * 2)  # bytes of the kept products


@quiet
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_keep_their_dtype_and_preconditioners_are_float32(dtype):
    tx = sing_jax.singd(0.05, T=1)
    graphdef, params, rest, state = setup(tx, dtype)
    params2, _, state2, _ = jax.jit(make_step(tx, graphdef))(params, rest, state,
                                                              *batch(dtype=dtype))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert b.dtype == a.dtype == dtype
    for lp in state2.layers:
        assert lp.k.dtype == lp.c.dtype == jnp.float32


@quiet
def test_bf16_model_trains_without_nans_with_float32_preconditioners():
    tx = sing_jax.singd(0.05, T=1, lr_cov=0.05, damping=1e-3, other=optax.adam(1e-2))
    graphdef, params, rest, state = setup(tx, jnp.bfloat16)
    step = jax.jit(make_step(tx, graphdef))
    x, y = batch(dtype=jnp.bfloat16)
    losses = []
    for _ in range(25):
        params, rest, state, loss = step(params, rest, state, x, y)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in jax.tree.leaves(state))
    assert losses[-1] < 0.7 * losses[0], losses


@quiet
@pytest.mark.parametrize("kfac_like", [False, True])
def test_singd_multi_steps_equals_one_big_batch_and_plain_multisteps_does_not(kfac_like):
    kwargs = dict(learning_rate=0.05, T=1, lr_cov=0.1, kfac_like=kfac_like,
                  alpha1=0.0 if kfac_like else 0.5)
    big = sing_jax.singd(**kwargs)
    graphdef, params, rest, big_state = setup(big)
    x, y = batch(n=8)
    p_big, _, big_state, _ = jax.jit(make_step(big, graphdef))(params, rest, big_state, x, y)

    def two_micro_steps(tx):
        state = tx.init(params)
        step = jax.jit(make_step(tx, graphdef))
        p, r = params, rest
        for sl in (slice(0, 4), slice(4, 8)):
            p, r, state, _ = step(p, r, state, x[sl], y[sl])
        assert step._cache_size() == 1
        return p, state

    p_acc, acc_state = two_micro_steps(sing_jax.singd_multi_steps(sing_jax.singd(**kwargs), 2))
    for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(p_acc), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    acc_layers = acc_state.inner.inner_opt_state.layers
    for a, b in zip(big_state.layers, acc_layers, strict=True):
        np.testing.assert_allclose(a.k.to_dense(), b.k.to_dense(), rtol=1e-5, atol=1e-7)
    # The sums start again from zero after the step.
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(acc_state.acc_stats))
    # optax.MultiSteps alone refreshes K from the last micro-batch only, and says so.
    with pytest.warns(UserWarning, match="use sing_jax.singd_multi_steps"):
        _, plain_state = two_micro_steps(optax.MultiSteps(sing_jax.singd(**kwargs), 2))
    assert not np.allclose(plain_state.inner_opt_state.layers[1].k.to_dense(),
                           big_state.layers[1].k.to_dense(), rtol=1e-5, atol=1e-7)


# --- other parameters, overrides, report --------------------------------------------------
@quiet
def test_other_params_follow_the_other_transform_and_none_freezes_them():
    params, grads, caps = raw_captures()
    adam = optax.adam(1e-2)
    upd, _ = sing_jax.singd(0.1, other=adam).update(
        grads, sing_jax.singd(0.1, other=adam).init(params), params, singd_stats=caps)
    ref, _ = adam.update(grads["norm"], adam.init(params["norm"]))
    for name in ("scale", "bias"):
        np.testing.assert_allclose(upd["norm"][name][...], ref[name][...], rtol=1e-6)
    frozen = sing_jax.singd(0.1, other=None)
    upd0, st0 = frozen.update(grads, frozen.init(params), params, singd_stats=caps)
    assert float(jnp.abs(upd0["norm"]["scale"][...]).max()) == 0.0
    assert float(jnp.abs(upd0["head"]["kernel"][...]).max()) > 0.0
    report = sing_jax.singd_report(st0)
    assert "conv" in report and "head" in report and "norm/scale" in report
    assert "frozen" in report


@quiet
def test_regex_overrides_structures_hyperparameters_and_exclusion():
    params, grads, caps = raw_captures()
    tx = sing_jax.singd(0.1, momentum=0.0, structures=("dense", "dense"),
                        layer_overrides={"^conv$": {"structures": ("diagonal", "tril_toeplitz"),
                                                    "learning_rate": 0.3}})
    state = tx.init(params)
    conv, head = state.layers
    assert isinstance(conv.k, S.DiagonalMatrix) and isinstance(conv.c, S.TrilToeplitzMatrix)
    assert isinstance(head.k, S.DenseMatrix)
    upd, _ = tx.update(grads, state, params, singd_stats=caps)
    # the same layer with a plain configuration: only the learning rate differs
    plain = sing_jax.singd(0.1, momentum=0.0, structures=("diagonal", "tril_toeplitz"))
    upd_plain, _ = plain.update(grads, plain.init(params), params, singd_stats=caps)
    np.testing.assert_allclose(upd["conv"]["kernel"][...], 3 * upd_plain["conv"]["kernel"][...],
                               rtol=1e-5)
    # None sends a layer to `other`
    excl = sing_jax.singd(0.1, layer_overrides={"head": None}, other=optax.sgd(1.0))
    st = excl.init(params)
    assert [lp.config.path for lp in st.layers] == ["conv"]
    upd_e, _ = excl.update(grads, st, params, singd_stats=caps)
    np.testing.assert_allclose(upd_e["head"]["kernel"][...], -grads["head"]["kernel"][...])


@quiet
def test_schedules_for_learning_rate_and_lr_cov():
    params, grads, caps = raw_captures()

    def run(lr, lr_cov, steps=3):
        tx = sing_jax.singd(lr, momentum=0.0, T=1, lr_cov=lr_cov)
        st = tx.init(params)
        outs = []
        for _ in range(steps):
            upd, st = tx.update(grads, st, params, singd_stats=caps)
            outs.append(upd["head"]["kernel"][...])
        return outs, st

    sched_out, _ = run(lambda t: 0.1 * (t + 1), 1e-2)
    const_out, _ = run(0.1, 1e-2)
    # natural gradients are identical; only the step size follows the schedule
    for t in range(3):
        np.testing.assert_allclose(sched_out[t], (t + 1) * const_out[t], rtol=1e-5)
    _, st_sched = run(0.1, lambda t: jnp.where(t == 0, 0.05, 0.0), steps=3)
    _, st_once = run(0.1, 0.05, steps=1)
    # a schedule that is zero after step 0 freezes K, C at their step-0 values
    np.testing.assert_allclose(st_sched.layers[1].k.to_dense(), st_once.layers[1].k.to_dense(),
                               rtol=1e-6)


def test_clear_errors_for_bad_input():
    params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="learning_rate must be"):
        sing_jax.singd(-1.0)
    with pytest.raises(ValueError, match="alpha1 must be in"):
        sing_jax.singd(alpha1=1.0)
    with pytest.raises(ValueError, match="T must be a positive int"):
        sing_jax.singd(T=0)
    with pytest.raises(ValueError, match="kfac_approx='mean'"):
        sing_jax.singd(kfac_approx="mean")
    with pytest.raises(ValueError, match="unknown structure 'banded'"):
        sing_jax.singd(structures=("banded", "dense"))
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        sing_jax.singd(layer_overrides={"conv": {"lr": 1.0}})
    with pytest.raises(ValueError, match="layer_overrides: bad regex 'conv\\('"):
        sing_jax.singd(layer_overrides={"conv(": {"T": 2}})
    with pytest.raises(ValueError,
                       match="layer_overrides\\['conv'\\] is 'diagonal'; expected a dict"):
        sing_jax.singd(layer_overrides={"conv": "diagonal"})
    with pytest.raises(ValueError, match="layer 'conv': loss_average='token'"):
        sing_jax.singd(layer_overrides={"conv": {"loss_average": "token"}}).init(params)
    tx = sing_jax.singd()
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the layer statistics"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="no entry for registered layer 'conv'"):
        tx.update(params, state, params, singd_stats={})
    with pytest.warns(UserWarning, match="kfac_like=True ignores alpha1"):
        sing_jax.singd(kfac_like=True, alpha1=0.5).init(params)
    for bad in ("int32", jnp.int8, 0.0, "nonsense", ("float32",)):
        with pytest.raises(ValueError, match="preconditioner_dtype must be a floating dtype"):
            sing_jax.singd(preconditioner_dtype=bad)
    with pytest.raises(ValueError, match="cache_outer_products must be True or False, got 'yes'"):
        sing_jax.singd(cache_outer_products="yes")
    with pytest.raises(ValueError, match="block_size=0 is not allowed; expected an int >= 1"):
        sing_jax.singd(structures=(S.structure("block_diagonal", block_size=0), "dense"))
    with pytest.warns(UserWarning, match="pattern 'encoder' matches no layer path"):
        sing_jax.singd(layer_overrides={"encoder": {"T": 2}}).init(params)
    # A state from another model names the layer that changed and how.
    other_model = nnx.state(Net(nnx.Rngs(0), strides=1), nnx.Param)
    other_model["head"] = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"'head' has kernel_shape \(3, 2\) -> \(3, 4\)"):
        tx.update(other_model, state, other_model, singd_stats={})


@quiet
def test_overrides_none_wins_over_values_wherever_it_comes():
    params, _, _ = raw_captures()
    for overrides in ({"head": None, "he": {"T": 3}}, {"he": {"T": 3}, "head": None}):
        state = sing_jax.singd(layer_overrides=overrides).init(params)
        assert [lp.config.path for lp in state.layers] == ["conv"]
    state = sing_jax.singd(layer_overrides={"": {"T": 2}, "head": {"T": 3}}).init(params)
    assert [lp.config.T for lp in state.layers] == [2, 3]  # the later value wins


@quiet
def test_inject_hyperparams_with_static_structure_arguments():
    params, grads, caps = raw_captures()
    injected = optax.inject_hyperparams(sing_jax.singd, static_args=("T", "alpha1"))(
        learning_rate=0.1, momentum=0.0, T=1)
    plain = sing_jax.singd(0.1, momentum=0.0, T=1)
    update = jax.jit(injected.update)
    state, plain_state = injected.init(params), plain.init(params)
    got, state = update(grads, state, params, singd_stats=caps)
    want, plain_state = plain.update(grads, plain_state, params, singd_stats=caps)
    np.testing.assert_allclose(got["head"]["kernel"][...], want["head"]["kernel"][...],
                               rtol=1e-5)
    # Changing the injected learning rate changes the next step in proportion.
    state.hyperparams["learning_rate"] = jnp.asarray(0.3, jnp.float32)
    got, _ = update(grads, state, params, singd_stats=caps)
    want, _ = plain.update(grads, plain_state, params, singd_stats=caps)
    np.testing.assert_allclose(got["head"]["kernel"][...], 3 * want["head"]["kernel"][...],
                               rtol=1e-5)
    # Without static T the traced value cannot set the refresh period: a clear error.
    not_static = optax.inject_hyperparams(sing_jax.singd)(learning_rate=0.1)
    with pytest.raises(TypeError, match=r"T decides the state's structure.*static_args"):
        jax.jit(not_static.update)(grads, not_static.init(params), params, singd_stats=caps)


# --- IKFAC tracks the running average of A^T A + damping -----------------------------------
def test_ikfac_inverse_tracks_the_averaged_statistics_to_first_order():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a_rows = jnp.asarray(rng.normal(size=(16, 3)))
        g_rows = jnp.asarray(rng.normal(size=(16, 2)) * 0.05)
        info = sing_jax.LayerInfo("lin", "linear", (3, 2), (0,), (1,), True)
        cap = sing_jax.LayerCapture((a_rows,), (g_rows,), info)
        params = {"lin": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))}}
        damping = 1e-2
        a_mat = jnp.concatenate([a_rows, jnp.ones((16, 1))], axis=1) / 4.0  # / sqrt(rows)
        g_mat = g_rows * 4.0  # * sqrt(batch)
        s_k = a_mat.T @ a_mat + damping * jnp.eye(4)
        s_c = g_mat.T @ g_mat + damping * jnp.eye(2)

        def factors(lr_cov, warm_steps):
            def cov(t):
                return jnp.where(t < warm_steps, 0.05, lr_cov)

            tx = sing_jax.singd(0.0, T=1, kfac_like=True, alpha1=0.0, damping=damping,
                                lr_cov=cov, preconditioner_dtype=None, other=None)
            st = tx.init(params)
            ps = []
            for _ in range(warm_steps + 1):
                _, st = tx.update(params, st, params, singd_stats={"lin": cap})
                ps.append(st.layers[0])
            return ps[-2], ps[-1]

        errors = []
        for beta in (1e-2, 1e-3):
            before, after = factors(beta, warm_steps=10)
            for mat, s in ((lambda lp: lp.k.to_dense(), s_k), (lambda lp: lp.c.to_dense(), s_c)):
                prec_inv = jnp.linalg.inv(mat(before) @ mat(before).T)
                new_inv = jnp.linalg.inv(mat(after) @ mat(after).T)
                predicted = (1 - beta) * prec_inv + beta * s
                errors.append(float(jnp.abs(new_inv - predicted).max()))
        # the error of the first-order relation shrinks like beta^2
        assert errors[2] < errors[0] / 50 and errors[3] < errors[1] / 50, errors
        assert errors[2] < 1e-5 and errors[3] < 1e-5, errors


@quiet
@pytest.mark.parametrize("jit", [False, True])
def test_per_layer_T_refreshes_each_layer_on_its_own_period(jit):
    """conv every 3rd step, head every step; a layer's K, C move only on its steps."""
    tx = sing_jax.singd(0.05, T=1, lr_cov=0.1, layer_overrides={"^conv$": {"T": 3}})
    graphdef, params, rest, state = setup(tx)
    assert [lp.config.T for lp in state.layers] == [3, 1]
    assert "T=3" in sing_jax.singd_report(state)
    step = make_step(tx, graphdef)
    step = jax.jit(step) if jit else step
    x, y = batch()
    for t in range(4):  # counts 0..3: conv refreshes at 0 and 3
        before = [lp.k.to_dense() for lp in state.layers]
        params, rest, state, _ = step(params, rest, state, x, y)
        conv_moved, head_moved = (not np.allclose(b, lp.k.to_dense())
                                  for b, lp in zip(before, state.layers))
        assert conv_moved == (t % 3 == 0), t
        assert head_moved, t
    # the same schedule as a global T when every layer has it
    same = sing_jax.singd(0.05, T=2, lr_cov=0.1)
    over = sing_jax.singd(0.05, T=5, lr_cov=0.1, layer_overrides={".*": {"T": 2}})
    runs = []
    for t in (same, over):
        graphdef, params, rest, state = setup(t)
        for _ in range(3):
            params, rest, state, _ = jax.jit(make_step(t, graphdef))(params, rest, state, x, y)
        runs.append(params)
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="layer 'conv': T must be a positive int"):
        sing_jax.singd(layer_overrides={"conv": {"T": 0}}).init(params)


# --- gradient accumulation ----------------------------------------------------------------
@quiet
@pytest.mark.parametrize("kfac_like", [False, True])
def test_gradient_accumulation_equals_one_big_batch(kfac_like):
    x, y = batch(n=8)
    tx = sing_jax.singd(0.1, T=1, kfac_like=kfac_like, alpha1=0.0 if kfac_like else 0.5,
                        lr_cov=0.1)
    model = Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    (_, g_big), s_big = sing_jax.singd_value_and_grad(loss_fn, model, x, y, opt_state=state)
    u_big, st_big = tx.update(g_big, state, params, singd_stats=s_big)
    micro = []
    for sl in (slice(0, 4), slice(4, 8)):
        micro.append(sing_jax.singd_value_and_grad(loss_fn, model, x[sl], y[sl],
                                                   opt_state=state))
    grads = jax.tree.map(lambda a, b: (a + b) / 2, micro[0][0][1], micro[1][0][1])
    stats = sing_jax.accumulate_singd_stats(micro[0][1], micro[1][1])
    u_acc, st_acc = tx.update(grads, state, params, singd_stats=stats)
    for a, b in zip(jax.tree.leaves(u_big), jax.tree.leaves(u_acc), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for lp_a, lp_b in zip(st_big.layers, st_acc.layers, strict=True):
        np.testing.assert_allclose(lp_a.k.to_dense(), lp_b.k.to_dense(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lp_a.c.to_dense(), lp_b.c.to_dense(), rtol=1e-5, atol=1e-7)


# --- data parallelism ------------------------------------------------------------------------
@quiet
def over_data_shards(step, mesh):
    """``step(params, rest, opt_state, x, y)`` jitted with the batch split over 'data'."""
    return jax.jit(jax.shard_map(step, mesh=mesh,
                                 in_specs=(P(), P(), P(), P("data"), P("data")),
                                 out_specs=P(), check_vma=False))


def test_four_devices_equal_one_device_under_shard_map_and_jit():
    devices = np.array(jax.devices()[:4])
    assert len(devices) == 4
    mesh = Mesh(devices, ("data",))
    tx = sing_jax.singd(0.05, T=1, lr_cov=0.05, structures=("dense", "diagonal"))
    graphdef, params, rest, state = setup(tx)
    x, y = batch(n=8)
    single = jax.jit(make_step(tx, graphdef))
    sharded = over_data_shards(make_step(tx, graphdef, axis_name="data"), mesh)
    p1, r1, s1 = params, rest, state
    p4, r4, s4 = params, rest, state
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    pj, rj, sj = params, rest, state
    for _ in range(2):
        p1, r1, s1, l1 = single(p1, r1, s1, x, y)
        p4, r4, s4, l4 = sharded(p4, r4, s4, xs, ys)
        pj, rj, sj, lj = single(pj, rj, sj, xs, ys)  # plain jit on a sharded batch
        np.testing.assert_allclose(l4, l1, rtol=1e-5)
        np.testing.assert_allclose(lj, l1, rtol=1e-5)
    for other in (p4, pj):
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for other in (s4, sj):
        for a, b in zip(jax.tree.leaves(s1.layers), jax.tree.leaves(other.layers), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def make_raw_step(tx, graphdef, axis_name=None):
    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        (loss, grads), captures = sing_jax.singd_value_and_grad(
            loss_fn, model, x, y, axis_name=axis_name)
        updates, opt_state = tx.update(grads, opt_state, params, singd_stats=captures)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


@pytest.mark.parametrize("transform_axis_name", [None, "data"])
def test_raw_captures_are_averaged_over_the_helpers_axis_under_shard_map(transform_axis_name):
    # Without opt_state the helper returns per-device layer inputs and output gradients
    # tagged with its axis_name: the curvature built from them is averaged over that
    # axis whether or not singd() was given it too.
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    kwargs = dict(learning_rate=0.05, T=1, lr_cov=0.05, structures=("dense", "diagonal"))
    tx_single = sing_jax.singd(**kwargs)
    tx_sharded = sing_jax.singd(**kwargs, axis_name=transform_axis_name)
    graphdef, params, rest, state = setup(tx_single)
    x, y = batch(n=8)
    single = jax.jit(make_raw_step(tx_single, graphdef))
    sharded = over_data_shards(make_raw_step(tx_sharded, graphdef, axis_name="data"), mesh)
    p1, s1, p4, s4 = params, state, params, state
    for _ in range(2):
        p1, s1, l1 = single(p1, rest, s1, x, y)
        p4, s4, l4 = sharded(p4, rest, s4, x, y)
        np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((p1, s1.layers)), jax.tree.leaves((p4, s4.layers)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_raw_captures_are_averaged_over_the_helpers_axis_under_pmap():
    devices = jax.devices()[:2]
    tx = sing_jax.singd(0.05, T=1, lr_cov=0.05)
    graphdef, params, rest, state = setup(tx)
    x, y = batch(n=8)
    _, s1, _ = jax.jit(make_raw_step(tx, graphdef))(params, rest, state, x, y)
    replicate = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jnp.broadcast_to(a, (len(devices),) + jnp.shape(a)), tree)
    replicated = jax.pmap(make_raw_step(tx, graphdef, axis_name="data"), axis_name="data",
                          devices=devices)
    xs, ys = x.reshape((2, 4) + x.shape[1:]), y.reshape((2, 4) + y.shape[1:])
    _, s2, _ = replicated(replicate(params), replicate(rest), replicate(state), xs, ys)
    for a, b in zip(jax.tree.leaves(s1.layers), jax.tree.leaves(s2.layers), strict=True):
        for device in range(len(devices)):  # every device holds the one-device factors
            np.testing.assert_allclose(b[device], a, rtol=1e-4, atol=1e-6)


@quiet
def test_four_devices_equal_one_device_under_pmap():
    devices = jax.devices()[:4]
    tx = sing_jax.singd(0.05, T=1, lr_cov=0.05, structures=("dense", "diagonal"))
    graphdef, params, rest, state = setup(tx)
    x, y = batch(n=8)
    single = jax.jit(make_step(tx, graphdef))
    replicated = jax.pmap(make_step(tx, graphdef, axis_name="data"), axis_name="data",
                          devices=devices)
    replicate = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jnp.broadcast_to(a, (len(devices),) + jnp.shape(a)), tree)
    p1, r1, s1 = params, rest, state
    p4, r4, s4 = replicate(params), replicate(rest), replicate(state)
    xs, ys = x.reshape((4, 2) + x.shape[1:]), y.reshape((4, 2) + y.shape[1:])
    for _ in range(2):
        p1, r1, s1, l1 = single(p1, r1, s1, x, y)
        p4, r4, s4, l4 = replicated(p4, r4, s4, xs, ys)
        np.testing.assert_allclose(l4, np.full(4, l1), rtol=1e-5)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(first(p4)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.layers), jax.tree.leaves(first(s4).layers),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- checkpoints -------------------------------------------------------------------------------
@quiet
@pytest.mark.parametrize("structures", [("hierarchical", "block_diagonal"),
                                        ("dense", "dense")])  # dense: C C^T kept at T=2
def test_orbax_round_trip_continues_identically(tmp_path, structures):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = sing_jax.singd(0.05, T=2, structures=structures)
    graphdef, params, rest, state = setup(tx)
    step = jax.jit(make_step(tx, graphdef))
    x, y = batch()
    params, rest, state, _ = step(params, rest, state, x, y)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", {"params": params, "opt": state})
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "ckpt", {"params": params, "opt": state})
    assert isinstance(restored["opt"].layers[0].k, S.structure(structures[0]).cls)
    assert (restored["opt"].layers[0].c_outer is not None) == (structures[1] == "dense")
    a = step(params, rest, state, x, y)
    b = step(restored["params"], rest, restored["opt"], x, y)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


def test_value_and_grad_with_nnx_optimizer_state_and_batchnorm_under_jit():
    """opt_state may be nnx.Optimizer's (OptState variables); BatchNorm stats still update."""

    class ConvBN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))

    model = ConvBN(nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, sing_jax.singd(1e-2, T=2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
    y = jnp.arange(8) % 3

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(model, optimizer, x, y):
        (loss, grads), stats = sing_jax.singd_value_and_grad(
            loss_fn, model, x, y, opt_state=optimizer.opt_state)
        optimizer.update(model, grads, singd_stats=stats)
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchNorm params go to `other`, with a warning
        losses = [float(step(model, optimizer, x, y)) for _ in range(4)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(jnp.abs(model.bn.mean[...]).max()) > 0


# --- layers SINGD does not precondition, shared layers, transforms ------------------------------
class SharedAndConv1D(nnx.Module):
    """A Linear called twice and a 1-D conv (which SINGD cannot precondition)."""

    def __init__(self, rngs):
        self.conv1d = nnx.Conv(2, 3, (3,), rngs=rngs)
        self.shared = nnx.Linear(3, 3, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):  # x: (batch, length, 2)
        h = jax.nn.relu(self.conv1d(x)).mean(axis=1)
        return self.head(self.shared(jax.nn.relu(self.shared(h))))


@quiet
def test_layers_excluded_by_overrides_pass_through_the_capture():
    model = SharedAndConv1D(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 5, 2))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    with pytest.raises(ValueError, match="'conv1d': SINGD supports 2-D nnx.Conv only"):
        sing_jax.singd_value_and_grad(loss_fn, model, x, y)
    _, captures = sing_jax.singd_value_and_grad(loss_fn, model, x, y, layers=["shared", "head"])
    assert len(captures["shared"].inputs) == 2  # one record per call
    tx = sing_jax.singd(0.1, T=1, layer_overrides={"conv1d": None}, other=optax.sgd(0.1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = tx.init(params)
    assert [lp.config.path for lp in state.layers] == ["head", "shared"]
    step = jax.jit(make_step(tx, graphdef))
    new_params, _, state, loss = step(params, rest, state, x, y)
    assert np.isfinite(float(loss))
    for name in ("shared", "conv1d", "head"):  # trained by SINGD and by `other`
        assert not np.allclose(new_params[name]["kernel"][...], params[name]["kernel"][...])
    # Raw captures can be restricted the same way.
    _, captures = sing_jax.singd_value_and_grad(loss_fn, model, x, y, layers=["head"])
    assert list(captures) == ["head"]


def test_an_unbatched_example_is_a_batch_of_one():
    linear = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3,))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    state = sing_jax.singd(loss_average=None).init(nnx.state(linear, nnx.Param))
    _, _, single = sing_jax.capture_value_and_grad(loss, linear, x)
    _, _, batched = sing_jax.capture_value_and_grad(loss, linear, x[None])
    got = sing_jax.singd_curvature(state, single)[""]
    want = sing_jax.singd_curvature(state, batched)[""]
    for a, b in ((got.h_k, want.h_k), (got.h_c, want.h_c)):
        np.testing.assert_allclose(a.to_dense(), b.to_dense(), rtol=1e-6)


class Remat(nnx.Module):
    def __init__(self, rngs):
        self.inner = nnx.Linear(2, 2, rngs=rngs)
        self.head = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x, remat=True):
        inner = nnx.remat(lambda m, x: m(x)) if remat else (lambda m, x: m(x))
        return self.head(jnp.tanh(inner(self.inner, x)))


def test_layers_inside_nnx_transforms_are_captured_and_jax_transforms_get_clear_errors():
    model = Remat(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 2))
    y = jnp.zeros((4, 2))
    state = sing_jax.singd(0.1, T=1).init(nnx.state(model, nnx.Param))
    (_, _), stats = sing_jax.singd_value_and_grad(loss_fn, model, x, y, opt_state=state)
    (_, _), plain = sing_jax.singd_value_and_grad(
        lambda m, x, y: loss_fn(lambda x: m(x, remat=False), x, y), model, x, y,
        opt_state=state)
    for path in ("inner", "head"):  # nnx.remat carries the recordings out
        np.testing.assert_allclose(stats[path].h_k.to_dense(), plain[path].h_k.to_dense(),
                                   rtol=1e-6)
    per_example = lambda m, x, y: jnp.mean(jax.vmap(lambda a: m(a))(x) - y)  # noqa: E731
    with pytest.raises(ValueError, match=r"inside a JAX transform.*jax.vmap"):
        sing_jax.singd_value_and_grad(per_example, nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x, y)
