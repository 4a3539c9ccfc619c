"""The jitted data-parallel train/eval steps: shard_map and pmap equal one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sing_jax import train
from tests._train_helpers import TinyConvNet, tiny_batch

# 4 devices vs 1: float32 reductions in a different order (per-shard sums, then psum).
RTOL, ATOL = 1e-5, 1e-6


def _run(parallel, num_devices, steps=4, sync=True, tx=None, compute_dtype=None):
    model = TinyConvNet(rngs=nnx.Rngs(0))
    train.set_batch_norm_axis(model, sync)
    tx = tx or optax.sgd(0.1, momentum=0.9)
    state = train.TrainState.create(model, tx, rng=0)
    mesh = train.data_mesh(jax.devices()[:num_devices])
    step = train.make_train_step(tx, parallel=parallel, mesh=mesh,
                                 options=train.StepOptions(sync_batch_stats=sync,
                                                           compute_dtype=compute_dtype))
    state = step.place_state(state)
    history = []
    for i in range(steps):
        state, metrics = step(state, tiny_batch(seed=i))
        history.append(train.to_host(metrics))
    return train.to_host(state.arrays()), history


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_four_devices_equal_one_device(parallel):
    one, one_hist = _run("shard_map", 1)
    four, four_hist = _run(parallel, 4)
    _assert_trees_close(one, four)
    _assert_trees_close(one_hist, four_hist)
    # The state moved: a broken step that returns its input would pass the above.
    assert int(four["step"]) == 4
    assert not np.allclose(four["model_state"]["norm"]["mean"], 0.0)
    assert float(four["epoch_metrics"]["count"]) == 4 * 16


def test_unsynced_batch_norm_differs_and_stays_replicated():
    synced, _ = _run("shard_map", 4, sync=True)
    local, _ = _run("shard_map", 4, sync=False)
    assert not np.allclose(synced["params"]["conv"]["kernel"],
                           local["params"]["conv"]["kernel"], atol=1e-6)
    assert np.all(np.isfinite(local["model_state"]["norm"]["var"]))


def test_step_matches_hand_written_sgd():
    model = TinyConvNet(rngs=nnx.Rngs(1))
    tx = optax.sgd(0.05)
    batch = tiny_batch(seed=3)
    # The reference: a plain NNX gradient outside any mapped axis (BatchNorm unsynced).
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(batch["image"]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    expected_loss = float(loss(params))
    expected = jax.tree.map(lambda p, g: np.asarray(p - 0.05 * g), params, jax.grad(loss)(params))

    train.set_batch_norm_axis(model)
    state = train.TrainState.create(model, tx, rng=0)
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:1]))
    new_state, metrics = step(step.place_state(state), batch)
    _assert_trees_close(train.to_host(new_state.params), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)


def test_donated_state_buffers_are_consumed():
    tx = optax.adam(1e-2)
    state = train.TrainState.create(TinyConvNet(rngs=nnx.Rngs(0)), tx, rng=0)
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:2]))
    state = step.place_state(state)
    old_kernel = state.params["conv"]["kernel"]
    state, _ = step(state, tiny_batch())
    assert old_kernel.is_deleted()
    assert not state.params["conv"]["kernel"].is_deleted()


def test_bf16_compute_keeps_float32_master_weights():
    one, hist = _run("shard_map", 2, compute_dtype=jnp.bfloat16)
    ref, ref_hist = _run("shard_map", 2)
    assert one["params"]["conv"]["kernel"].dtype == np.float32
    assert one["model_state"]["norm"]["mean"].dtype == np.float32
    # bf16 has ~3 significant digits: close to float32, not equal.
    np.testing.assert_allclose(hist[0]["loss"], ref_hist[0]["loss"], rtol=2e-2)
    assert not np.array_equal(one["params"]["conv"]["kernel"], ref["params"]["conv"]["kernel"])


def test_eval_step_ignores_masked_padding():
    tx = optax.sgd(0.1)
    state = train.TrainState.create(TinyConvNet(rngs=nnx.Rngs(0)), tx, rng=0)
    mesh = train.data_mesh(jax.devices()[:4])
    eval_step = train.make_eval_step(mesh=mesh)
    state = eval_step.place_state(state)
    batch = tiny_batch(n=12)
    padded = {k: np.concatenate([v, v[:4]]) for k, v in batch.items()}
    padded["mask"] = np.r_[np.ones(12), np.zeros(4)].astype(np.float32)
    full = train.to_host(eval_step(state, {**batch, "mask": np.ones(12, np.float32)}))
    sums = train.to_host(eval_step(state, padded))
    assert float(sums["count"]) == 12.0
    np.testing.assert_allclose(sums["loss_sum"], full["loss_sum"], rtol=1e-5)


class _MaskedBatchNormNet(nnx.Module):
    """conv -> sing_jax BatchNorm (PyTorch's running variance) -> relu -> pool -> dense."""

    def __init__(self, rngs: nnx.Rngs):
        from sing_jax import nn as snn

        self.conv = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.norm = snn.make_norm("batch", 4, rngs=rngs, unbiased_running_var=True)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def test_padded_partial_batch_equals_the_real_examples_alone_and_does_not_recompile():
    import jax.monitoring

    tx = optax.sgd(0.1, momentum=0.9)
    full, partial = tiny_batch(n=16, seed=0), tiny_batch(n=7, seed=1)
    full["mask"] = np.ones(16, bool)  # as sing_jax.data yields every batch
    # 16 rows over 4 devices: the 7 real ones land 4, 3, 0, 0 per device
    padded = {k: np.concatenate([v, v[np.arange(9) % 7]]) for k, v in partial.items()}
    padded["mask"] = np.arange(16) < 7

    def run(num_devices, batches):
        model = _MaskedBatchNormNet(nnx.Rngs(0))
        train.set_batch_norm_axis(model)
        state = train.TrainState.create(model, tx, rng=0)
        step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:num_devices]),
                                     options=train.StepOptions(masked_batch_stats=True))
        state = step.place_state(state)
        history, compiles = [], []

        def listen(name, *args, **kwargs):
            if name.endswith("backend_compile_duration"):
                compiles.append(name)

        for i, batch in enumerate(batches):
            if i == 1:
                jax.monitoring.register_event_duration_secs_listener(listen)
            try:
                state, metrics = step(state, batch)
                history.append(train.to_host(metrics))
            finally:
                if i == 1:
                    jax.monitoring.unregister_event_duration_listener(listen)
        return train.to_host(state.arrays()), history, compiles

    ours, ours_hist, compiles = run(4, [full, padded])
    alone, alone_hist, _ = run(1, [full, partial])
    assert compiles == []  # the padded batch has the full batch's shape: no new program
    _assert_trees_close(alone, ours)
    _assert_trees_close(alone_hist, ours_hist)
    assert float(ours["epoch_metrics"]["count"]) == 16 + 7
    # without the mask the padding would move the statistics and the loss
    unmasked = {k: v for k, v in padded.items() if k != "mask"}
    wrong, _, _ = run(4, [full, unmasked])
    assert not np.allclose(wrong["model_state"]["norm"]["var"],
                           alone["model_state"]["norm"]["var"], rtol=1e-3)


