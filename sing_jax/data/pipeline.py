"""TFDS ``data_source`` + grain input pipelines, split per process and per device.

One code path for every dataset: ``tfds.data_source`` gives random access to the
``array_record`` files (no TensorFlow), a small index plan says which examples
form each batch, and a ``grain.MapDataset`` over batch indices reads, decodes and
augments them in background threads (``grain.ReadOptions``) ahead of the train
step. The iterator is grain's, so ``get_state()`` / ``set_state()`` give a
checkpointable value that resumes at exactly the next batch.

Index plan, for ``N`` examples, global batch ``B``, ``P`` processes and ``D``
local devices (``b = B / P`` examples per process, ``B / (P D)`` per device):

* train: epoch ``e`` is the permutation ``pi_e = Generator(seed, e).permutation(N)``;
  global batch ``k`` of that epoch is ``pi_e[k B : (k + 1) B]`` for
  ``k < floor(N / B)`` (the remainder is dropped), and process ``p`` takes rows
  ``[p b, (p + 1) b)`` of it. The global batch therefore does not depend on ``P``.
  With ``keep_partial_batch=True`` an epoch has ``ceil(N / B)`` batches: the last
  one holds the ``N mod B`` remaining examples and is padded to ``B`` rows (copies
  of ``pi_e[0]``, ``mask = False``), so every batch has the same shape and a jitted
  step compiles once (the step leaves the padding out of the loss and, with
  :class:`sing_jax.nn.BatchNorm`, out of the batch statistics).
* eval: one pass in storage order; global batch ``k`` holds positions
  ``[k B, (k + 1) B)``; positions ``>= N`` are padding (a copy of example 0) with
  ``mask = False``, so every example is seen exactly once over all processes and
  devices, and ``sum(mask) = N``.
* augmentation: the random draws of global row ``r`` of batch ``k`` come from
  ``(seed, k, r)``, so the augmented global batch, too, is the same for any
  number of processes, threads or worker processes, and after a resume. An eval
  pipeline built with ``augment_eval=True`` (the seed 001 reference validates on a
  subset of its *augmented* train set) draws from ``(seed, k, r, epoch)``:
  :meth:`Pipeline.for_epoch` gives each epoch's pass its own draws.

Every batch is a dict of NumPy arrays with a leading local-device axis:
``image (D, B/(P D), *image_shape)`` float32, ``label (D, B/(P D))`` int32,
``mask (D, B/(P D))`` bool (all ``True`` in training, unless ``keep_partial_batch``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from sing_jax.data import augment

Batch = dict[str, np.ndarray]

VALIDATION_SPLIT_SEED = 0
# How the validation hold-out's size is rounded: round(f N), or int(f N) as the seed 001
# reference's ``int(valid_split * n)`` (SVHN: 3662 instead of 3663 of 73,257).
VALIDATION_ROUNDINGS = ("round", "floor")
_INFINITE_STEPS = 2**50


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is read and preprocessed.

    Attributes:
      tfds_name: the TFDS name.
      train_split, test_split: the TFDS splits used for training and for the
        final test (ImageNet's labelled held-out split is ``'validation'``).
      num_classes: number of labels.
      image_shape: shape of one preprocessed ``image``.
      preprocess: ``'scale'`` (``image * scale``), ``'cifar'`` (crop/flip on
        train, mean/std), ``'imagenet'`` (random-resized crop, flip, RandAugment on
        train; resize ``floor(224 / eval_crop_pct)`` / centre-crop 224 on eval; mean/std).
      validation_fraction: share of the train split held out as ``'validation'``.
      scale: factor of the ``'scale'`` preprocessing.
      mean, std: per-channel constants of the ``'cifar'``/``'imagenet'`` normalisation.
      prepare_hint: how to build the data when it is missing.
      mixup_alpha, cutmix_alpha, label_smoothing: the recipe's on-device mixing
        (:func:`sing_jax.data.augment.mix_batch`); all 0 where the recipe has none.
      rand_augment: ``'imagenet'`` train images get RandAugment (m7, mstd 0.5).
      eval_crop_pct, eval_interpolation: ``'imagenet'`` eval resize (the crop over
        ``eval_crop_pct``) and its PIL resampling.
    """

    tfds_name: str
    train_split: str
    test_split: str
    num_classes: int
    image_shape: tuple[int, ...]
    preprocess: str
    validation_fraction: float = 0.05
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    prepare_hint: str = ""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    rand_augment: bool = True
    eval_crop_pct: float = 0.875
    eval_interpolation: str = "bilinear"


