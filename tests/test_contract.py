"""The contract every optimizer of the package passes (after optax/contrib/_common_test.py).

Each entry of ``OPTIMIZERS`` builds a transform from a learning rate and an
optional channel spec; the checks below run over all of them.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sing_jax
from sing_jax import ChannelDims

# name -> (factory(learning_rate, channel_dims), lr for Rosenbrock)
OPTIMIZERS = {
    "sing": (lambda lr, spec: sing_jax.sing(lr, weight_decay=0.0), 1e-2),
    "sing_no_lookahead": (lambda lr, spec: sing_jax.sing(lr, lookahead_every=None), 1e-2),
    "adams": (lambda lr, spec: sing_jax.adams(lr, channel_dims=spec), 1e-2),
    "adamsrt": (lambda lr, spec: sing_jax.adamsrt(lr, channel_dims=spec), 1e-2),
    "sgdmrt": (lambda lr, spec: sing_jax.sgdmrt(lr, momentum=0.9, channel_dims=spec), 5e-4),
    "adamg": (lambda lr, spec: sing_jax.adamg(lr, channel_dims=spec), 1e-2),
}
NAMES = list(OPTIMIZERS)


def make(name, lr=1e-2, spec=None):
    return OPTIMIZERS[name][0](lr, spec)


def rosenbrock(params):
    x, y = params["xy"][0], params["xy"][1]
    return (1.0 - x) ** 2 + 100.0 * (y - x ** 2) ** 2


def minimize(tx, loss, params, steps):
    state = tx.init(params)

    def body(carry, _):
        params, state = carry
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return params


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_rosenbrock(name):
    tx = make(name, OPTIMIZERS[name][1])
    params = minimize(tx, rosenbrock, {"xy": jnp.array([-0.5, 0.5])}, 6000)
    assert rosenbrock(params) < 2e-2, f"{name}: loss {rosenbrock(params)}"


# ---------------------------------------------------------------------------------
# Properties on a small network-shaped tree, with and without channel geometry


def net_params(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (4, 8), dtype), "b": jnp.zeros((8,), dtype),
            "conv": jax.random.normal(k2, (3, 3, 2, 8), dtype)}


def net_spec():
    return {"w": ChannelDims((-1,)), "b": None, "conv": ChannelDims((-1,))}


def net_grads(params, seed=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {k: jax.random.normal(key, p.shape, p.dtype)
            for key, (k, p) in zip(keys, sorted(params.items()))}


SPEC_CASES = [None, "spec"]


def spec_for(case):
    return None if case is None else net_spec()


@pytest.mark.parametrize("name", NAMES)
def test_accepts_extra_args(name):
    tx = make(name, spec=net_spec())
    params = net_params()
    state = tx.init(params)
    updates, _ = tx.update(net_grads(params), state, params, unused_extra_arg=3.0)
    chex.assert_trees_all_equal_shapes(updates, params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec_case", SPEC_CASES)
def test_no_recompilation_and_stable_state(name, spec_case):
    tx = make(name, spec=spec_for(spec_case))
    params = net_params()
    state0 = tx.init(params)

    chex.clear_trace_counter()  # the counter is keyed by code location, across test cases

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params1, state1 = step(params, state0, net_grads(params, 1))
    params2, state2 = step(params1, state1, net_grads(params, 2))
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, params2)
    chex.assert_tree_all_finite((params2, state2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_keeps_param_dtype(name, dtype):
    tx = make(name, spec=net_spec())
    params = net_params(dtype)
    state = tx.init(params)
    for seed in range(3):
        updates, state = jax.jit(tx.update)(net_grads(params, seed), state, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal_dtypes(params, net_params(dtype))
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    factory = {"sing": sing_jax.sing,
               "sing_no_lookahead": functools.partial(sing_jax.sing, lookahead_every=None),
               "adams": functools.partial(sing_jax.adams, channel_dims=net_spec()),
               "adamsrt": functools.partial(sing_jax.adamsrt, channel_dims=net_spec()),
               "sgdmrt": functools.partial(sing_jax.sgdmrt, momentum=0.9,
                                           channel_dims=net_spec()),
               "adamg": functools.partial(sing_jax.adamg, channel_dims=net_spec())}[name]
    injected = optax.inject_hyperparams(factory)(learning_rate=1e-2)
    plain = factory(learning_rate=1e-2)
    params = net_params()
    s_inj, s_plain = injected.init(params), plain.init(params)
    p_inj = p_plain = params
    for seed in range(3):
        grads = net_grads(params, seed)
        u_inj, s_inj = jax.jit(injected.update)(grads, s_inj, p_inj)
        u_plain, s_plain = plain.update(grads, s_plain, p_plain)
        p_inj, p_plain = optax.apply_updates(p_inj, u_inj), optax.apply_updates(p_plain, u_plain)
    chex.assert_trees_all_close(p_inj, p_plain, rtol=1e-6, atol=1e-6)
    # The injected learning rate is live: changing it changes the next step.
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u_zero, _ = injected.update(net_grads(params, 9), s_inj, p_inj)
    if name != "adamg":  # AdamG's renormalisation moves params even at lr 0
        assert all(float(jnp.abs(u).max()) < 1e-6 for u in jax.tree.leaves(u_zero))


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates(name):
    tx = optax.MultiSteps(make(name, spec=net_spec()), every_k_schedule=2)
    params = net_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, state = update(net_grads(params, 1), state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u1))
    u2, state = update(net_grads(params, 2), state, params)
    assert any(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(u2))
    # Two micro-batches averaged equal one step on the averaged gradient.
    direct = make(name, spec=net_spec())
    avg = jax.tree.map(lambda a, b: (a + b) / 2, net_grads(params, 1), net_grads(params, 2))
    u_direct, _ = direct.update(avg, direct.init(params), params)
    chex.assert_trees_all_close(u2, u_direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_works_on_params_sharded_over_an_8_device_mesh(name):
    assert jax.device_count() >= 8, "conftest simulates 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    params = {"w": jax.random.normal(jax.random.key(0), (8, 16)),
              "conv": jax.random.normal(jax.random.key(1), (3, 3, 8, 16)),
              "b": jnp.zeros((16,))}
    spec = {"w": ChannelDims((-1,)), "conv": ChannelDims((-1,)), "b": None}
    shardings = {"w": NamedSharding(mesh, P("data", None)),
                 "conv": NamedSharding(mesh, P(None, None, None, "data")),
                 "b": NamedSharding(mesh, P("data"))}
    tx = make(name, spec=spec)

    def run(params):
        state = tx.init(params)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for seed in range(3):
            grads = jax.tree.map(lambda p, seed=seed: jnp.sin(p * (seed + 1)), params)
            updates, state = step(params, state, grads)
            params = optax.apply_updates(params, updates)
        return params

    sharded = jax.device_put(params, shardings)
    out_sharded = run(sharded)
    out_single = run(params)
    for k in params:
        assert out_sharded[k].sharding.is_equivalent_to(shardings[k], params[k].ndim)
    chex.assert_trees_all_close(out_sharded, out_single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_non_finite_steps(name):
    """Non-finite gradients propagate (as in optax); ``optax.apply_if_finite`` skips them."""
    tx = optax.apply_if_finite(make(name, spec=net_spec()), max_consecutive_errors=3)
    params = net_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(net_grads(params, 1), state, params)
    params = optax.apply_updates(params, updates)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), net_grads(params, 2))
    updates, state_after = update(bad, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert int(state_after.notfinite_count) == 1
    chex.assert_tree_all_finite(state_after.inner_state)
    chex.assert_trees_all_equal(state_after.inner_state, state.inner_state)


@pytest.mark.parametrize("name", NAMES)
def test_learning_rate_and_weight_decay_schedules_are_honoured(name):
    factory = {"sing": sing_jax.sing, "sing_no_lookahead": functools.partial(
        sing_jax.sing, lookahead_every=None), "adams": sing_jax.adams,
        "adamsrt": sing_jax.adamsrt, "sgdmrt": sing_jax.sgdmrt, "adamg": sing_jax.adamg}[name]
    kwargs = {} if name.startswith("sing") else {"channel_dims": net_spec()}
    stop_after_3 = optax.piecewise_constant_schedule(1e-2, {3: 0.0})
    decay_until_2 = optax.piecewise_constant_schedule(1e-2, {2: 0.0})
    tx = factory(learning_rate=stop_after_3, weight_decay=decay_until_2, **kwargs)
    # Schedules for both, so that the three states have the same structure.
    same = factory(learning_rate=optax.constant_schedule(1e-2),
                   weight_decay=optax.constant_schedule(1e-2), **kwargs)
    no_decay = factory(learning_rate=optax.constant_schedule(1e-2),
                       weight_decay=optax.constant_schedule(0.0), **kwargs)
    params = net_params()
    state, state_same = tx.init(params), same.init(params)
    history = []
    update, update_same = jax.jit(tx.update), jax.jit(same.update)
    for seed in range(6):
        grads = net_grads(params, seed)
        updates, new_state = update(grads, state, params)
        if seed <= 2:  # the states still agree: compare the step each would take
            chex.assert_trees_all_close(state, state_same, rtol=1e-6, atol=1e-7)
            updates_same, state_same = update_same(grads, state_same, params)
        if seed < 2:  # both schedules at their first values: equal to the constants
            chex.assert_trees_all_close(updates, updates_same, rtol=1e-6, atol=1e-7)
        elif seed == 2:  # weight decay now off, learning rate still on
            updates_no_decay, _ = jax.jit(no_decay.update)(grads, state, params)
            # The decay term is about 1% of the step: 1e-4 separates the two cases.
            chex.assert_trees_all_close(updates, updates_no_decay, rtol=1e-4, atol=1e-7)
            assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(
                jax.tree.leaves(updates), jax.tree.leaves(updates_same)))
        state = new_state
        params = optax.apply_updates(params, updates)
        history.append(params)
    # lr = 0 from step 4 on: nothing moves (SING's Lookahead sync at step 5 still pulls
    # the weights towards the slow copy, so check before it).
    chex.assert_trees_all_close(history[3], history[2], atol=1e-6)