def test_batch_not_divisible_over_devices_names_numbers():
    tx = optax.sgd(0.1)
    state = train.TrainState.create(TinyConvNet(rngs=nnx.Rngs(0)), tx, rng=0)
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:4]))
    with pytest.raises(ValueError, match=r"batch_size=10 does not divide over 4 devices"):
        step(step.place_state(state), tiny_batch(n=10))


def test_unknown_parallel_mode():
    with pytest.raises(ValueError, match="parallel='vmap'"):
        train.make_train_step(optax.sgd(0.1), parallel="vmap")


def test_singd_step_four_devices_equal_one_device():
    import sing_jax

    def run(num_devices):
        model = TinyConvNet(rngs=nnx.Rngs(0))
        train.set_batch_norm_axis(model)
        tx = sing_jax.singd(learning_rate=0.05, T=2, structures=("dense", "diagonal"))
        state = train.TrainState.create(model, tx, rng=0)
        step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:num_devices]),
                                     options=train.StepOptions(singd=True))
        state = step.place_state(state)
        hist = []
        for i in range(3):
            state, metrics = step(state, tiny_batch(seed=i))
            hist.append(train.to_host(metrics))
        return train.to_host(state.arrays()), hist

    one, one_hist = run(1)
    four, four_hist = run(4)
    _assert_trees_close(one_hist, four_hist)
    _assert_trees_close(one, four, rtol=1e-4, atol=1e-5)
    assert float(four["epoch_metrics"]["count"]) == 3 * 16


def test_mixup_cutmix_in_the_step_trains_on_soft_labels():
    def run(mixing):
        tx = optax.sgd(0.1)
        state = train.TrainState.create(TinyConvNet(rngs=nnx.Rngs(0)), tx, rng=0)
        step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:2]),
                                     options=train.StepOptions(mixing=mixing))
        _, metrics = step(step.place_state(state), tiny_batch())
        return float(metrics["loss"])

    plain = run(None)
    mixed = run((3, 0.0, 1.0, 0.1))  # CutMix only, smoothed soft labels
    assert np.isfinite(mixed) and abs(mixed - plain) > 1e-3
