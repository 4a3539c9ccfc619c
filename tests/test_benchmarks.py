"""The benchmark scripts' helpers run (on tiny trees) and time what they claim to."""

import jax.numpy as jnp
import optax

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
    ms = bench_optimizers.interleaved_medians(runs, repeats=2)
    assert set(ms) == set(runs) and all(v > 0 for v in ms.values())
    assert len(bench_optimizers.optimizer_pairs()) == 5
