"""The benchmark scripts' helpers run (on tiny trees) and time what they claim to."""

import functools
import itertools

import jax.numpy as jnp
import optax
import pytest

import sing_jax
from experiments import bench_optimizers


def tiny_tree():
    return {"conv": {"kernel": jnp.ones((3, 3, 2, 4)) * 0.1}, "fc": {"bias": jnp.zeros(4)}}


def test_bench_optimizers_times_ours_and_the_baseline_side_by_side():
    params = tiny_tree()
    grads = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 1e-2)}, "fc": {"bias": jnp.ones(4)}}
    spec = bench_optimizers.conv_channel_dims(
        {"layer1_0_conv1": params["conv"], "fc": params["fc"]})
    assert spec["layer1_0_conv1"]["kernel"] == sing_jax.ChannelDims((-1,))
    runs = {"ours": bench_optimizers.optimizer_run(
                sing_jax.sgdmrt(0.1, momentum=0.9, channel_dims=sing_jax.ChannelDims((-1,))),
                params, grads),
            "base": bench_optimizers.optimizer_run(optax.sgd(0.1, momentum=0.9), params,
                                                   grads),
            "reductions": bench_optimizers.rt_inner_products_run(params, grads)}
    ms = bench_optimizers.interleaved_medians(runs, repeats=bench_optimizers.LOOKAHEAD_CYCLE)
    assert set(ms) == set(runs) and all(v > 0 for v in ms.values())
    assert len(bench_optimizers.optimizer_pairs()) == 5


def test_bench_singd_times_ours_sgd_and_pytorch_interleaved():
    from experiments import bench_singd

    calls = []
    windows = {"ours": bench_singd.ours_window("mlp", "diagonal", 1, steps=1)[0],
               "sgd": bench_singd.sgd_window("mlp", steps=1)}
    windows = {name: (lambda w=w, name=name: (calls.append(name), w())[1], 1)
               for name, w in windows.items()}
    torch_one = bench_singd.torch_step("mlp", "diagonal", T=1)
    if torch_one is not None:
        windows["torch"] = (bench_singd.torch_window(torch_one, 1), 1)
    seconds = bench_singd.seconds_per_step(windows, repeats=2)
    assert set(seconds) == set(windows) and all(v > 0 for v in seconds.values())
    # one warm-up window each, then two rounds that time each once (shuffled orders)
    assert calls[:2] == ["ours", "sgd"] and sorted(calls[2:4]) == sorted(calls[4:]) == [
        "ours", "sgd"]


def test_bench_singd_pieces_time_every_registered_layer():
    from experiments import bench_singd

    rows = bench_singd.layer_piece_times("mlp", "block_diagonal", repeats=1)
    assert [(path, dim_k, dim_c) for path, dim_k, dim_c, _ in rows] == [
        ("l1", 785, 1024), ("l2", 1025, 1024), ("l3", 1025, 10)]
    for *_, ms in rows:
        assert set(ms) == {"curvature", "natural gradient"}
        assert all(v > 0 for v in ms.values())


def test_shared_timer_interleaves_after_its_warmup_rounds_and_rejects_no_repeats():
    from experiments import _timing

    calls = []
    seconds = _timing.interleaved_medians({name: functools.partial(calls.append, name)
                                           for name in "abc"},
                                          repeats=3, warmup_rounds=2)
    # two warm-up rounds in order, then rounds in shuffled orders (seeded)
    assert "".join(calls[:6]) == "abc" * 2
    rounds = ["".join(calls[i:i + 3]) for i in range(6, 15, 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and len(set(rounds)) > 1
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        _timing.interleaved_medians({"a": lambda: None}, repeats=0)
    assert _timing.copy_bandwidth(2**20, repeats=2) > 0


def test_shared_timer_averages_the_positions_of_a_periodic_call(monkeypatch):
    from experiments import _timing

    # a step whose first and last positions of five are dearer, as SING's Lookahead
    durations = itertools.cycle([3.0, 1.0, 1.0, 1.0, 2.0])
    monkeypatch.setattr(_timing, "seconds_of", lambda call: (call(), next(durations))[1])
    periodic = _timing.interleaved_medians({"step": lambda: None}, repeats=10,
                                           warmup_rounds=0, period=5)
    assert periodic["step"] == pytest.approx(8.0 / 5)  # the average cost
    durations = itertools.cycle([3.0, 1.0, 1.0, 1.0, 2.0])
    plain = _timing.interleaved_medians({"step": lambda: None}, repeats=10, warmup_rounds=0)
    assert plain["step"] == 1.0  # what a plain median says
    with pytest.raises(ValueError, match="period must be >= 1 and divide repeats"):
        _timing.interleaved_medians({"step": lambda: None}, repeats=10, period=3)


def test_the_cpu_flag_of_the_benchmarks_is_added_only_where_it_is_known_and_unset():
    from experiments import _xla_cpu

    flag = f"{_xla_cpu.YNN_FLAG}={_xla_cpu.YNN_VALUE}"
    assert _xla_cpu.with_cpu_flag("", "0.10.2") == flag
    assert (_xla_cpu.with_cpu_flag("--xla_force_host_platform_device_count=8", "0.10.0")
            == f"--xla_force_host_platform_device_count=8 {flag}")
    mine = f"{_xla_cpu.YNN_FLAG}=reduce"
    assert _xla_cpu.with_cpu_flag(mine, "0.10.2") == mine  # the user's value wins
    assert _xla_cpu.with_cpu_flag("", "0.11.0") == ""  # other jaxlibs may not know it
