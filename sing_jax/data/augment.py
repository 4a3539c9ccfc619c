"""Image augmentation for the benchmark recipes.

Host side (NumPy / PIL, run inside the grain pipeline, seeded per batch):

* :func:`random_crop_flip` - the CIFAR recipe of seed 001: zero-pad by 4, take a
  random 32x32 crop, flip horizontally with probability 1/2 (vectorised over a
  batch; :func:`crop_flip_params` + :func:`apply_crop_flip` split the draws from
  the gather, so the pipeline can draw them per global row).
* :func:`normalize` - ``(x / 255 - mean) / std`` per channel.
* :func:`random_resized_crop`, :func:`resize_center_crop` - the Inception-style
  ImageNet train crop (scale ``(0.08, 1)``, ratio ``(3/4, 4/3)``) and the eval
  resize / centre crop (256 / 224 bilinear by default; timm's ViTs: 248 / 224
  bicubic, ``crop_pct`` 0.9), with PIL's resampling.
* :func:`rand_augment` - RandAugment as timm's ``rand-m7-mstd0.5`` computes it
  (2 ops drawn uniformly with replacement from 15, each applied with probability
  1/2, magnitude ``N(7, 0.5)`` clipped to ``[0, 10]``), on PIL images.

On device (JAX, jit-able, per device shard):

* :func:`mixup_cutmix` - timm's batch-mode Mixup/CutMix with label mixing:
  with probability ``switch_prob`` CutMix with ``lam ~ Beta(cutmix_alpha,
  cutmix_alpha)`` (``lam`` corrected to the pasted box area), else Mixup with
  ``lam ~ Beta(mixup_alpha, mixup_alpha)``; each example is mixed with the example
  at the mirrored position of the same batch, and the soft target is
  ``lam * y + (1 - lam) * y_flipped`` over (optionally smoothed) one-hot labels.
* :func:`random_crop_flip_on_device` - the CIFAR crop/flip with dm-pix, for
  pipelines that prefer to ship uint8 images and augment on the accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's IMAGENET_INCEPTION_MEAN/STD, the normalisation of its ViTs (seed 004)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


# ----------------------------------------------------------------------------- host: CIFAR


def crop_flip_params(
    rng: np.random.Generator, batch: int, padding: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws ``(dy, dx, flip)`` for :func:`apply_crop_flip`: offsets in ``[0, 2 padding]``."""
    dy = rng.integers(0, 2 * padding + 1, size=batch)
    dx = rng.integers(0, 2 * padding + 1, size=batch)
    flip = rng.random(batch) < 0.5
    return dy, dx, flip


def apply_crop_flip(
    images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, padding: int = 4
) -> np.ndarray:
    """``y[b, i, j] = xpad[b, dy_b + i, dx_b + (W - 1 - j if flip_b else j)]``.

    ``xpad`` is ``images`` (``(B, H, W, C)``) zero-padded by ``padding`` on both
    sides of ``H`` and ``W``. The output has the input's shape and dtype.
    """
    if images.ndim != 4:
        raise ValueError(
            f"random crop/flip expects images of shape (B, H, W, C), got {images.shape}"
        )
    batch, height, width, _ = images.shape
    for name, value in (("dy", dy), ("dx", dx), ("flip", flip)):
        if np.shape(value) != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {np.shape(value)}")
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = np.where(flip[:, None], np.arange(width)[::-1][None, :], np.arange(width)[None, :])
    rows = dy[:, None] + np.arange(height)[None, :]
    cols = dx[:, None] + cols
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Random crop after zero padding, then a random horizontal flip, per image.

    For a batch ``x`` of shape ``(B, H, W, C)``: pad ``H`` and ``W`` by ``padding``
    zeros on each side, draw offsets ``(dy, dx)`` uniformly in ``[0, 2 padding]``
    and flips ``f ~ Bernoulli(1/2)`` per image, and return
    ``y[b, i, j] = xpad[b, dy_b + i, dx_b + (W - 1 - j if f_b else j)]``.
    The output has the input's shape and dtype.
    """
    if images.ndim != 4:
        raise ValueError(
            f"random_crop_flip expects images of shape (B, H, W, C), got {images.shape}"
        )
    return apply_crop_flip(images, *crop_flip_params(rng, images.shape[0], padding), padding)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(images / 255 - mean) / std`` per channel, as float32."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    return images.astype(np.float32) * scale - mean / std


# ----------------------------------------------------------------------------- host: ImageNet


def _pil():
    from PIL import Image

    return Image


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> np.ndarray:
    """Inception-style crop: a random area fraction in ``scale`` and aspect in ``ratio``.

    Up to ``attempts`` draws of ``area ~ U(scale) * H W`` and
    ``log aspect ~ U(log ratio)``; the first box that fits is cropped at a uniform
    position, else the largest centred box with the aspect clamped to ``ratio``.
    The crop is resized to ``size x size`` (bilinear). ``uint8 (H, W, 3)`` in and out.
    """
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    crop = _pil().fromarray(image[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), _pil().BILINEAR))


def eval_resize_size(crop: int, crop_pct: float) -> int:
    """timm's eval resize: ``floor(crop / crop_pct)`` (224 -> 256 at 0.875, 248 at 0.9)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"eval crop_pct={crop_pct!r}; expected 0 < crop_pct <= 1")
    return math.floor(crop / crop_pct)


