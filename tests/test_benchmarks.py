"""The benchmark scripts' helpers run (on tiny trees) and time what they claim to."""

import functools
import itertools
import math

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
    assert set(seconds) == set(windows)
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
    from experiments import timing

    calls = []
    seconds = timing.interleaved_medians({name: functools.partial(calls.append, name)
                                           for name in "abc"},
                                          repeats=3, warmup_rounds=2)
    # two warm-up rounds in order, then rounds in shuffled orders (seeded)
    assert "".join(calls[:6]) == "abc" * 2
    rounds = ["".join(calls[i:i + 3]) for i in range(6, 15, 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and len(set(rounds)) > 1
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        timing.interleaved_medians({"a": lambda: None}, repeats=0)
    assert timing.copy_bandwidth(2**20, repeats=2) > 0


def test_shared_timer_averages_the_positions_of_a_periodic_call(monkeypatch):
    from experiments import timing

    # a step whose first and last positions of five are dearer, as SING's Lookahead
    durations = itertools.cycle([3.0, 1.0, 1.0, 1.0, 2.0])
    monkeypatch.setattr(timing, "seconds_of", lambda call: (call(), next(durations))[1])
    periodic = timing.interleaved_medians({"step": lambda: None}, repeats=10,
                                           warmup_rounds=0, period=5)
    assert periodic["step"] == pytest.approx(8.0 / 5)  # the average cost
    durations = itertools.cycle([3.0, 1.0, 1.0, 1.0, 2.0])
    plain = timing.interleaved_medians({"step": lambda: None}, repeats=10, warmup_rounds=0)
    assert plain["step"] == 1.0  # what a plain median says
    with pytest.raises(ValueError, match="period must be >= 1 and divide repeats"):
        timing.interleaved_medians({"step": lambda: None}, repeats=10, period=3)


def test_the_cpu_flag_of_the_benchmarks_is_added_only_where_it_is_known_and_unset():
    from experiments import xla_cpu

    flag = f"{xla_cpu.YNN_FLAG}={xla_cpu.YNN_VALUE}"
    assert xla_cpu.with_cpu_flag("", "0.10.2") == flag
    assert (xla_cpu.with_cpu_flag("--xla_force_host_platform_device_count=8", "0.10.0")
            == f"--xla_force_host_platform_device_count=8 {flag}")
    mine = f"{xla_cpu.YNN_FLAG}=reduce"
    assert xla_cpu.with_cpu_flag(mine, "0.10.2") == mine  # the user's value wins
    assert xla_cpu.with_cpu_flag("", "0.11.0") == ""  # other jaxlibs may not know it


def test_reuse_host_memory_keeps_big_blocks_in_the_heap():
    # In a child process (the setting is process-wide): before the call glibc maps a
    # 64 MiB block afresh (mallinfo2's hblkhd grows), after it the heap serves it.
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import ctypes
        from experiments.xla_cpu import reuse_host_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]

        def mapped_growth():
            before = libc.mallinfo2().hblkhd
            block = libc.malloc(64 << 20)
            grown = libc.mallinfo2().hblkhd - before
            libc.free(block)
            return grown

        first = mapped_growth()
        applied = reuse_host_memory()
        print(first >= 64 << 20, applied, mapped_growth() == 0)
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True", "True"], out


def test_update_floor_counts_each_array_once_and_lookahead_slow_weights_two_fifths():
    from experiments import timing

    params = tiny_tree()  # 72 + 4 float32 numbers
    nbytes = 4 * 76
    sgdm = optax.sgd(0.1, momentum=0.9)
    # read params, grads, momentum; write params, momentum
    assert timing.update_floor_bytes(params, sgdm.init(params)) == 5 * nbytes
    adamw = optax.adamw(1e-3)
    count_bytes = 4  # the int32 step count, read and written
    assert timing.update_floor_bytes(params, adamw.init(params)) == 7 * nbytes + 2 * count_bytes
    sing = sing_jax.sing(1e-3)
    floor = timing.update_floor_bytes(params, sing.init(params), lookahead_every=5)
    # AdamW's traffic, the slow copy read and written once per 5 steps, a few scalars
    assert 7.4 * nbytes <= floor <= 7.4 * nbytes + 64
    # AdamS keeps one second moment per output channel of a channel-wise kernel
    adams = sing_jax.adams(1e-3, channel_dims={"conv": {"kernel": sing_jax.ChannelDims((-1,))},
                                               "fc": {"bias": None}})
    assert timing.update_floor_bytes(params, adams.init(params)) < 6 * nbytes
    with pytest.raises(ValueError, match="pass lookahead_every"):
        timing.update_floor_bytes(params, sing.init(params))


def test_pytorch_twins_of_the_train_benchmark_models_have_their_parameter_counts():
    pytest.importorskip("torch")
    from flax import nnx

    from experiments import bench_train
    from sing_jax.nn import models

    def torch_count(model):
        return sum(p.numel() for p in model.parameters())

    def jax_count(build, **kwargs):  # shapes only: nothing is initialised or compiled
        return models.count_params(nnx.eval_shape(lambda: build(10, rngs=nnx.Rngs(0),
                                                                **kwargs)))

    assert torch_count(bench_train.torch_resnet20()) == 269_722 == jax_count(models.resnet20)
    assert torch_count(bench_train.torch_resnet18()) == 11_173_962 == jax_count(models.resnet18)
    assert torch_count(bench_train.torch_resnet18(width=4)) == jax_count(models.resnet18,
                                                                         width=4)
    step = bench_train.torch_train_step(bench_train.torch_resnet18(width=4), 2,
                                        optimizer="adamw")
    first, second = float(step().detach()), float(step().detach())
    assert math.isfinite(first) and second != first  # it trains


def test_tree_bytes_counts_shapes_and_arrays():
    # the singd_structures notebook sizes abstract (eval_shape) states with it
    import jax
    import numpy as np

    from experiments import timing

    tree = {"a": np.zeros((3, 4), np.float32), "b": jax.ShapeDtypeStruct((5,), np.int8),
            "c": None}
    assert timing.tree_bytes(tree) == 3 * 4 * 4 + 5
