"""Two TFDS datasets that build offline: ``digits`` and ``mnist1d``.

Both are ordinary ``tfds.core.GeneratorBasedBuilder`` subclasses. Defining the
classes registers them with TFDS under the names ``digits`` and ``mnist1d``, so
``tfds.builder('digits')`` and ``tfds.data_source('digits')`` work once this
module is imported. They write ``array_record`` files and need neither network
nor TensorFlow: their features are plain ``tfds.features.Tensor`` values, so no
image codec runs at build time.

``digits``
    scikit-learn's bundled handwritten digits (UCI optical recognition): 1,797
    grey 8x8 images with integer intensities 0..16, 10 classes. The split is a
    stratified ``sklearn.model_selection.train_test_split(test_size=360,
    random_state=0)``: 1,437 train / 360 test, fixed forever (version 1.0.0).
    ``image`` is stored as ``uint8`` of shape ``(8, 8, 1)`` with the raw 0..16
    intensities.

``mnist1d``
    MNIST-1D (Greydanus 2020) generated procedurally by the ``mnist1d`` package
    with ``mnist1d.data.get_dataset_args()`` (its defaults: 5,000 sequences of
    length 40, seed 42, 80/20 split): 4,000 train / 1,000 test. ``image`` is
    ``float32`` of shape ``(40, 1)`` (a length-40 signal with one channel, already
    centred and scaled to unit variance by the generator). The package's
    download path is never used.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, 8x8 grey, 10 classes (offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 split with random_state=0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's bundled copy of the UCI handwritten digits test set: "
                "1,797 8x8 images with intensities 0..16. Split: stratified "
                "train_test_split(test_size=360, random_state=0)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # bundled with scikit-learn: nothing to download
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = bunch.images.astype(np.uint8)[..., None]
        labels = bunch.target.astype(np.int64)
        ids = np.arange(len(labels))
        train_ids, test_ids = train_test_split(
            ids, test_size=DIGITS_NUM_TEST, random_state=DIGITS_SPLIT_SEED, stratify=labels
        )
        return {
            "train": self._generate_examples(images, labels, np.sort(train_ids)),
            "test": self._generate_examples(images, labels, np.sort(test_ids)),
        }

    def _generate_examples(self, images, labels, ids):
        for i in ids:
            yield int(i), {"image": images[i], "label": int(labels[i])}


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D from the ``mnist1d`` procedural generator (default arguments)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mnist1d.data.get_dataset_args() defaults (seed 42)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "MNIST-1D generated procedurally with mnist1d.data.make_dataset("
                "get_dataset_args()): 4,000 train / 1,000 test signals of length 40."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(40, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedurally generated: nothing to download
        from mnist1d.data import get_dataset_args, make_dataset

        # The generator reseeds NumPy's global RNG; restore it so that building
        # the dataset does not change the caller's random stream.
        saved_state = np.random.get_state()
        try:
            data = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(saved_state)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, xs, ys):
        for i, (x, y) in enumerate(zip(xs, ys)):
            yield i, {"image": np.asarray(x, np.float32)[:, None], "label": int(y)}


EMBEDDED_BUILDERS = {"digits": Digits, "mnist1d": Mnist1d}
