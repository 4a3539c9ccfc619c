"""Shared helpers of the data tests: a session data dir and fake native source files."""

from __future__ import annotations

import pathlib

import numpy as np


def session_data_dir(tmp_path_factory) -> pathlib.Path:
    """One TFDS data dir per test session (per xdist worker), never the user's home."""
    path = tmp_path_factory.getbasetemp() / "tfds_data"
    path.mkdir(exist_ok=True)
    return path


def _cifar_records(rng, n: int, label_counts: tuple[int, ...]) -> tuple[bytes, list]:
    labels = np.stack([rng.integers(0, c, size=n) for c in label_counts], 1).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    raw = np.concatenate([labels, images.reshape(n, -1)], 1).tobytes()
    # (labels, HWC image) as the CIFAR readers decode them
    return raw, [(tuple(lab), img.transpose(1, 2, 0)) for lab, img in zip(labels, images)]


def write_fake_cifar10(root: pathlib.Path, n_train_per_batch: int = 6, n_test: int = 7):
    """The extracted ``cifar-10-batches-bin/`` layout of the real archive."""
    rng = np.random.default_rng(10)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for i in range(1, 6):
        raw, recs = _cifar_records(rng, n_train_per_batch, (10,))
        (d / f"data_batch_{i}.bin").write_bytes(raw)
        train += recs
    raw, test = _cifar_records(rng, n_test, (10,))
    (d / "test_batch.bin").write_bytes(raw)
    (d / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return train, test


def write_fake_cifar100_archive(root: pathlib.Path, n_train: int = 25, n_test: int = 9):
    """The real ``cifar-100-binary.tar.gz`` layout (coarse label, fine label, image)."""
    import io
    import tarfile

    rng = np.random.default_rng(100)
    raw_train, train = _cifar_records(rng, n_train, (20, 100))
    raw_test, test = _cifar_records(rng, n_test, (20, 100))
    files = {
        "cifar-100-binary/train.bin": raw_train,
        "cifar-100-binary/test.bin": raw_test,
        "cifar-100-binary/coarse_label_names.txt": "\n".join(f"c{i}" for i in range(20)).encode(),
        "cifar-100-binary/fine_label_names.txt": "\n".join(f"f{i}" for i in range(100)).encode(),
    }
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-100-binary.tar.gz", "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return train, test


def write_fake_svhn(root: pathlib.Path, sizes=(("train", 11), ("test", 5), ("extra", 3))):
    """``{split}_32x32.mat`` files: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10."""
    import scipy.io

    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in sizes:
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = [(int(y[i, 0]) % 10, x[..., i]) for i in range(n)]
    return out


def write_fake_imagenet_manual_dir(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """``ILSVRC2012_img_train.tar`` (a tar of per-synset tars) and ``ILSVRC2012_img_val.tar``.

    Includes one of ImageNet's CMYK JPEGs and its PNG-in-disguise, under their real
    names, so the builder's colour/format fixes run. Returns file name -> (height, width).
    """
    import io
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(2012)
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}

    def encoded(name, h, w, mode="RGB", fmt="JPEG"):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
        sizes[name] = (h, w)
        return buffer.getvalue()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    members = {
        "n01440764": [("n01440764_0.JPEG", 40, 52, "RGB", "JPEG"),
                      ("n02105855_2933.JPEG", 30, 33, "RGB", "PNG")],
        "n01443537": [("n01443537_0.JPEG", 47, 50, "RGB", "JPEG"),
                      ("n01739381_1309.JPEG", 36, 41, "CMYK", "JPEG")],
    }  # fmt: skip
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset, files in members.items():
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for name, h, w, mode, fmt in files:
                    add(inner, name, encoded(name, h, w, mode, fmt))
            add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 4):
            name = f"ILSVRC2012_val_{i:08d}.JPEG"
            add(val, name, encoded(name, 60, 45 + i))
    return sizes
