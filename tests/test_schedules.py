"""Schedules: every breakpoint, the formulas written out in NumPy, PyTorch where it has one."""

import math

import numpy as np
import optax
import pytest

import sing_jax
from sing_jax import schedules


def values(schedule, steps):
    # One vectorised call: every schedule here is elementwise in the step.
    return np.asarray(schedule(np.asarray(list(steps))), np.float64)


# --- SING's two schedules ------------------------------------------------------------


def np_warmup_cosine(t, peak, total, warmup, init, end):
    if t < warmup:
        return init + (peak - init) * t / warmup
    if t >= total:
        return end
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_warmup_cosine_matches_formula_everywhere():
    s = schedules.warmup_cosine(0.1, 200, 0.05, init_value=0.01, end_value=0.001)
    ref = [np_warmup_cosine(t, 0.1, 200, 10, 0.01, 0.001) for t in range(230)]
    np.testing.assert_allclose(values(s, range(230)), ref, rtol=1e-5, atol=1e-8)
    # Breakpoints: first step, end of warmup, middle of decay, end, after.
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(10)) == pytest.approx(0.1)
    assert float(s(105)) == pytest.approx(0.001 + 0.5 * 0.099, rel=1e-5)
    assert float(s(200)) == pytest.approx(0.001)
    assert float(s(10_000)) == pytest.approx(0.001)


def test_warmup_cosine_is_reachable_from_the_package():
    assert sing_jax.schedules.warmup_cosine is schedules.warmup_cosine


def np_warmup_constant_cosine(t, peak, total, wf, cf, init=0.0, end=0.0):
    warmup, plateau_end = round(wf * total), round((wf + cf) * total)
    if t < warmup:
        return init + (peak - init) * t / warmup
    if t < plateau_end:
        return peak
    if t >= total:
        return end
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (t - plateau_end)
                                                    / (total - plateau_end)))


@pytest.mark.parametrize("wf,cf", [(0.05, 0.6), (0.1, 0.3), (0.0, 0.5), (0.2, 0.8)])
def test_warmup_constant_cosine_matches_formula(wf, cf):
    s = schedules.warmup_constant_cosine(2.0, 200, wf, cf, end_value=0.1)
    ref = [np_warmup_constant_cosine(t, 2.0, 200, wf, cf, end=0.1) for t in range(215)]
    np.testing.assert_allclose(values(s, range(215)), ref, rtol=1e-5, atol=1e-6)


def test_warmup_constant_cosine_breakpoints():
    s = schedules.warmup_constant_cosine(1.0, 100)  # warmup 5, plateau to 65, cosine to 100
    assert float(s(0)) == 0.0
    assert float(s(4)) == pytest.approx(0.8)
    assert float(s(5)) == 1.0 and float(s(64)) == 1.0
    assert float(s(65)) == 1.0
    assert float(s(66)) < 1.0
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


# --- seed 001's protocol ---------------------------------------------------------------


def test_step_decay_at_epochs_default_protocol():
    spe = 3
    s = schedules.step_decay_at_epochs(0.1, spe)
    assert schedules.SPHERICAL_BENCHMARK_DECAY_EPOCHS == (135, 225, 315)
    expect = {0: 0.1, 135 * spe - 1: 0.1, 135 * spe: 0.01, 225 * spe - 1: 0.01,
              225 * spe: 0.001, 315 * spe - 1: 0.001, 315 * spe: 1e-4, 405 * spe - 1: 1e-4}
    for step, value in expect.items():
        assert float(s(step)) == pytest.approx(value, rel=1e-5), step


def test_step_decay_matches_torch_multistep_per_epoch():
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5, 7], gamma=0.1)
    spe = 4
    ours = schedules.step_decay_at_epochs(0.1, spe, decay_epochs=(3, 5, 7))
    for epoch in range(10):
        for i in range(spe):
            assert float(ours(epoch * spe + i)) == pytest.approx(opt.param_groups[0]["lr"],
                                                                  rel=1e-5)
        opt.step()
        sched.step()