def resize_center_crop(image: np.ndarray, resize: int = 256, crop: int = 224,
                       interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to ``resize`` (PIL ``interpolation``), then centre-crop ``crop``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize_center_crop: interpolation={interpolation!r}; expected one "
                         f"of {INTERPOLATIONS}")
    height, width = image.shape[:2]
    factor = resize / min(height, width)
    new_h, new_w = max(crop, round(height * factor)), max(crop, round(width * factor))
    resample = getattr(_pil(), interpolation.upper())
    resized = np.asarray(_pil().fromarray(image).resize((new_w, new_h), resample))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return resized[top : top + crop, left : left + crop]


def fill_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """timm's RandAugment fill: the normalisation mean in 0..255 (``round(255 m)``)."""
    return tuple(min(255, int(round(255 * m))) for m in mean)


_FILL = fill_colour(IMAGENET_MEAN)
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip


def _apply_rand_augment_op(img, name: str, level: float, rng: np.random.Generator,
                           fill: tuple[int, ...] = _FILL):
    """One RandAugment op at ``level`` in [0, 10], with timm's level-to-argument maps."""
    from PIL import Image, ImageEnhance, ImageOps

    sign = 1.0 if rng.random() < 0.5 else -1.0
    frac = level / 10.0
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(sign * 30.0 * frac, resample=Image.BILINEAR, fillcolor=fill)
    if name == "Posterize":
        bits = int(4 * frac)  # keep 0..4 most significant bits
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if name == "Solarize":
        return ImageOps.solarize(img, int(256 * frac))
    if name == "SolarizeAdd":
        add = int(110 * frac)
        arr = np.asarray(img).astype(np.int32)
        arr = np.where(arr < 128, np.minimum(arr + add, 255), arr)
        return Image.fromarray(arr.astype(np.uint8))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.8 * frac + 0.1  # timm's non-increasing map onto [0.1, 1.9]
        enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                    "Brightness": ImageEnhance.Brightness,
                    "Sharpness": ImageEnhance.Sharpness}[name]  # fmt: skip
        return enhancer(img).enhance(factor)
    if name in ("ShearX", "ShearY"):
        s = sign * 0.3 * frac
        coeffs = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
    if name in ("TranslateXRel", "TranslateYRel"):
        w, h = img.size
        if name == "TranslateXRel":
            coeffs = (1, 0, sign * 0.45 * frac * w, 0, 1, 0)
        else:
            coeffs = (1, 0, 0, 0, 1, sign * 0.45 * frac * h)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RAND_AUGMENT_OPS}")


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 7.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
    fill: tuple[int, ...] = _FILL,
) -> np.ndarray:
    """RandAugment (timm ``rand-m{magnitude}-mstd{magnitude_std}``) on one uint8 RGB image.

    ``num_ops`` ops are drawn uniformly with replacement from
    :data:`RAND_AUGMENT_OPS`; each is applied with probability ``prob`` at level
    ``clip(N(magnitude, magnitude_std), 0, 10)``. Geometric ops fill with ``fill``
    (timm: the normalisation mean, :func:`fill_colour`; default ImageNet's).
    """
    img = _pil().fromarray(image)
    for name in rng.choice(RAND_AUGMENT_OPS, size=num_ops, replace=True):
        if rng.random() >= prob:
            continue
        level = magnitude
        if magnitude_std > 0:
            level += magnitude_std * rng.standard_normal()
        img = _apply_rand_augment_op(img, str(name), float(np.clip(level, 0.0, 10.0)), rng,
                                     fill)
    return np.asarray(img)


