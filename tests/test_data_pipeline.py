"""The grain pipelines: sharding, padding, shuffling, resuming, preprocessing."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
sd = pytest.importorskip("sing_jax.data")

from tests._data_helpers import session_data_dir, write_fake_cifar10  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = session_data_dir(tmp_path_factory)
    sd.get_info("digits", data_dir=path)  # builds the embedded dataset once
    return path


def _digest(image: np.ndarray) -> bytes:
    return np.asarray(image, np.float32).tobytes()


def _split_digests(data_dir, split):
    """Digest of every example of our split, read directly from TFDS (the ground truth)."""
    from sing_jax.data import pipeline

    sources = pipeline.tfds_sources("digits", str(data_dir))
    source, indices = pipeline.split_source("digits", split, sources, None)
    return collections.Counter(
        _digest(np.asarray(source[int(i)]["image"], np.float32) / 16) for i in indices
    )


def test_batch_structure_shapes_dtypes_ranges(data_dir):
    ds = sd.make_dataset("digits", 64, data_dir=data_dir, num_local_devices=4, process_count=1,
                         process_index=0)  # fmt: skip
    batch = next(iter(ds.train))
    assert batch["image"].shape == (4, 16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 16) and batch["label"].dtype == np.int32
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == np.bool_
    assert batch["mask"].all()
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].max() > 0.5 and set(np.unique(batch["label"])) <= set(range(10))
    assert ds.info.num_classes == 10 and ds.train.steps_per_epoch == 1365 // 64


@pytest.mark.parametrize(
    "num_devices,process_count", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]
)
def test_eval_covers_every_example_exactly_once(data_dir, num_devices, process_count):
    seen = collections.Counter()
    lengths = set()
    for process in range(process_count):
        pipe = sd.get_pipeline("digits", "test", 48, data_dir=data_dir,
                               process_index=process, process_count=process_count,
                               num_local_devices=num_devices)  # fmt: skip
        lengths.add(len(pipe))
        for batch in pipe:
            assert batch["image"].shape[:2] == (num_devices, 48 // process_count // num_devices)
            images = batch["image"].reshape(-1, 8, 8, 1)[batch["mask"].reshape(-1)]
            seen.update(_digest(img) for img in images)
    assert lengths == {-(-360 // 48)}  # every process steps the same number of times
    assert seen == _split_digests(data_dir, "test")
    assert sum(seen.values()) == 360


def test_validation_is_disjoint_fixed_holdout(data_dir):
    val = _split_digests(data_dir, "validation")
    train = _split_digests(data_dir, "train")
    assert sum(val.values()) == 72 and sum(train.values()) == 1365
    pipe = sd.get_pipeline("digits", "validation", 32, data_dir=data_dir, num_local_devices=1,
                           process_count=1, process_index=0)  # fmt: skip
    seen = collections.Counter()
    for batch in pipe:
        seen.update(_digest(x) for x in batch["image"][0][batch["mask"][0]])
    assert seen == val


def _take(pipe, n, it=None):
    it = iter(pipe) if it is None else it
    return [next(it) for _ in range(n)], it


def test_train_epoch_is_permutation_and_drops_remainder(data_dir):
    pipe = sd.get_pipeline("digits", "train", 100, seed=3, num_epochs=2, augment=False,
                           data_dir=data_dir, num_local_devices=2, process_count=1,
                           process_index=0)  # fmt: skip
    assert len(pipe) == 2 * 13  # 1365 // 100 per epoch
    batches = list(pipe)
    assert len(batches) == 26
    epoch0 = collections.Counter(
        _digest(x) for b in batches[:13] for x in b["image"].reshape(-1, 8, 8, 1)
    )
    train = _split_digests(data_dir, "train")
    assert sum(epoch0.values()) == 1300 and not (epoch0 - train)  # no example twice
    order0 = [b["label"] for b in batches[:13]]
    order1 = [b["label"] for b in batches[13:]]
    assert not all(np.array_equal(a, b) for a, b in zip(order0, order1))  # reshuffled


def test_keep_partial_batch_pads_the_last_batch_of_each_epoch(data_dir):
    # the seed 001 reference keeps the last partial batch: 1365 = 21 * 64 + 21
    pipe = sd.get_pipeline("digits", "train", 64, seed=3, num_epochs=2, augment=False,
                           keep_partial_batch=True, data_dir=data_dir, num_local_devices=2,
                           process_count=1, process_index=0)  # fmt: skip
    assert pipe.steps_per_epoch == 22 and len(pipe) == 44
    batches = list(pipe)
    # every batch has the same shape (a jitted step compiles once), padding is masked
    assert {b["image"].shape for b in batches} == {(2, 32, 8, 8, 1)}
    assert [int(b["mask"].sum()) for b in batches[:22]] == [64] * 21 + [21]
    assert batches[21]["mask"][0].sum() == 21 and not batches[21]["mask"][1].any()
    train = _split_digests(data_dir, "train")
    for epoch in range(2):
        seen = collections.Counter(
            _digest(x) for b in batches[22 * epoch: 22 * (epoch + 1)]
            for x in b["image"].reshape(-1, 8, 8, 1)[b["mask"].reshape(-1)])
        assert seen == train  # every example exactly once per epoch
    assert not np.array_equal(batches[0]["label"], batches[22]["label"])  # reshuffled


def test_validation_rounding_floor_is_the_references_int():
    from sing_jax.data.pipeline import split_indices

    assert len(split_indices(73257, 0.05, "floor")[1]) == 3662  # SVHN: int(3662.85)
    assert len(split_indices(73257, 0.05, "round")[1]) == 3663
    assert len(split_indices(50000, 0.05, "floor")[1]) == 2500  # CIFAR: exact either way
    with pytest.raises(ValueError, match="validation_rounding='ceil'"):
        split_indices(10, 0.5, "ceil")


def test_validation_rounding_in_the_pipeline(data_dir):
    info = sd.get_info("digits", data_dir=data_dir, validation_rounding="floor")
    assert info.num_examples["validation"] == 71 and info.num_examples["train"] == 1366
    assert sd.get_info("digits", data_dir=data_dir).num_examples["validation"] == 72


def test_augmented_validation_redraws_each_epoch(tmp_path):
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
        kw = dict(data_dir=tmp_path, num_local_devices=1, process_count=1, process_index=0)
        plain = list(sd.get_pipeline("cifar10", "validation", 8, **kw))
        augmented = sd.get_pipeline("cifar10", "validation", 8, augment_eval=True, seed=1,
                                    **kw)
        epoch0 = list(augmented.for_epoch(0))
        again = list(augmented.for_epoch(0))
        epoch1 = list(augmented.for_epoch(1))
        other_seed = list(sd.get_pipeline("cifar10", "validation", 8, augment_eval=True,
                                          seed=2, **kw).for_epoch(0))
        unaugmented = list(sd.get_pipeline("cifar10", "validation", 8, augment=False,
                                           augment_eval=True, seed=1, **kw).for_epoch(3))
    assert len(plain) == len(epoch0) == 1 and epoch0[0]["mask"].sum() == 2
    np.testing.assert_array_equal(plain[0]["label"], epoch0[0]["label"])  # the same images
    np.testing.assert_array_equal(epoch0[0]["image"], again[0]["image"])  # deterministic
    mask = epoch0[0]["mask"]
    for other in (plain, epoch1, other_seed):
        assert not np.array_equal(other[0]["image"][mask], epoch0[0]["image"][mask])
    np.testing.assert_array_equal(unaugmented[0]["image"], plain[0]["image"])


def test_two_processes_assemble_the_single_process_global_batch(data_dir):
    kw = dict(seed=5, data_dir=data_dir, augment=False)
    single, _ = _take(sd.get_pipeline("digits", "train", 64, num_local_devices=4,
                                      process_count=1, process_index=0, **kw), 3)  # fmt: skip
    parts = [
        _take(sd.get_pipeline("digits", "train", 64, num_local_devices=2, process_count=2,
                              process_index=p, **kw), 3)[0]  # fmt: skip
        for p in range(2)
    ]
    for step in range(3):
        joined = np.concatenate([parts[p][step]["image"].reshape(32, 8, 8, 1) for p in range(2)])
        np.testing.assert_array_equal(joined, single[step]["image"].reshape(64, 8, 8, 1))
        assert not np.array_equal(parts[0][step]["image"], parts[1][step]["image"])


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    kw = dict(data_dir=data_dir, num_local_devices=2, process_count=1, process_index=0)
    a, _ = _take(sd.get_pipeline("digits", "train", 32, seed=11, **kw), 4)
    b, _ = _take(sd.get_pipeline("digits", "train", 32, seed=11, **kw), 4)
    c, _ = _take(sd.get_pipeline("digits", "train", 32, seed=12, **kw), 4)
    d, _ = _take(sd.get_pipeline("digits", "train", 32, seed=11, num_threads=1,
                                 prefetch_batches=1, **kw), 4)  # fmt: skip
    for x, y in zip(a + a, b + d):  # independent of the number of read threads too
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))


def test_resume_from_iterator_state_matches_never_stopping(data_dir):
    kw = dict(seed=2, data_dir=data_dir, num_local_devices=2, process_count=1, process_index=0)
    # 1365 // 128 = 10 steps per epoch: resuming at step 8 crosses an epoch boundary
    reference, _ = _take(sd.get_pipeline("digits", "train", 128, **kw), 14)
    first, it = _take(sd.get_pipeline("digits", "train", 128, **kw), 8)
    state = it.get_state()
    del it
    state = json.loads(json.dumps(state))  # a plain JSON value: stored with the checkpoint
    resumed_it = iter(sd.get_pipeline("digits", "train", 128, **kw))
    resumed_it.set_state(state)
    resumed, _ = _take(None, 6, resumed_it)
    for x, y in zip(first + resumed, reference):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batch_split_errors_name_the_numbers(data_dir):
    with pytest.raises(ValueError, match=r"global batch size 30 .* 2 process\(es\) x 4 .* = 8"):
        sd.get_pipeline("digits", "train", 30, data_dir=data_dir, process_index=0,
                        process_count=2, num_local_devices=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"global batch size 10 .* 1 process\(es\) x 8"):
        sd.make_dataset("digits", 10, data_dir=data_dir)  # default: the 8 simulated devices
    with pytest.raises(ValueError, match="process_index must be in"):
        sd.get_pipeline("digits", "train", 8, data_dir=data_dir, process_index=2,
                        process_count=2, num_local_devices=1)  # fmt: skip
    with pytest.raises(ValueError, match="unknown split 'val'"):
        sd.get_pipeline("digits", "val", 8, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\), got 1.5"):
        sd.get_info("digits", data_dir=data_dir, validation_fraction=1.5)
    with pytest.raises(ValueError, match=r"split 'validation' of dataset 'digits' is empty"):
        sd.get_pipeline("digits", "validation", 8, data_dir=data_dir, validation_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sd.get_pipeline("digits", "validation", 128, train=True, data_dir=data_dir)


def test_default_devices_and_prefetch_to_device(data_dir):
    import jax

    ds = sd.make_dataset("digits", 16, data_dir=data_dir)
    assert jax.local_device_count() == 8
    it = sd.prefetch_to_device(iter(ds.test), size=2)
    batches = list(it)
    assert len(batches) == len(ds.test) == 23
    first = batches[0]
    assert isinstance(first["image"], jax.Array) and first["image"].shape == (8, 2, 8, 8, 1)
    assert len(first["image"].sharding.device_set) == 8
    assert sum(int(b["mask"].sum()) for b in batches) == 360


# ----------------------------------------------------------------------------- real CIFAR files


def test_cifar10_pipeline_on_real_builder(tmp_path):
    train, test = write_fake_cifar10(tmp_path / "src", n_train_per_batch=8, n_test=10)
    sd.prepare("cifar10", tmp_path / "data", source_dir=tmp_path / "src")
    mean = np.asarray(sd.augment.CIFAR10_MEAN, np.float32)
    std = np.asarray(sd.augment.CIFAR10_STD, np.float32)
    test_pipe = sd.get_pipeline("cifar10", "test", 8, data_dir=tmp_path / "data",
                                num_local_devices=2, process_count=1, process_index=0)  # fmt: skip
    raw = []
    for batch in test_pipe:
        images = (batch["image"] * std + mean) * 255
        raw += [
            ((int(lab),), np.round(img).astype(np.uint8))
            for img, lab, m in zip(images.reshape(-1, 32, 32, 3), batch["label"].ravel(),
                                   batch["mask"].ravel()) if m  # fmt: skip
        ]
    key = collections.Counter
    assert key((lab, img.tobytes()) for lab, img in raw) == key(
        (lab, img.tobytes()) for lab, img in test
    )
    train_pipe = sd.get_pipeline("cifar10", "train", 8, data_dir=tmp_path / "data",
                                 num_local_devices=2, process_count=1, process_index=0)  # fmt: skip
    assert train_pipe.info.num_examples == {"train": 38, "validation": 2, "test": 10}
    batch = next(iter(train_pipe))
    # augmented: padding zeros appear as (0 - mean) / std in some crops
    assert batch["image"].shape == (2, 4, 32, 32, 3)
    assert np.isclose(batch["image"], -mean / std).all(axis=-1).any()
    # the augmented global batch is the same when two processes each build half of it
    halves = [
        next(iter(sd.get_pipeline("cifar10", "train", 8, data_dir=tmp_path / "data",
                                  num_local_devices=1, process_count=2, process_index=p)))
        for p in range(2)
    ]  # fmt: skip
    joined = np.concatenate([h["image"][0] for h in halves])
    np.testing.assert_array_equal(joined, batch["image"].reshape(8, 32, 32, 3))


# ----------------------------------------------------------------------------- mock data


@pytest.mark.parametrize(
    "name,classes", [("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10)]
)
def test_pipelines_on_mock_data(name, classes, tmp_path):
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
        ds = sd.make_dataset(name, 16, num_local_devices=2, process_count=1, process_index=0,
                             data_dir=tmp_path)  # fmt: skip
        batch = next(iter(ds.train))
        assert batch["image"].shape == (2, 8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert ds.info.num_classes == classes and ds.info.num_examples["validation"] == 2
        if name == "svhn_cropped":  # no augmentation, no normalisation: pixels in [0, 1]
            assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        else:
            assert batch["image"].min() < -1.0
        seen = sum(int(b["mask"].sum()) for b in ds.test)
        assert seen == 40


def test_imagenet_pipeline_on_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        ds = sd.make_dataset("imagenet2012", 4, num_local_devices=2, process_count=1,
                             process_index=0, data_dir=tmp_path)  # fmt: skip
        assert ds.validation is None and ds.info.num_classes == 1000
        train = next(iter(ds.train))
        test = list(ds.test)
    assert train["image"].shape == (2, 2, 224, 224, 3) and train["image"].dtype == np.float32
    assert not np.array_equal(train["image"][0, 0], train["image"][0, 1])
    assert len(test) == 2 and sum(int(b["mask"].sum()) for b in test) == 6
    assert test[0]["image"].shape == (2, 2, 224, 224, 3)
    mean = np.asarray(sd.augment.IMAGENET_MEAN, np.float32)
    std = np.asarray(sd.augment.IMAGENET_STD, np.float32)
    pixels = test[0]["image"] * std + mean
    assert -1e-5 <= pixels.min() and pixels.max() <= 1 + 1e-5


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(data_dir):
    kw = dict(seed=4, data_dir=data_dir, num_local_devices=2, process_count=1, process_index=0)
    reference, _ = _take(sd.get_pipeline("digits", "train", 64, **kw), 5)
    pipe = sd.get_pipeline("digits", "train", 64, worker_count=1, **kw)
    it = iter(pipe)
    try:
        first = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed_it = iter(pipe)
    try:
        resumed_it.set_state(state)
        rest = [next(resumed_it) for _ in range(2)]
    finally:
        resumed_it.close()
    for x, y in zip(first + rest, reference):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    with pytest.raises(ValueError, match="worker_count must be a non-negative integer, got -1"):
        sd.get_pipeline("digits", "train", 64, worker_count=-1, **kw)


_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
import numpy as np
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import sing_jax.data as sd
pipe = sd.get_pipeline("digits", "test", 32, data_dir=sys.argv[3])  # defaults from jax
seen, shapes = [], set()
for host, dev in zip(pipe, sd.prefetch_to_device(iter(pipe), size=2)):
    shapes.add((host["image"].shape, dev["image"].shape, len(dev["image"].sharding.device_set)))
    images = host["image"].reshape(-1, 64)[host["mask"].reshape(-1)]
    seen += [img.tobytes().hex() for img in images.astype(np.float32)]
shapes = [list(map(str, s)) for s in shapes]
print(json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                  "batches": len(pipe), "seen": seen, "shapes": shapes}))
"""