# --- seed 004's custom schedule -------------------------------------------------------


def np_damped_cosine(e, total, f=0.8, th=0.5, ramp_end=0.66):
    def c(x):
        return (1 + math.cos(math.pi * x / total)) / 2

    e1, e2 = th * total, math.floor(ramp_end * total)
    if e < e1:
        return f * c(e)
    if e < e2:
        return f * c(e1) + (c(e2) - f * c(e1)) * (e - e1) / (e2 - e1)
    return c(e)


def test_damped_cosine_per_epoch_matches_spec():
    s = schedules.damped_cosine(0.005, 300)
    ref = [0.005 * np_damped_cosine(e, 300) for e in range(301)]
    np.testing.assert_allclose(values(s, range(301)), ref, rtol=1e-5, atol=1e-9)
    # Breakpoints: start f, threshold (cosine 0.5 damped), ramp end floor(0.66*300)=198.
    assert float(s(0)) == pytest.approx(0.005 * 0.8)
    assert float(s(149)) == pytest.approx(0.005 * 0.8 * (1 + math.cos(math.pi * 149 / 300)) / 2)
    assert float(s(150)) == pytest.approx(0.005 * 0.4)
    assert float(s(198)) == pytest.approx(0.005 * (1 + math.cos(math.pi * 198 / 300)) / 2)
    assert float(s(300)) == pytest.approx(0.0, abs=1e-9)


def test_damped_cosine_per_epoch_is_constant_within_an_epoch_and_per_step_is_not():
    spe = 7
    per_epoch = schedules.damped_cosine(1.0, 20, spe)
    per_step = schedules.damped_cosine(1.0, 20, spe, per_step=True)
    steps = range(20 * spe)
    np.testing.assert_allclose(values(per_epoch, steps),
                               [np_damped_cosine(t // spe, 20) for t in steps], rtol=1e-5)
    np.testing.assert_allclose(values(per_step, steps),
                               [np_damped_cosine(t / spe, 20) for t in steps], rtol=1e-5,
                               atol=1e-7)
    assert float(per_step(3)) != float(per_step(4))


def test_damped_cosine_with_empty_ramp():
    # threshold above ramp_end: no ramp, damped cosine then cosine.
    s = schedules.damped_cosine(1.0, 10, threshold=0.9, ramp_end=0.5)
    for e in range(11):
        expect = 0.8 * (1 + math.cos(math.pi * e / 10)) / 2 if e < 9 else \
            (1 + math.cos(math.pi * e / 10)) / 2
        assert float(s(e)) == pytest.approx(expect, abs=1e-7)


# --- seed 003's list, mapped onto optax (the table of docs/recipes.md) -------------------


def torch_lrs(make_scheduler, steps, lr=0.05):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_scheduler(torch, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_table_exponential_is_optax_exponential_decay():
    ref = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), 30)
    ours = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.9)
    np.testing.assert_allclose(values(ours, range(30)), ref, rtol=1e-5)
    # Stepped per epoch: epochwise, or staircase with transition_steps = steps_per_epoch.
    spe = 5
    staircase = optax.exponential_decay(0.05, spe, 0.9, staircase=True)
    per_epoch = schedules.epochwise(ours, spe)
    np.testing.assert_allclose(values(staircase, range(150)), np.repeat(ref, spe), rtol=1e-5)
    np.testing.assert_allclose(values(per_epoch, range(150)), np.repeat(ref, spe), rtol=1e-5)


def test_table_cosine_annealing_is_optax_cosine_decay():
    ref = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=20, eta_min=0.001), 21)
    ours = optax.cosine_decay_schedule(0.05, decay_steps=20, alpha=0.001 / 0.05)
    np.testing.assert_allclose(values(ours, range(21)), ref, rtol=1e-4)


@pytest.mark.parametrize("t0,mult", [(2, 2), (5, 1), (3, 3)])
def test_table_warm_restarts_matches_torch(t0, mult):
    ref = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=t0, T_mult=mult, eta_min=0.001), 60)
    ours = schedules.cosine_warm_restarts(0.05, t0, mult, 0.001)
    np.testing.assert_allclose(values(ours, range(60)), ref, rtol=1e-4)