_CIFAR_HINT = (
    "run `tfds build {name} --file_format=array_record --data_dir=DATA_DIR` (needs TensorFlow "
    "and network), or, offline and without TensorFlow, put "
    "the original download ({archive}) in a directory SRC and call "
    "sing_jax.data.prepare('{name}', 'DATA_DIR', source_dir='SRC')"
)
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", "train", "test", 10, (8, 8, 1), "scale", scale=1 / 16,
                          prepare_hint="it is built automatically (scikit-learn is bundled)"),
    "mnist1d": DatasetSpec("mnist1d", "train", "test", 10, (40, 1), "scale",
                           prepare_hint="it is built automatically (procedural generator)"),
    "cifar10": DatasetSpec("cifar10", "train", "test", 10, (32, 32, 3), "cifar",
                           mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD,
                           prepare_hint=_CIFAR_HINT.format(name="cifar10",
                                                           archive="cifar-10-binary.tar.gz")),
    "cifar100": DatasetSpec("cifar100", "train", "test", 100, (32, 32, 3), "cifar",
                            mean=augment.CIFAR100_MEAN, std=augment.CIFAR100_STD,
                            prepare_hint=_CIFAR_HINT.format(name="cifar100",
                                                            archive="cifar-100-binary.tar.gz")),
    "svhn_cropped": DatasetSpec("svhn_cropped", "train", "test", 10, (32, 32, 3), "scale",
                                scale=1 / 255,
                                prepare_hint=_CIFAR_HINT.format(
                                    name="svhn_cropped",
                                    archive="train_32x32.mat, test_32x32.mat, extra_32x32.mat")),
    "imagenet2012": DatasetSpec("imagenet2012", "train", "validation", 1000, (224, 224, 3),
                                "imagenet", validation_fraction=0.0, mixup_alpha=0.1,
                                cutmix_alpha=1.0, label_smoothing=0.1,
                                mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD,
                                prepare_hint=(
                                    "ImageNet cannot be downloaded: put ILSVRC2012_img_train.tar "
                                    "and ILSVRC2012_img_val.tar in a manual dir MANUAL and call "
                                    "sing_jax.data.prepare('imagenet2012', 'DATA_DIR', "
                                    "manual_dir='MANUAL') (or `tfds build imagenet2012 "
                                    "--manual_dir=MANUAL --data_dir=DATA_DIR "
                                    "--file_format=array_record` with TensorFlow)")),
    # ImageNet-V2 (matched-frequency): 10,000 test images in ImageNet's 1000 classes,
    # for evaluation only (its one split stands in for the train split too).
    "imagenet_v2": DatasetSpec("imagenet_v2", "test", "test", 1000, (224, 224, 3), "imagenet",
                               validation_fraction=0.0, mean=augment.IMAGENET_MEAN,
                               std=augment.IMAGENET_STD,
                               prepare_hint=(
                                   "run `tfds build imagenet_v2 --file_format=array_record "
                                   "--data_dir=DATA_DIR` (needs TensorFlow and network)")),
}  # fmt: skip
# DatasetSpec fields a caller may override per run (get_pipeline's ``preprocessing``)
PREPROCESSING_KEYS = ("mean", "std", "rand_augment", "eval_crop_pct", "eval_interpolation",
                      "mixup_alpha", "cutmix_alpha", "label_smoothing")

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    ``num_examples`` maps ``'train'``, ``'validation'``, ``'test'`` to the number
    of examples each split has after the validation hold-out.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, ...]
    num_examples: Mapping[str, int]
    spec: DatasetSpec


def _spec(name: str) -> DatasetSpec:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {sorted(DATASETS)}")
    return DATASETS[name]


