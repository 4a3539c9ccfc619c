"""The TFDS builders: the embedded ones for real, CIFAR-10/100 and SVHN from local files."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
sd = pytest.importorskip("sing_jax.data")

from tests._data_helpers import (  # noqa: E402
    session_data_dir,
    write_fake_cifar10,
    write_fake_cifar100_archive,
    write_fake_imagenet_manual_dir,
    write_fake_svhn,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return session_data_dir(tmp_path_factory)


def _as_multiset(pairs):
    return collections.Counter((label, img.tobytes()) for label, img in pairs)


def test_digits_builder(data_dir):
    from sklearn.datasets import load_digits

    info = sd.get_info("digits", data_dir=data_dir)  # builds on first use
    sources = tfds.data_source("digits", data_dir=data_dir)
    assert (len(sources["train"]), len(sources["test"])) == (1437, 360)
    assert info.num_examples == {"train": 1365, "validation": 72, "test": 360}
    assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
    ex = sources["train"][0]
    assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
    # train + test is exactly scikit-learn's bundled set, each image once
    bunch = load_digits()
    expected = _as_multiset(zip(bunch.target.tolist(), bunch.images.astype(np.uint8)[..., None]))
    got = _as_multiset(
        (int(s[i]["label"]), s[i]["image"]) for s in sources.values() for i in range(len(s))
    )
    assert got == expected
    test_labels = np.bincount([int(sources["test"][i]["label"]) for i in range(360)], minlength=10)
    assert test_labels.min() >= 35  # stratified: ~36 per class
    assert "tensorflow" not in sys.modules


def test_mnist1d_builder_matches_generator(data_dir):
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    sd.get_info("mnist1d", data_dir=data_dir)
    assert np.random.random() == before  # building leaves the global NumPy RNG alone
    sources = tfds.data_source("mnist1d", data_dir=data_dir)
    assert (len(sources["train"]), len(sources["test"])) == (4000, 1000)
    ref = make_dataset(get_dataset_args())
    got = {i: sources["test"][i] for i in range(len(sources["test"]))}
    got_x = np.stack([got[i]["image"][:, 0] for i in range(1000)])
    got_y = np.asarray([got[i]["label"] for i in range(1000)])
    assert got_x.dtype == np.float32 and got[0]["image"].shape == (40, 1)
    # the same rows as the generator's test split (TFDS stores them in its own order)
    order = np.lexsort(got_x.T[::-1])
    ref_order = np.lexsort(ref["x_test"].astype(np.float32).T[::-1])
    np.testing.assert_array_equal(got_x[order], ref["x_test"].astype(np.float32)[ref_order])
    np.testing.assert_array_equal(got_y[order], ref["y_test"][ref_order])


def test_cifar10_real_builder_from_local_files(data_dir, tmp_path):
    train, test = write_fake_cifar10(tmp_path / "src")
    sd.prepare("cifar10", data_dir, source_dir=tmp_path / "src")
    sources = tfds.data_source("cifar10", data_dir=data_dir)
    for split, expected in (("train", train), ("test", test)):
        src = sources[split]
        got = [((int(src[i]["label"]),), src[i]["image"]) for i in range(len(src))]
        assert _as_multiset(got) == _as_multiset(expected)
    assert tfds.builder("cifar10", data_dir=data_dir).info.features["label"].names[3] == "class3"
    assert "tensorflow" not in sys.modules


def test_cifar100_real_builder_from_archive(data_dir, tmp_path):
    train, test = write_fake_cifar100_archive(tmp_path / "src")
    sd.prepare("cifar100", data_dir, source_dir=tmp_path / "src")
    sources = tfds.data_source("cifar100", data_dir=data_dir)
    for split, expected in (("train", train), ("test", test)):
        src = sources[split]
        got = [
            ((int(src[i]["coarse_label"]), int(src[i]["label"])), src[i]["image"])
            for i in range(len(src))
        ]
        assert _as_multiset(got) == _as_multiset(expected)
    info = sd.get_info("cifar100", data_dir=data_dir)
    assert info.num_classes == 100 and info.num_examples["train"] + info.num_examples[
        "validation"] == 25  # fmt: skip


def test_svhn_real_builder_from_mat_files(data_dir, tmp_path):
    expected = write_fake_svhn(tmp_path / "src")
    sd.prepare("svhn_cropped", data_dir, source_dir=tmp_path / "src")
    sources = tfds.data_source("svhn_cropped", data_dir=data_dir)
    for split in ("train", "test", "extra"):
        src = sources[split]
        got = [(int(src[i]["label"]), src[i]["image"]) for i in range(len(src))]
        assert _as_multiset(got) == _as_multiset(expected[split])


def test_imagenet_real_builder_from_manual_dir(tmp_path):
    sizes = write_fake_imagenet_manual_dir(tmp_path / "manual")
    sd.prepare("imagenet2012", tmp_path / "data", manual_dir=tmp_path / "manual")
    sources = tfds.data_source("imagenet2012", data_dir=tmp_path / "data")
    assert (len(sources["train"]), len(sources["validation"])) == (4, 3)
    labels = {}
    for split in ("train", "validation"):
        for i in range(len(sources[split])):
            ex = sources[split][i]
            name = ex["file_name"].decode() if isinstance(ex["file_name"], bytes) else ex[
                "file_name"]  # fmt: skip
            # CMYK and PNG sources come out as 3-channel RGB of the original size
            assert ex["image"].shape == (*sizes[name], 3) and ex["image"].dtype == np.uint8
            labels[name] = int(ex["label"])
    assert labels["n01440764_0.JPEG"] == labels["n02105855_2933.JPEG"] == 0  # synset order
    assert labels["n01443537_0.JPEG"] == labels["n01739381_1309.JPEG"] == 1
    assert "tensorflow" not in sys.modules
    pipe = sd.get_pipeline("imagenet2012", "test", 2, data_dir=tmp_path / "data",
                           num_local_devices=1, process_count=1, process_index=0)  # fmt: skip
    batches = list(pipe)
    assert [b["mask"].sum() for b in batches] == [2, 1]
    assert batches[0]["image"].shape == (1, 2, 224, 224, 3)


def test_unknown_dataset_lists_valid_names(data_dir):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*cifar10.*digits.*mnist1d"):
        sd.make_dataset("cifar11", 8, data_dir=data_dir)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build cifar10.*source_dir"):
        sd.get_pipeline("cifar10", "train", 8, data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"manual_dir='MANUAL'"):
        sd.get_pipeline("imagenet2012", "test", 8, data_dir=tmp_path / "empty")


def test_prepare_missing_source_file_names_it(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        sd.prepare("svhn_cropped", tmp_path / "data", source_dir=tmp_path / "src")