def test_table_linear_warmup_is_optax_linear_schedule():
    ref = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.LinearLR(
        o, start_factor=0.1, end_factor=1.0, total_iters=3), 6)
    ours = optax.linear_schedule(0.1 * 0.05, 0.05, transition_steps=3)
    np.testing.assert_allclose(values(ours, range(6)), ref, rtol=1e-5)  # .1 .4 .7 1 1 1 (x lr)


def test_table_one_cycle_breakpoints():
    # optax.cosine_onecycle_schedule: max/div -> max at pct_start*T -> max/div/final_div at T.
    s = optax.cosine_onecycle_schedule(100, 0.05, pct_start=0.3, div_factor=25.0,
                                       final_div_factor=1e4)
    assert float(s(0)) == pytest.approx(0.05 / 25)
    assert float(s(30)) == pytest.approx(0.05)
    assert float(s(100)) == pytest.approx(0.05 / 25 / 1e4, rel=1e-3)
    # Seed 003's "linear up then back down" is optax.linear_onecycle_schedule.
    lin = optax.linear_onecycle_schedule(100, 0.05, pct_start=0.3, pct_final=0.85)
    assert float(lin(15)) == pytest.approx((0.05 / 25 + 0.05) / 2, rel=1e-5)
    assert float(lin(30)) == pytest.approx(0.05)
    assert float(lin(85)) == pytest.approx(0.05 / 25, rel=1e-5)


def test_table_reduce_on_plateau_is_optax_contrib():
    # torch ReduceLROnPlateau(mode="min", patience=2, factor=0.1) on the same metrics is
    # optax's with patience=3: torch reduces after *more than* `patience` bad epochs,
    # optax after `patience` of them.
    torch = pytest.importorskip("torch")
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.8, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=2, factor=0.1,
                                                       threshold=1e-4)
    tx = optax.contrib.reduce_on_plateau(factor=0.1, patience=3, rtol=1e-4, atol=0.0)
    state = tx.init(np.zeros(1))
    for metric in metrics:
        sched.step(metric)
        _, state = tx.update(np.ones(1), state, value=metric)
        assert float(state.scale) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5)
    assert float(state.scale) == pytest.approx(1e-3)  # three reductions happened


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: schedules.warmup_cosine(1.0, 100, warmup_fraction=1.5),
    lambda: schedules.warmup_cosine(1.0, 100, warmup_fraction=-0.1),
    lambda: schedules.warmup_constant_cosine(1.0, 100, 0.05, constant_fraction=2.0),
    lambda: schedules.warmup_constant_cosine(1.0, 100, 0.5, 0.6),
    lambda: schedules.damped_cosine(1.0, 10, threshold=1.2),
    lambda: schedules.damped_cosine(1.0, 10, factor=-0.5),
    lambda: schedules.step_decay_at_epochs(1.0, 10, factor=-0.1),
    lambda: schedules.step_decay_at_epochs(1.0, 10, decay_epochs=(5, 3)),
    lambda: schedules.warmup_cosine(1.0, 0),
    lambda: schedules.cosine_warm_restarts(1.0, 0),
])
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_error_names_the_argument_and_value():
    with pytest.raises(ValueError, match=r"warmup_fraction must be in \[0, 1\], got 1.5"):
        schedules.warmup_cosine(1.0, 100, warmup_fraction=1.5)


def test_schedules_drive_an_optimizer_under_jit():
    import jax
    import jax.numpy as jnp

    tx = optax.sgd(schedules.damped_cosine(1.0, 10))
    params = jnp.ones(3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(10):
        u, state = update(jnp.ones(3), state)
        seen.append(-float(u[0]))
    np.testing.assert_allclose(seen, [np_damped_cosine(e, 10) for e in range(10)], rtol=1e-5,
                               atol=1e-7)
