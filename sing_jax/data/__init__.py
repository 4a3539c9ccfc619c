"""Input pipelines: ``tfds.data_source`` + grain, no TensorFlow.

Entry points:

* :func:`make_dataset` - train / validation / test pipelines and metadata;
* :func:`get_pipeline` - one split, with every option;
* :func:`get_info` - metadata only (classes, image shape, examples per split);
* :func:`prepare` - build a TFDS dataset offline from local source files;
* :func:`prefetch_to_device` - global ``jax.Array`` batches, a few steps ahead.

Importing this package registers the embedded TFDS builders ``digits`` and
``mnist1d`` (:mod:`sing_jax.data.builders`).
"""

from sing_jax.data import augment, builders
from sing_jax.data.pipeline import (
    DATASETS,
    PREPROCESSING_KEYS,
    SPLITS,
    DatasetInfo,
    Datasets,
    DatasetSpec,
    Pipeline,
    check_batch_split,
    eval_batch_indices,
    get_info,
    get_pipeline,
    make_dataset,
    prefetch_to_device,
    spec_with,
    train_batch_indices,
    train_batch_plan,
    train_steps_per_epoch,
)
from sing_jax.data.prepare import prepare, tensorflow_free_build

__all__ = [
    "DATASETS",
    "PREPROCESSING_KEYS",
    "SPLITS",
    "DatasetInfo",
    "DatasetSpec",
    "Datasets",
    "Pipeline",
    "augment",
    "builders",
    "check_batch_split",
    "eval_batch_indices",
    "get_info",
    "get_pipeline",
    "make_dataset",
    "prefetch_to_device",
    "prepare",
    "spec_with",
    "tensorflow_free_build",
    "train_batch_indices",
    "train_batch_plan",
    "train_steps_per_epoch",
]