# ----------------------------------------------------------------------------- on device


def mixup_cutmix(
    rng,
    images,
    labels,
    num_classes: int,
    mixup_alpha: float = 0.1,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
):
    """Batch-mode Mixup / CutMix with label mixing (timm's ``Mixup``), jit-able.

    .. math::
        \\tilde x = \\text{mix}_\\lambda(x, \\text{flip}(x)),\\quad
        \\tilde y = \\lambda\\, \\text{smooth}(y)
                  + (1 - \\lambda)\\, \\text{smooth}(\\text{flip}(y))

    where ``flip`` reverses the batch axis (axis ``-4`` of ``images``, so a leading
    device axis is kept apart), ``smooth(y) = (1 - s) onehot(y) + s / K``.
    With probability ``switch_prob`` (when both alphas are positive) the mix is
    CutMix: a box of side ``sqrt(1 - lam)`` times the image side at a uniform
    centre, clipped to the image, is pasted from the flipped batch and ``lam``
    becomes ``1 - box_area / image_area``. Otherwise Mixup: ``lam x + (1 - lam)
    flip(x)``. One ``lam`` per call (batch mode).

    Args:
      rng: a ``jax.random`` key.
      images: float array ``(..., B, H, W, C)``.
      labels: int array ``(..., B)``.
      num_classes: number of classes ``K``.
      mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that mix.
      switch_prob: probability of CutMix when both are enabled.
      label_smoothing: ``s`` above.

    Returns:
      ``(mixed_images, soft_labels)`` with ``soft_labels`` of shape ``(..., B, K)``
      summing to 1.
    """
    import jax
    import jax.numpy as jnp

    if images.ndim < 4 or images.shape[:-3] != labels.shape:
        raise ValueError(
            f"mixup_cutmix expects images (..., B, H, W, C) and labels (..., B); got "
            f"images {images.shape} and labels {labels.shape}"
        )
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0, got both 0")
    k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 5)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))

    height, width = images.shape[-3], images.shape[-2]
    cut_ratio = jnp.sqrt(1.0 - lam_cut)
    cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)

    flipped = jnp.flip(images, axis=-4)
    cut_images = jnp.where(in_box[:, :, None], flipped, images)
    mix_images = lam_mix * images + (1.0 - lam_mix) * flipped
    mixed = jnp.where(use_cutmix, cut_images, mix_images).astype(images.dtype)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)

    off = label_smoothing / num_classes
    onehot = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + off
    soft = lam * onehot + (1.0 - lam) * jnp.flip(onehot, axis=-2)
    return mixed, soft


def mix_batch(rng, batch: dict, num_classes: int, **kwargs) -> dict:
    """:func:`mixup_cutmix` on a pipeline batch: mixes ``'image'``, adds ``'soft_label'``.

    ``batch`` is ``{'image': (..., B, H, W, C), 'label': (..., B), ...}``; the other
    entries pass through. Train with a soft-target cross-entropy on ``'soft_label'``.
    """
    images, soft = mixup_cutmix(rng, batch["image"], batch["label"], num_classes, **kwargs)
    return {**batch, "image": images, "soft_label": soft}


def random_crop_flip_on_device(rng, images, padding: int = 4):
    """The CIFAR crop/flip of :func:`random_crop_flip` on device with dm-pix.

    ``images``: ``(B, H, W, C)``; each image gets its own key.
    """
    import dm_pix as pix
    import jax
    import jax.numpy as jnp

    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    k_crop, k_flip = jax.random.split(rng)

    def one(k_crop, k_flip, img):
        img = pix.random_crop(k_crop, img, (height, width, channels))
        return pix.random_flip_left_right(k_flip, img)

    return jax.vmap(one)(jax.random.split(k_crop, batch), jax.random.split(k_flip, batch), padded)
