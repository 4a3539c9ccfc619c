"""Per-leaf norms and spherical effective learning rates against NumPy; the rising-norm check."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax import ChannelDims


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4))},
              "dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    spec = {"conv": {"kernel": ChannelDims((-1,))},
            "dense": {"kernel": ChannelDims(()), "bias": None}}
    return params, spec


def test_metrics_match_numpy_under_jit_for_several_steps():
    params, spec = make_problem()
    schedule = optax.linear_schedule(0.1, 0.02, 4)
    tx = sing_jax.with_diagnostics(optax.adam(schedule), learning_rate=schedule,
                                   channel_dims=spec)
    reference_tx = optax.adam(schedule)
    state, ref_state = tx.init(params), reference_tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             params)
        updates, state = update(grads, state, params)
        ref_updates, ref_state = reference_tx.update(grads, ref_state, params)
        # The wrapped optimizer's updates are untouched.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), updates,
                     ref_updates)
        metrics = sing_jax.diagnostics_metrics(state)
        lr = 0.1 + (0.02 - 0.1) * min(step, 4) / 4
        assert float(metrics["learning_rate"]) == pytest.approx(lr, rel=1e-6)
        for name, g, u, p in (("conv/kernel", grads["conv"]["kernel"],
                               updates["conv"]["kernel"], params["conv"]["kernel"]),
                              ("dense/kernel", grads["dense"]["kernel"],
                               updates["dense"]["kernel"], params["dense"]["kernel"]),
                              ("dense/bias", grads["dense"]["bias"],
                               updates["dense"]["bias"], params["dense"]["bias"])):
            g, u, p = (np.asarray(a, np.float64) for a in (g, u, p))
            np.testing.assert_allclose(metrics[f"grad_norm/{name}"], np.linalg.norm(g),
                                       rtol=1e-5)
            np.testing.assert_allclose(metrics[f"update_norm/{name}"], np.linalg.norm(u),
                                       rtol=1e-5)
            np.testing.assert_allclose(metrics[f"param_norm/{name}"], np.linalg.norm(p),
                                       rtol=1e-5)
        conv = np.asarray(params["conv"]["kernel"], np.float64)
        np.testing.assert_allclose(metrics["effective_lr/conv/kernel"],
                                   np.mean(lr / np.sum(conv ** 2, axis=(0, 1, 2))), rtol=1e-5)
        dense = np.asarray(params["dense"]["kernel"], np.float64)
        np.testing.assert_allclose(metrics["effective_lr/dense/kernel"],
                                   lr / np.sum(dense ** 2), rtol=1e-5)
        assert "effective_lr/dense/bias" not in metrics  # Euclidean leaf
        all_grads = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        np.testing.assert_allclose(metrics["grad_norm/global"], np.linalg.norm(all_grads),
                                   rtol=1e-5)
        params = optax.apply_updates(params, updates)
    assert int(state.count) == 5


def test_without_learning_rate_no_effective_lr_is_recorded():
    params, spec = make_problem()
    tx = sing_jax.with_diagnostics(optax.sgd(0.1), channel_dims=spec)
    _, state = tx.update(params, tx.init(params), params)
    metrics = sing_jax.diagnostics_metrics(state)
    assert not any(k.startswith("effective_lr/") for k in metrics)
    # SGD: the update norm is lr times the gradient norm.
    np.testing.assert_allclose(metrics["update_norm/dense/kernel"],
                               0.1 * metrics["grad_norm/dense/kernel"], rtol=1e-6)


def test_metric_selection_records_only_the_chosen_fields():
    params, spec = make_problem()
    tx = sing_jax.with_diagnostics(optax.sgd(0.1), learning_rate=0.1, channel_dims=spec,
                                   metrics=("grad_norm", "effective_lr"))
    _, state = tx.update(params, tx.init(params), params)
    fields = {k.split("/")[0] for k in sing_jax.diagnostics_metrics(state)}
    assert fields == {"grad_norm", "effective_lr", "learning_rate"}
    assert state.update_norm == {} and state.param_norm == {}
    with pytest.raises(ValueError, match=r"unknown metrics \['grad_norms'\]"):
        sing_jax.with_diagnostics(optax.sgd(0.1), metrics=("grad_norms",))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def test_with_nnx_optimizer_and_a_spec_built_on_the_nnx_state():
    model = Net(nnx.Rngs(0))
    spec = sing_jax.channel_dims_from_rules(nnx.state(model, nnx.Param),
                                            [(r"conv/kernel", ChannelDims((-1,)))])
    tx = sing_jax.with_diagnostics(optax.sgd(0.05), learning_rate=0.05, channel_dims=spec)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=6))

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(loss_fn)(model)
        kernel_before = model.conv.kernel[...]
        optimizer.update(model, grads)
        return grads, kernel_before, sing_jax.diagnostics_metrics(optimizer.opt_state)

    grads, kernel, metrics = step(model, optimizer)
    np.testing.assert_allclose(metrics["grad_norm/conv/kernel"],
                               np.linalg.norm(np.asarray(grads["conv"]["kernel"][...])),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["effective_lr/conv/kernel"],
                               np.mean(0.05 / np.sum(np.asarray(kernel) ** 2, axis=(0, 1, 2))),
                               rtol=1e-5)
    assert set(k for k in metrics if k.startswith("effective_lr/")) == {
        "effective_lr/conv/kernel"}
    # Outside jit too, from the optimizer's Variables.
    assert set(sing_jax.diagnostics_metrics(optimizer.opt_state)) == set(metrics)


def test_diagnostics_metrics_needs_a_wrapped_optimizer():
    params, _ = make_problem()
    with pytest.raises(ValueError, match="no DiagnosticsState"):
        sing_jax.diagnostics_metrics(optax.adam(1e-3).init(params))
    tx = sing_jax.with_diagnostics(optax.sgd(0.1))
    with pytest.raises(ValueError, match="update needs params"):
        tx.update(params, tx.init(params))


# --- SING's advice: rising gradient norm while the loss falls -----------------------------


def synthetic_window(steps=50, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    losses = 2.0 * np.exp(-t / 30) + 0.02 * rng.normal(size=steps)
    norms = {
        "blocks/0/ln1/scale": np.exp(t / 40) * (1 + 0.05 * rng.normal(size=steps)),
        "blocks/0/mlp/kernel": 1.0 + 0.05 * rng.normal(size=steps),
        "head/kernel": np.exp(-t / 50),
    }
    return losses, norms


def test_find_rising_grad_norms_flags_only_the_rising_leaf():
    losses, norms = synthetic_window()
    report = sing_jax.find_rising_grad_norms(losses, norms, min_rise=0.2)
    assert report.leaves == ("blocks/0/ln1/scale",)
    assert report.rise["blocks/0/ln1/scale"] == pytest.approx(np.expm1(49 / 40), rel=0.1)
    assert report.loss_change < -0.5
    assert "blocks/0/ln1/scale" in report.message and "freeze" in report.message
    # The same leaves while the loss rises: nothing is flagged.
    rising = sing_jax.find_rising_grad_norms(losses[::-1], norms)
    assert rising.leaves == () and "did not fall" in rising.message


def test_grad_norm_monitor_keeps_a_window_and_reads_diagnostics_metrics():
    losses, norms = synthetic_window(steps=80)
    monitor = sing_jax.GradNormMonitor(window=30)
    for i, loss in enumerate(losses):
        metrics = {f"grad_norm/{k}": v[i] for k, v in norms.items()}
        metrics["grad_norm/global"] = 1.0
        monitor.record(loss, metrics)
    assert monitor.full and len(monitor.losses) == 30
    np.testing.assert_allclose(monitor.grad_norms["head/kernel"], norms["head/kernel"][-30:])
    assert monitor.check().leaves == ("blocks/0/ln1/scale",)
    with pytest.warns(UserWarning, match=r"blocks/0/ln1/scale: \+\d+%"):
        monitor.check(warn=True)

    # With real metrics: linear regression trained with SGD, nothing rises.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    y = x @ jnp.array([1.0, -2.0, 0.5])
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    tx = sing_jax.with_diagnostics(optax.sgd(0.1))
    state = tx.init(params)
    monitor = sing_jax.GradNormMonitor(window=10)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(10):
        params, state, loss = step(params, state)
        monitor.record(float(loss), sing_jax.diagnostics_metrics(state))
    assert set(monitor.grad_norms) == {"w", "b"}
    report = monitor.check()
    assert report.leaves == () and report.loss_change < 0 and report.rise["w"] < 0


@pytest.mark.parametrize("call,match", [
    (lambda: sing_jax.find_rising_grad_norms([1.0, 0.9], {"a": [1.0, 2.0]}),
     r"3 or more losses"),
    (lambda: sing_jax.find_rising_grad_norms([1.0, 0.9, 0.8], {"ln/scale": [1.0, 2.0]}),
     r"ln/scale has \(2,\) gradient norms for \(3,\) losses"),
    (lambda: sing_jax.find_rising_grad_norms([1.0, 0.9, 0.8], {}, min_rise=0.0),
     r"min_rise must be > 0"),
    (lambda: sing_jax.GradNormMonitor(window=2), r"window must be an int >= 3"),
    (lambda: sing_jax.GradNormMonitor().record(1.0, {"loss": 1.0}), r"no 'grad_norm/<path>'"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
