"""Building TFDS datasets without TensorFlow and without network.

``tfds.data_source`` reads ``array_record`` files with no TensorFlow at all, but a
few TFDS *builders* still reach for TensorFlow while *writing* them. In
tensorflow-datasets 4.9.10 exactly two calls do, for the datasets used here:

* ``tf.io.gfile`` to open source files (``cifar.py``'s ``_load_data``,
  ``svhn_cropped``'s ``_generate_examples``, ``imagenet_common.py``, and the
  archive iterator of ``tfds.download.extractor`` that ImageNet uses), and
* ``tf.image.encode_png`` / ``encode_jpeg`` (through ``TFGraphRunner``) to encode
  NumPy images for ``tfds.features.Image`` (and, for ImageNet's few CMYK/PNG
  files, ``tfds.core.utils.jpeg_cmyk_to_rgb`` / ``png_to_jpeg``).

:func:`prepare` builds the *real* TFDS builder inside a scoped shim that, only
while TensorFlow is not importable, replaces the first with ``etils.epath``
file objects and the second with PIL's PNG/JPEG encoders, so the files it writes
are the ones ``tfds build`` would write. With ``source_dir`` it also answers the
builder's download requests from local files (the same file names TFDS would
download: ``cifar-10-binary.tar.gz`` or its extracted ``cifar-10-batches-bin/``,
``cifar-100-binary.tar.gz`` or ``cifar-100-binary/``, ``train_32x32.mat``,
``test_32x32.mat``, ``extra_32x32.mat``), which is how offline clusters and the
tests build CIFAR-10/100 and SVHN. ImageNet takes ``manual_dir`` as TFDS requires.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tarfile
import types
from collections.abc import Iterator
from unittest import mock

from etils import epath


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _pil_encode(self, np_image):
    """Stand-in for ``_ImageEncoder._encode_image`` that encodes with PIL."""
    import numpy as np
    from PIL import Image
    from tensorflow_datasets.core.features import image_feature

    image_feature._validate_np_array(np_image, shape=self.shape, dtype=self.np_dtype)
    array = np.asarray(np_image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    fmt = "JPEG" if self.encoding_format == "jpeg" else "PNG"
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _pil_reencode_jpeg(image_bytes: bytes, quality: int = 100) -> bytes:
    """Stand-in for TFDS's ``png_to_jpeg`` / ``jpeg_cmyk_to_rgb``: any image -> RGB JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _gfile_namespace() -> types.SimpleNamespace:
    def gfile_open(path, mode="r"):
        return epath.Path(os.fspath(path)).open(mode)

    def as_text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    gfile = types.SimpleNamespace(
        GFile=gfile_open,
        exists=lambda p: epath.Path(os.fspath(p)).exists(),
        listdir=lambda p: [q.name for q in epath.Path(os.fspath(p)).iterdir()],
    )
    return types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=gfile), compat=types.SimpleNamespace(as_text=as_text)
    )


_MODULES_USING_TF_GFILE = (
    "tensorflow_datasets.image_classification.cifar",
    "tensorflow_datasets.datasets.svhn_cropped.svhn_cropped_dataset_builder",
    "tensorflow_datasets.datasets.imagenet2012.imagenet2012_dataset_builder",
    "tensorflow_datasets.datasets.imagenet2012.imagenet_common",
    "tensorflow_datasets.core.download.extractor",
)


@contextlib.contextmanager
def tensorflow_free_build() -> Iterator[None]:
    """Scope in which the builders above run without TensorFlow (no-op if TF exists)."""
    if tensorflow_available():
        yield
        return
    import importlib

    from tensorflow_datasets.core import utils as tfds_utils
    from tensorflow_datasets.core.features import image_feature

    shim = _gfile_namespace()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(image_feature._ImageEncoder, "_encode_image", _pil_encode)
        )
        # ImageNet's 22 CMYK JPEGs and 1 PNG are re-encoded as RGB JPEG.
        for fn in ("png_to_jpeg", "jpeg_cmyk_to_rgb"):
            stack.enter_context(mock.patch.object(tfds_utils, fn, _pil_reencode_jpeg))
        for name in _MODULES_USING_TF_GFILE:
            module = importlib.import_module(name)
            stack.enter_context(mock.patch.object(module, "tf", shim))
        yield


def _local_download(source_dir: epath.Path, extract_dir: epath.Path):
    """``download`` / ``download_and_extract`` replacements reading ``source_dir``."""
    import tensorflow_datasets as tfds

    def resolve(url: str, extract: bool) -> epath.Path:
        name = os.path.basename(str(url).rstrip("/"))
        path = source_dir / name
        if not extract:
            if not path.exists():
                raise FileNotFoundError(
                    f"source_dir {source_dir} has no {name!r} (the file TFDS downloads from {url})"
                )
            return path
        if path.exists() and tarfile.is_tarfile(path):
            target = extract_dir / name.split(".")[0]
            if not target.exists():
                with tarfile.open(path) as archive:
                    # The "data" filter (Python >= 3.10.12) refuses links and paths
                    # that leave the target directory.
                    if hasattr(tarfile, "data_filter"):
                        archive.extractall(target, filter="data")
                    else:
                        archive.extractall(target)
            return target
        # Already extracted: the builder joins its own prefix to the returned dir.
        return source_dir

    def apply(urls, extract):
        return tfds.core.utils.map_nested(lambda u: resolve(u, extract), urls)

    def download(self, url_or_urls):
        return apply(url_or_urls, extract=False)

    def download_and_extract(self, url_or_urls):
        return apply(url_or_urls, extract=True)

    return download, download_and_extract


def prepare(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> None:
    """Builds TFDS dataset ``name`` into ``data_dir`` (array_record), offline and TF-free.

    Args:
      name: a TFDS name, e.g. ``'cifar10'``, ``'svhn_cropped'``, ``'digits'``.
      data_dir: TFDS data dir (default: TFDS's, i.e. ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      source_dir: a directory holding the files the builder would download (see
        the module docstring); without it the builder downloads as usual.
      manual_dir: the manual dir for builders that need one (``imagenet2012``:
        ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``).
    """
    import tensorflow_datasets as tfds

    from sing_jax.data import builders  # noqa: F401  (registers digits, mnist1d)

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return
    download_dir = epath.Path(builder.data_dir_root) / "downloads"
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir),
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(tensorflow_free_build())
        if source_dir is not None:
            download, download_and_extract = _local_download(
                epath.Path(os.fspath(source_dir)), download_dir / "extracted_local"
            )
            manager = tfds.download.DownloadManager
            stack.enter_context(mock.patch.object(manager, "download", download))
            stack.enter_context(
                mock.patch.object(manager, "download_and_extract", download_and_extract)
            )
        builder.download_and_prepare(download_dir=os.fspath(download_dir), download_config=config)
