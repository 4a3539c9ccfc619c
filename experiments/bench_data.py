"""Input-pipeline throughput next to the train step's consumption rate.

Measures, in one process on this machine:

1. the CIFAR-10 training pipeline (TFDS array_record source, PNG decode, random
   crop + flip, normalisation, grain threads) in images/s;
2. the ResNet-20 train step (``sing_jax.train.make_train_step``, SGD, batch 128)
   in images/s on a fixed batch (no input pipeline);
3. the same step fed by the pipeline with prefetching, reporting the share of
   wall time the loop waits in ``next()``;
4. the ImageNet pipeline (random-resized crop, flip, RandAugment m7-mstd0.5,
   normalisation) on mock data whose images are JPEG-encoded 375x500 photos-sized
   noise decoded with PIL as TFDS does, and the ResNet-18 (ImageNet variant)
   step at 224x224.

CIFAR-10 cannot be downloaded here: unless ``--data_dir`` holds a prepared
``cifar10``, the script writes CIFAR binary batches of random pixels (the real
file format, 10,000 train images) and builds them with the real TFDS builder via
``sing_jax.data.prepare``. Random pixels compress worse than photos, so PNG
decoding is, if anything, slower than on the real data.

Usage::

    python experiments/bench_data.py            # ~4 minutes on 2 busy CPU cores
    python experiments/bench_data.py --quick    # a smoke run

The last line is the headline ratio: CIFAR pipeline images/s over ResNet-20
train-step images/s (target >= 5).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np


def _fake_cifar10_source(root: str, per_batch: int) -> None:
    rng = np.random.default_rng(0)
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)

    def records(n):
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return np.concatenate([labels, images], 1).tobytes()

    for i in range(1, 6):
        with open(os.path.join(d, f"data_batch_{i}.bin"), "wb") as f:
            f.write(records(per_batch))
    with open(os.path.join(d, "test_batch.bin"), "wb") as f:
        f.write(records(per_batch))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)))


def _pipeline_rate(pipe, num_batches: int, warmup: int = 3) -> float:
    it = iter(pipe)
    for _ in range(warmup):  # also lets worker processes start
        next(it)
    start = time.perf_counter()
    images = 0
    for _ in range(num_batches):
        batch = next(it)
        images += batch["label"].size
    rate = images / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return rate


def _train_step_and_state(model, batch_size: int):
    import optax

    from sing_jax import train

    tx = optax.sgd(0.01, momentum=0.9)
    state = train.TrainState.create(model, tx, rng=0)
    step = train.make_train_step(tx)
    return step, step.place_state(state)


def _step_rate(step, state, batch, num_steps: int):
    import jax

    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return num_steps * batch["label"].size / elapsed, state


def _fed_loop(step, state, pipe, num_steps: int):
    """Train steps fed by the pipeline: (images/s, share of wall time spent in next())."""
    import jax

    it = iter(pipe)
    for _ in range(2):
        state, metrics = step(state, next(it))
    jax.block_until_ready(metrics)
    waited = 0.0
    start = time.perf_counter()
    images = 0
    for _ in range(num_steps):
        t0 = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t0
        state, metrics = step(state, batch)  # async dispatch: the pipeline runs meanwhile
        images += batch["label"].size
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return images / elapsed, waited / elapsed


class _JpegImagenetSource:
    """A random-access stand-in for the TFDS ImageNet source: JPEG bytes decoded on read."""

    def __init__(self, n: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self._jpegs = []
        for _ in range(min(n, 64)):
            h, w = int(rng.integers(300, 420)), int(rng.integers(400, 520))
            # smooth noise: closer to a photo's JPEG size than white noise
            small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self._jpegs.append(buf.getvalue())
        self._n = n
        self._labels = rng.integers(0, 1000, size=n)

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        from PIL import Image

        data = self._jpegs[i % len(self._jpegs)]
        with Image.open(io.BytesIO(data)) as img:
            image = np.asarray(img.convert("RGB"))
        return {"image": image, "label": int(self._labels[i]), "file_name": f"{i}.JPEG"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="a TFDS data dir with cifar10 prepared")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--threads", type=int, default=2, help="grain read threads")
    parser.add_argument("--skip_imagenet", action="store_true")
    args = parser.parse_args()

    import jax
    import tensorflow_datasets as tfds
    from flax import nnx

    import sing_jax.data as sd
    from sing_jax.nn.models.resnet import resnet18, resnet20

    quick = args.quick
    batch = 128
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        real = data_dir is not None and tfds.builder("cifar10", data_dir=data_dir).is_prepared()
        if not real:
            data_dir = os.path.join(tmp, "data")
            _fake_cifar10_source(os.path.join(tmp, "src"), 400 if quick else 2000)
            t0 = time.perf_counter()
            sd.prepare("cifar10", data_dir, source_dir=os.path.join(tmp, "src"))
            print(f"built fake cifar10 (real TFDS builder) in {time.perf_counter() - t0:.1f}s")
        common = dict(data_dir=data_dir, num_threads=args.threads, prefetch_batches=4)
        pipe = sd.get_pipeline("cifar10", "train", batch, seed=0, **common)
        cifar_rate = _pipeline_rate(pipe, 10 if quick else 60)
        rows.append(("CIFAR-10 train pipeline (crop+flip+norm)", batch, cifar_rate))
        mp_pipe = sd.get_pipeline("cifar10", "train", batch, seed=0, worker_count=2, **common)
        rows.append(("CIFAR-10 train pipeline, 2 grain worker processes", batch,
                     _pipeline_rate(mp_pipe, 10 if quick else 60)))  # fmt: skip

        model = resnet20(10, rngs=nnx.Rngs(0))
        step, state = _train_step_and_state(model, batch)
        fixed = next(iter(sd.get_pipeline("cifar10", "train", batch, seed=1, **common)))
        r20_rate, state = _step_rate(step, state, fixed, 3 if quick else 10)
        rows.append(("ResNet-20 train step, fixed batch", batch, r20_rate))
        fed_rate, wait_share = _fed_loop(step, state, pipe, 3 if quick else 10)
        rows.append(("ResNet-20 step fed by the pipeline", batch, fed_rate))
        del state, step

        if not args.skip_imagenet:
            ib = 16
            src = _JpegImagenetSource(256)

            def as_data_source_fn(builder, split, **kwargs):
                del builder, kwargs
                return [src] * len(split) if isinstance(split, (list, tuple)) else src

            with tfds.testing.mock_data(num_examples=256, as_data_source_fn=as_data_source_fn,
                                        data_dir=os.path.join(tmp, "mock")):  # fmt: skip
                ipipe = sd.get_pipeline("imagenet2012", "train", ib, seed=0,
                                        data_dir=os.path.join(tmp, "mock"),
                                        num_threads=args.threads)  # fmt: skip
                imagenet_rate = _pipeline_rate(ipipe, 2 if quick else 6, warmup=1)
                rows.append(("ImageNet train pipeline (RRC+flip+RandAug), mock JPEG", ib,
                             imagenet_rate))  # fmt: skip
                ipipe_mp = sd.get_pipeline("imagenet2012", "train", ib, seed=0,
                                           data_dir=os.path.join(tmp, "mock"),
                                           num_threads=args.threads, worker_count=2)  # fmt: skip
                rows.append(("ImageNet train pipeline, 2 grain worker processes", ib,
                             _pipeline_rate(ipipe_mp, 2 if quick else 6, warmup=1)))  # fmt: skip
                ifixed = next(iter(ipipe))
            model = resnet18(1000, variant="imagenet", rngs=nnx.Rngs(0))
            step, state = _train_step_and_state(model, ib)
            r18_rate, state = _step_rate(step, state, ifixed, 1 if quick else 2)
            rows.append(("ResNet-18 (ImageNet) train step 224px, fixed batch", ib, r18_rate))

    print(f"\nmachine: {os.cpu_count()} CPU cores, jax devices: {jax.devices()}")
    print(f"cifar10 source: {'prepared data dir' if real else 'fake files, real TFDS builder'}")
    print(f"\n{'what':58s} {'batch':>6s} {'images/s':>10s}")
    for what, b, rate in rows:
        print(f"{what:58s} {b:6d} {rate:10.1f}")
    print(f"share of the fed ResNet-20 loop spent waiting for data: {100 * wait_share:.1f}%")
    if not args.skip_imagenet:
        print(f"ImageNet pipeline / ResNet-18 step: {imagenet_rate / r18_rate:.2f}x")
    print(f"CIFAR pipeline / ResNet-20 train step (target >= 5x): {cifar_rate / r20_rate:.2f}x")


if __name__ == "__main__":
    if __package__:  # python -m experiments.bench_data
        from experiments.xla_cpu import reuse_host_memory
    else:  # run by path: this script's folder is first on sys.path
        from xla_cpu import reuse_host_memory

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    with contextlib.suppress(KeyboardInterrupt):
        main()