def spec_with(name: str, preprocessing: Mapping[str, Any] | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` with the ``preprocessing`` fields replaced."""
    spec = _spec(name)
    overrides = dict(preprocessing or {})
    unknown = sorted(set(overrides) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ValueError(f"preprocessing: unknown key(s) {unknown} for dataset {name!r}; "
                         f"allowed: {list(PREPROCESSING_KEYS)}")
    for key in ("mean", "std"):
        if key in overrides:
            overrides[key] = tuple(float(v) for v in overrides[key])
            if len(overrides[key]) != spec.image_shape[-1]:
                raise ValueError(f"preprocessing: {key}={overrides[key]} has "
                                 f"{len(overrides[key])} values; {name!r} images have "
                                 f"{spec.image_shape[-1]} channels")
    if "eval_crop_pct" in overrides:
        augment.eval_resize_size(spec.image_shape[0], overrides["eval_crop_pct"])
    if overrides.get("eval_interpolation", "bilinear") not in augment.INTERPOLATIONS:
        raise ValueError(f"preprocessing: eval_interpolation="
                         f"{overrides['eval_interpolation']!r}; expected one of "
                         f"{augment.INTERPOLATIONS}")
    return dataclasses.replace(spec, **overrides)


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("SING_JAX_DATA_DIR") or None


def tfds_sources(name: str, data_dir: str | None):
    """The TFDS random-access sources of ``name``, building embedded datasets on first use."""
    import tensorflow_datasets as tfds

    from sing_jax.data import builders

    spec = _spec(name)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    if name in builders.EMBEDDED_BUILDERS and not builder.is_prepared():
        builder.download_and_prepare()
    try:
        # Never download here: CIFAR/SVHN would try the network, ImageNet cannot.
        splits = [spec.train_split, spec.test_split]
        sources = tfds.data_source(spec.tfds_name, split=splits, data_dir=data_dir,
                                   download=False)  # fmt: skip
        return dict(zip(splits, sources))
    except Exception as err:
        if builder.is_prepared():
            raise
        root = str(builder.data_dir_root)
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in data dir {root!r} and cannot be downloaded "
            f"here; to prepare it, {spec.prepare_hint.replace('DATA_DIR', root)}"
        ) from err


def split_indices(num_train: int, fraction: float, rounding: str = "round"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed 0) hold-out of ``round(fraction N)`` (or ``int(fraction N)``) train
    examples as validation."""
    if rounding not in VALIDATION_ROUNDINGS:
        raise ValueError(f"validation_rounding={rounding!r}; expected one of "
                         f"{VALIDATION_ROUNDINGS}")
    num_val = int(round(num_train * fraction)) if rounding == "round" else int(
        num_train * fraction)
    perm = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(num_train)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def split_source(name: str, split: str, sources, validation_fraction: float | None,
                  validation_rounding: str = "round"):
    """``(tfds_source, indices)`` of one of our splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected one of {SPLITS}")
    spec = _spec(name)
    fraction = spec.validation_fraction if validation_fraction is None else validation_fraction
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if split == "test":
        source = sources[spec.test_split]
        return source, np.arange(len(source))
    source = sources[spec.train_split]
    train_idx, val_idx = split_indices(len(source), fraction, validation_rounding)
    return source, (train_idx if split == "train" else val_idx)


def get_info(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float | None = None,
    validation_rounding: str = "round",
) -> DatasetInfo:
    """Metadata of ``name`` (building an embedded dataset on first use)."""
    return _info(name, tfds_sources(name, _resolve_data_dir(data_dir)), validation_fraction,
                 validation_rounding)


def _info(name: str, sources, validation_fraction: float | None,
          validation_rounding: str = "round") -> DatasetInfo:
    spec = _spec(name)
    counts = {
        split: len(split_source(name, split, sources, validation_fraction,
                                 validation_rounding)[1])
        for split in SPLITS
    }
    return DatasetInfo(name, spec.num_classes, spec.image_shape, counts, spec)


# ----------------------------------------------------------------------------- index plan


def check_batch_split(global_batch_size: int, process_count: int, num_local_devices: int) -> int:
    """Per-device batch size, or a ValueError naming the numbers that do not divide."""
    for arg, value in (("global_batch_size", global_batch_size),
                       ("process_count", process_count),
                       ("num_local_devices", num_local_devices)):  # fmt: skip
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    shards = process_count * num_local_devices
    if global_batch_size % shards:
        raise ValueError(
            f"global batch size {global_batch_size} does not divide evenly over "
            f"{process_count} process(es) x {num_local_devices} local device(s) = {shards} "
            f"devices; use a multiple of {shards}"
        )
    return global_batch_size // shards


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_steps_per_epoch(num_examples: int, global_batch_size: int,
                          keep_partial_batch: bool = False) -> int:
    """``floor(N / B)`` train batches per epoch, or ``ceil(N / B)`` keeping the last partial one."""
    if keep_partial_batch:
        return -(-num_examples // global_batch_size)
    return num_examples // global_batch_size


def train_batch_plan(
    step: int, *, num_examples: int, global_batch_size: int, process_index: int,
    process_count: int, seed: int, keep_partial_batch: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(positions, mask)`` of this process's rows of train batch ``step``.

    Without ``keep_partial_batch`` the mask is all ``True`` (the remainder of each
    epoch is dropped); with it, the rows past the epoch's last example are padding
    (position ``pi_e[0]``, ``mask = False``).
    """
    steps_per_epoch = train_steps_per_epoch(num_examples, global_batch_size,
                                            keep_partial_batch)
    epoch, k = divmod(step, steps_per_epoch)
    local = global_batch_size // process_count
    rows = k * global_batch_size + process_index * local + np.arange(local)
    mask = rows < num_examples
    permutation = _epoch_permutation(num_examples, seed, epoch)
    return permutation[np.where(mask, rows, 0)], mask


def train_batch_indices(
    step: int, *, num_examples: int, global_batch_size: int, process_index: int,
    process_count: int, seed: int,
) -> np.ndarray:  # fmt: skip
    """Positions (into the split) of this process's rows of train batch ``step``."""
    positions, _ = train_batch_plan(step, num_examples=num_examples,
                                    global_batch_size=global_batch_size,
                                    process_index=process_index,
                                    process_count=process_count, seed=seed)
    return positions


def eval_batch_indices(
    step: int, *, num_examples: int, global_batch_size: int, process_index: int,
    process_count: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(positions, mask)`` of this process's rows of eval batch ``step`` (padding -> 0)."""
    local = global_batch_size // process_count
    pos = step * global_batch_size + process_index * local + np.arange(local)
    mask = pos < num_examples
    return np.where(mask, pos, 0), mask


# ----------------------------------------------------------------------------- preprocessing


def _preprocess_batch(
    spec: DatasetSpec, examples: list[dict[str, Any]], augmented: bool,
    seed: int, step: int, rows: np.ndarray, global_batch_size: int,
    stream: tuple[int, ...] = (),
) -> np.ndarray:  # fmt: skip
    """Preprocesses this process's ``rows`` of global batch ``step``.

    ``augmented``: apply the dataset's training augmentation. The random draws are
    made per *global* row, from ``(seed, step, *stream)``, so a batch is augmented
    identically whatever the number of processes, threads or workers, and a resumed
    iterator reproduces the batches it would have produced.
    """
    if spec.preprocess == "imagenet":
        out = np.empty((len(examples), *spec.image_shape), np.uint8)
        for i, ex in enumerate(examples):
            rng = np.random.default_rng([seed, step, int(rows[i]), 2, *stream])
            image = ex["image"]
            if image.ndim == 2 or image.shape[-1] == 1:
                image = np.broadcast_to(image.reshape(*image.shape[:2], 1), (*image.shape[:2], 3))
            if augmented:
                image = augment.random_resized_crop(image, rng, size=spec.image_shape[0])
                if rng.random() < 0.5:
                    image = image[:, ::-1]
                if spec.rand_augment:
                    image = augment.rand_augment(np.ascontiguousarray(image), rng,
                                                 fill=augment.fill_colour(spec.mean))
            else:
                size = spec.image_shape[0]
                image = augment.resize_center_crop(
                    image, augment.eval_resize_size(size, spec.eval_crop_pct), size,
                    spec.eval_interpolation)
            out[i] = image
        return augment.normalize(out, spec.mean, spec.std)
    images = np.stack([np.asarray(ex["image"]) for ex in examples])
    if spec.preprocess == "cifar":
        if augmented:
            rng = np.random.default_rng([seed, step, 1, *stream])
            params = augment.crop_flip_params(rng, global_batch_size, padding=4)
            images = augment.apply_crop_flip(images, *(p[rows] for p in params), padding=4)
        return augment.normalize(images, spec.mean, spec.std)
    if spec.preprocess == "scale":
        return images.astype(np.float32) * np.float32(spec.scale)
    raise ValueError(f"unknown preprocessing {spec.preprocess!r}")


class _BatchReader:
    """Batch ``step`` -> preprocessed per-device batch (a picklable callable for grain)."""

    def __init__(self, *, spec, source, indices, train, augment, global_batch_size,
                 process_index, process_count, num_local_devices, seed,
                 keep_partial_batch=False, augment_eval=False, epoch=0):  # fmt: skip
        self.spec, self.source, self.indices = spec, source, indices
        self.train, self.augment, self.seed = train, augment, seed
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.num_local_devices = num_local_devices
        self.keep_partial_batch = keep_partial_batch
        self.augment_eval, self.epoch = augment_eval, epoch

    def for_epoch(self, epoch: int) -> _BatchReader:
        reader = copy.copy(self)
        reader.epoch = epoch
        return reader

    def __call__(self, step: int) -> Batch:
        kw = dict(num_examples=len(self.indices), global_batch_size=self.global_batch_size,
                  process_index=self.process_index, process_count=self.process_count)  # fmt: skip
        if self.train:
            positions, mask = train_batch_plan(step, seed=self.seed,
                                               keep_partial_batch=self.keep_partial_batch, **kw)
        else:
            positions, mask = eval_batch_indices(step, **kw)
        record_ids = self.indices[positions]
        examples = _read(self.source, record_ids)
        local = len(positions)
        rows = self.process_index * local + np.arange(local)  # rows of the global batch
        augmented = self.augment and (self.train or self.augment_eval)
        # Augmented eval passes draw from their own stream, one per epoch.
        stream = () if self.train else (1, self.epoch)
        images = _preprocess_batch(self.spec, examples, augmented, self.seed, step, rows,
                                   self.global_batch_size, stream)  # fmt: skip
        labels = np.asarray([ex["label"] for ex in examples], np.int32)
        d = self.num_local_devices
        return {
            "image": images.reshape(d, -1, *images.shape[1:]),
            "label": labels.reshape(d, -1),
            "mask": mask.reshape(d, -1),
        }


def _read(source, record_ids: np.ndarray) -> list[dict[str, Any]]:
    ids = [int(i) for i in record_ids]
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(ids))
        except (TypeError, NotImplementedError):
            pass
    return [source[i] for i in ids]


@dataclasses.dataclass
class Pipeline:
    """An iterable of per-device batches with a checkpointable iterator.

    ``iter(pipeline)`` returns a grain ``DatasetIterator``: ``next(it)`` gives a
    batch; ``it.get_state()`` a small dict (e.g. ``{'next_index': 7}``) to store
    in a checkpoint; ``it.set_state(state)`` resumes at exactly that batch.

    Attributes:
      dataset: the underlying ``grain.MapDataset`` of batches (random access).
      num_batches: batches per pass (``None``: endless training stream).
      steps_per_epoch: batches per epoch (train) or per pass (eval).
      info: the :class:`DatasetInfo`.
    """

    dataset: Any
    num_batches: int | None
    steps_per_epoch: int
    info: DatasetInfo
    read_options: Any = None
    worker_count: int = 0
    reader: Any = None

    def for_epoch(self, epoch: int) -> Pipeline:
        """The pass of epoch ``epoch`` of an ``augment_eval`` pipeline (fresh draws per
        epoch, as a PyTorch loader re-draws its random transforms); other pipelines
        are returned unchanged."""
        if self.reader is None or self.reader.train or not (
                self.reader.augment_eval and self.reader.augment):
            return self
        import grain

        reader = self.reader.for_epoch(int(epoch))
        dataset = grain.MapDataset.range(self.num_batches).map(reader)
        return dataclasses.replace(self, dataset=dataset, reader=reader)

    def __iter__(self):
        dataset = self.dataset.to_iter_dataset(self.read_options)
        if self.worker_count > 0:
            import grain
            from absl import flags

            # grain's worker processes read absl flags; a program that does not use
            # absl has never parsed them, so take the defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(num_workers=self.worker_count)
            dataset = dataset.mp_prefetch(options)
        return iter(dataset)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless training pipeline (num_epochs=None) has no length")
        return self.num_batches


def get_pipeline(
    name: str,
    split: str,
    global_batch_size: int,
    *,
    seed: int = 0,
    train: bool | None = None,
    augment: bool = True,
    num_epochs: int | None = None,
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float | None = None,
    validation_rounding: str = "round",
    keep_partial_batch: bool = False,
    augment_eval: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_local_devices: int | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
    preprocessing: Mapping[str, Any] | None = None,
) -> Pipeline:
    """A grain pipeline over one split of ``name``, split over processes and devices.

    Args:
      name: one of :data:`DATASETS` (``digits``, ``mnist1d``, ``cifar10``,
        ``cifar100``, ``svhn_cropped``, ``imagenet2012``).
      split: ``'train'``, ``'validation'`` (the fixed hold-out of the train split)
        or ``'test'``.
      global_batch_size: examples per step over all processes and devices.
      seed: shuffling and augmentation seed (train only).
      train: training mode (shuffle, augment, drop remainder, repeat). Default:
        ``split == 'train'``. In eval mode one ordered pass, padded with a mask.
      augment: apply the dataset's training augmentation in training mode (and in
        eval mode with ``augment_eval``).
      num_epochs: training epochs (``None``: endless). Ignored in eval mode.
      data_dir: TFDS data dir (default ``$SING_JAX_DATA_DIR``, else TFDS's).
      validation_fraction: override the spec's hold-out share.
      validation_rounding: size of the hold-out, ``'round'`` (``round(f N)``) or
        ``'floor'`` (``int(f N)``, the seed 001 reference's).
      keep_partial_batch: training mode: keep each epoch's last partial batch,
        padded to the global batch size with ``mask = False`` (``ceil(N / B)``
        steps per epoch, every batch the same shape) instead of dropping it.
      augment_eval: eval mode: apply the training augmentation too (the seed 001
        reference validates on a subset of its augmented train set), with draws from
        ``seed`` and the epoch (:meth:`Pipeline.for_epoch`).
      process_index, process_count: this process and the number of processes
        (default ``jax.process_index()``, ``jax.process_count()``).
      num_local_devices: leading batch axis (default ``jax.local_device_count()``).
      num_threads, prefetch_batches: grain read threads and prefetch depth; the
        batches are prepared while the train step runs.
      worker_count: grain worker processes (``mp_prefetch``) on top of the
        threads; 0 keeps everything in this process. Workers bypass the GIL for
        heavy decoding/augmentation (ImageNet); the iterator state stays
        checkpointable, and the batches are the same for any count.
      preprocessing: overrides of the dataset's :class:`DatasetSpec` fields in
        :data:`PREPROCESSING_KEYS` (e.g. ``mean``/``std``, ``rand_augment``,
        ``eval_crop_pct``); ``info.spec`` is the spec in use.
    """
    import grain

    spec = spec_with(name, preprocessing)
    if process_index is None or process_count is None or num_local_devices is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        num_local_devices = jax.local_device_count() if num_local_devices is None else (
            num_local_devices)
    check_batch_split(global_batch_size, process_count, num_local_devices)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    train = (split == "train") if train is None else train
    sources = tfds_sources(name, _resolve_data_dir(data_dir))
    source, indices = split_source(name, split, sources, validation_fraction,
                                    validation_rounding)
    info = dataclasses.replace(_info(name, sources, validation_fraction, validation_rounding),
                               spec=spec)
    n = len(indices)
    if n == 0:
        raise ValueError(
            f"split {split!r} of dataset {name!r} is empty (validation_fraction="
            f"{spec.validation_fraction if validation_fraction is None else validation_fraction})"
            "; pass validation_fraction > 0 for a validation split, or use split='test'"
        )
    if train:
        steps_per_epoch = train_steps_per_epoch(n, global_batch_size, keep_partial_batch)
        if steps_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {name!r} has {n} examples, fewer than one global batch "
                f"of {global_batch_size}; training drops the remainder, so no batch is left"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be a positive integer or None, got {num_epochs}")
        num_batches = None if num_epochs is None else steps_per_epoch * num_epochs
    else:
        steps_per_epoch = num_batches = -(-n // global_batch_size)
    reader = _BatchReader(
        spec=spec, source=source, indices=indices, train=train, augment=augment,
        global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, num_local_devices=num_local_devices, seed=seed,
        keep_partial_batch=keep_partial_batch, augment_eval=augment_eval,
    )  # fmt: skip
    length = _INFINITE_STEPS if num_batches is None else num_batches
    dataset = grain.MapDataset.range(length).map(reader)
    if not isinstance(worker_count, int) or worker_count < 0:
        raise ValueError(f"worker_count must be a non-negative integer, got {worker_count!r}")
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return Pipeline(dataset, num_batches, steps_per_epoch, info, read_options, worker_count,
                    reader)


@dataclasses.dataclass
class Datasets:
    """Train / validation / test pipelines of one dataset and its metadata."""

    train: Pipeline
    validation: Pipeline | None
    test: Pipeline
    info: DatasetInfo


def make_dataset(
    name: str,
    global_batch_size: int,
    *,
    seed: int = 0,
    eval_batch_size: int | None = None,
    num_epochs: int | None = None,
    data_dir: str | os.PathLike | None = None,
    **kwargs,
) -> Datasets:
    """The simple entry point: train (endless unless ``num_epochs``), validation, test.

    Each batch is ``{'image': (D, B/D, ...) float32, 'label': (D, B/D) int32,
    'mask': (D, B/D) bool}`` for ``D`` local devices (see :func:`get_pipeline` for
    the keyword arguments). ``validation`` is ``None`` when the dataset has no
    hold-out (ImageNet by default).

    Example::

        ds = sing_jax.data.make_dataset('digits', 64, seed=0)
        it = iter(ds.train)
        batch = next(it)            # batch['image'].shape == (D, 64 // D, 8, 8, 1)
        state = it.get_state()      # store with the checkpoint; it.set_state(state) resumes
        for batch in ds.test:       # one pass, padded; weight metrics by batch['mask']
            ...
    """
    eval_batch_size = global_batch_size if eval_batch_size is None else eval_batch_size
    common = dict(data_dir=data_dir, **kwargs)
    train = get_pipeline(name, "train", global_batch_size, seed=seed, num_epochs=num_epochs,
                         **common)  # fmt: skip
    has_validation = train.info.num_examples["validation"] > 0
    validation = (get_pipeline(name, "validation", eval_batch_size, **common)
                  if has_validation else None)  # fmt: skip
    test = get_pipeline(name, "test", eval_batch_size, **common)
    return Datasets(train, validation, test, train.info)


# ----------------------------------------------------------------------------- device side


def prefetch_to_device(
    iterator: Iterator[Batch], size: int = 2, mesh=None, axis_name: str = "data",
    transform: Callable[[Batch], Batch] | None = None,
) -> Iterator[Any]:  # fmt: skip
    """Puts batches on the devices ``size`` steps ahead, as global ``jax.Array``s.

    Each leaf ``(D, b, ...)`` becomes a global array of shape
    ``(D * process_count, b, ...)`` sharded over ``mesh``'s ``axis_name``
    (default: a 1-D mesh of all devices), built with
    ``jax.make_array_from_process_local_data``. Because JAX dispatch is
    asynchronous, the copies run while the current step computes.
    """
    import collections

    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), (axis_name,))
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))

    def put(batch):
        if transform is not None:
            batch = transform(batch)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:])
            ),
            batch,
        )

    queue = collections.deque()
    for batch in iterator:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