@pytest.mark.slow
def test_two_real_processes_cover_the_test_set_once(data_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    # Files, not pipes: an unread full pipe would block one process while the other
    # waits for it at the distributed shutdown barrier.
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as out_f, open(err, "w") as err_f:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), f"localhost:{port}", str(i), str(data_dir)],
                stdout=out_f, stderr=err_f, env=env))  # fmt: skip
    outputs = []
    for proc, (out, err) in zip(procs, logs):
        proc.wait(timeout=240)
        assert proc.returncode == 0, err.read_text()[-3000:]
        outputs.append(json.loads(out.read_text().strip().splitlines()[-1]))
    assert sorted(o["process"] for o in outputs) == [0, 1]
    assert all(o["count"] == 2 and o["batches"] == 12 for o in outputs)  # ceil(360 / 32)
    for o in outputs:  # host (2 local devices, 8 rows each); global (4 devices) array
        assert o["shapes"] == [["(2, 8, 8, 8, 1)", "(4, 8, 8, 8, 1)", "4"]]
    seen = collections.Counter(h for o in outputs for h in o["seen"])
    expected = collections.Counter(d.hex() for d in _split_digests(data_dir, "test").elements())
    assert seen == expected


def test_index_plan_properties_for_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        procs = int(rng.integers(1, 5))
        b = procs * int(rng.integers(1, 40))
        # eval: every position once over all processes, padding masked
        steps = -(-n // b)
        seen = np.concatenate([
            pos[mask]
            for step in range(steps)
            for p in range(procs)
            for pos, mask in [sd.eval_batch_indices(step, num_examples=n, global_batch_size=b,
                                                    process_index=p, process_count=procs)]
        ])  # fmt: skip
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
        if n < b:
            continue
        # keep_partial_batch: each epoch sees every position once, padding masked
        per_epoch = -(-n // b)
        for epoch in range(2):
            plans = [sd.train_batch_plan(epoch * per_epoch + k, num_examples=n,
                                         global_batch_size=b, process_index=p,
                                         process_count=procs, seed=7, keep_partial_batch=True)
                     for k in range(per_epoch) for p in range(procs)]
            assert {len(pos) for pos, _ in plans} == {b // procs}
            real = np.concatenate([pos[mask] for pos, mask in plans])
            np.testing.assert_array_equal(np.sort(real), np.arange(n))
        # train: each epoch's batches are distinct positions, floor(n / b) * b of them
        per_epoch = n // b
        for epoch in range(2):
            rows = np.concatenate([
                sd.train_batch_indices(epoch * per_epoch + k, num_examples=n,
                                       global_batch_size=b, process_index=p,
                                       process_count=procs, seed=7)
                for k in range(per_epoch) for p in range(procs)
            ])  # fmt: skip
            assert len(rows) == per_epoch * b == len(np.unique(rows))
            assert rows.min() >= 0 and rows.max() < n
