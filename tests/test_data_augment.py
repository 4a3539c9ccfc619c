"""Augmentation invariants: crops keep sizes, flips are flips, mixed labels sum to 1."""

from __future__ import annotations

import numpy as np
import pytest

sd = pytest.importorskip("sing_jax.data")
aug = sd.augment


def _images(batch=16, size=32, seed=0):
    return np.random.default_rng(seed).integers(1, 256, size=(batch, size, size, 3), dtype=np.uint8)


def _window(padded, dy, dx, size, flip):
    window = padded[dy : dy + size, dx : dx + size]
    return window[:, ::-1] if flip else window


def test_random_crop_flip_is_a_shifted_window_maybe_flipped():
    images = _images()
    out = aug.random_crop_flip(images, np.random.default_rng(1), padding=4)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for pad, y in zip(padded, out):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if np.array_equal(_window(pad, dy, dx, 32, f), y)
        ]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < len(images)  # both branches occur
    # zero padding: the crops that shift show zeros at the border
    assert (out == 0).any()


def test_apply_crop_flip_checks_parameter_shapes():
    with pytest.raises(ValueError, match=r"dx must have shape \(2,\), got \(3,\)"):
        aug.apply_crop_flip(_images(2), np.zeros(2, int), np.zeros(3, int), np.zeros(2, bool))


def test_random_crop_flip_without_padding_is_identity_or_mirror():
    images = _images(8)
    out = aug.random_crop_flip(images, np.random.default_rng(4), padding=0)
    for x, y in zip(images, out):
        assert np.array_equal(x, y) or np.array_equal(x[:, ::-1], y)


def test_normalize_matches_formula():
    images = _images(2)
    mean, std = aug.CIFAR10_MEAN, aug.CIFAR10_STD
    out = aug.normalize(images, mean, std)
    expected = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_random_resized_crop_and_center_crop_sizes():
    rng = np.random.default_rng(0)
    for shape in ((300, 500, 3), (500, 240, 3), (40, 900, 3)):
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        out = aug.random_resized_crop(image, rng, size=224)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        center = aug.resize_center_crop(image, 256, 224)
        assert center.shape == (224, 224, 3)
    # a constant image stays constant through the crop and the resize
    flat = np.full((300, 400, 3), 77, np.uint8)
    assert (aug.random_resized_crop(flat, rng) == 77).all()
    # the centre crop of an image already 256 on the short side is its centre
    image = rng.integers(0, 256, size=(256, 300, 3), dtype=np.uint8)
    np.testing.assert_array_equal(aug.resize_center_crop(image), image[16:240, 38:262])


@pytest.mark.parametrize("op", aug.RAND_AUGMENT_OPS)
def test_each_rand_augment_op_keeps_shape_and_changes_the_image(op):
    from PIL import Image

    image = _images(1, 64)[0]
    out = np.asarray(aug._apply_rand_augment_op(Image.fromarray(image), op, 7.0,
                                                np.random.default_rng(0)))  # fmt: skip
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_rand_augment_is_seeded_and_sometimes_identity():
    image = _images(1, 48)[0]
    a = aug.rand_augment(image, np.random.default_rng(5))
    b = aug.rand_augment(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    unchanged = sum(
        np.array_equal(aug.rand_augment(image, np.random.default_rng(s)), image) for s in range(40)
    )
    # each of the 2 ops is skipped with probability 1/2: ~1/4 of the draws are identity
    assert 3 <= unchanged <= 20


def test_mixup_cutmix_labels_sum_to_one_and_mix_pairs():
    import jax
    import jax.numpy as jnp

    images = jnp.asarray(_images(8, 16), jnp.float32).reshape(2, 4, 16, 16, 3)
    labels = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]])
    fn = jax.jit(aug.mixup_cutmix, static_argnames=("num_classes",))
    kinds = set()
    for seed in range(12):
        mixed, soft = fn(jax.random.key(seed), images, labels, num_classes=10)
        assert mixed.shape == images.shape and soft.shape == (2, 4, 10)
        np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
        # lam recovered from the soft label of the example's own class
        own = jnp.take_along_axis(soft, labels[..., None], -1)[..., 0]
        lam = float((own[0, 0] - 0.01) / 0.9)
        flipped = jnp.flip(images, axis=1)
        mix = lam * images + (1 - lam) * flipped
        if np.allclose(mixed, mix, atol=1e-3):
            kinds.add("mixup")
        else:
            from_own = np.isclose(mixed, images).all(axis=(0, 1, 4))
            from_flip = np.isclose(mixed, flipped).all(axis=(0, 1, 4))
            assert (from_own | from_flip).all()
            np.testing.assert_allclose(from_own.mean(), lam, atol=1e-6)  # lam = area kept
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_mix_batch_uses_the_imagenet_recipe_numbers():
    import jax
    import jax.numpy as jnp

    spec = sd.DATASETS["imagenet2012"]
    assert (spec.mixup_alpha, spec.cutmix_alpha, spec.label_smoothing) == (0.1, 1.0, 0.1)
    batch = {"image": jnp.ones((2, 4, 8, 8, 3)), "label": jnp.arange(8).reshape(2, 4),
             "mask": jnp.ones((2, 4), bool)}  # fmt: skip
    mix = jax.jit(lambda key, b: aug.mix_batch(
        key, b, 1000, mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha,
        label_smoothing=spec.label_smoothing))  # fmt: skip
    out = mix(jax.random.key(1), batch)
    assert out["soft_label"].shape == (2, 4, 1000)
    np.testing.assert_array_equal(out["mask"], batch["mask"])
    np.testing.assert_allclose(out["image"], 1.0)  # mixing identical images changes nothing
    assert float(out["soft_label"].min()) == pytest.approx(0.1 / 1000)


def test_mixup_cutmix_rejects_bad_shapes():
    import jax
    import jax.numpy as jnp

    with pytest.raises(ValueError, match="labels"):
        aug.mixup_cutmix(jax.random.key(0), jnp.zeros((4, 8, 8, 3)), jnp.zeros((3,), int), 10)


def test_random_crop_flip_on_device_is_a_window():
    import jax
    import jax.numpy as jnp

    images = _images(4, 16)
    out = np.asarray(aug.random_crop_flip_on_device(jax.random.key(0), jnp.asarray(images)))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for pad, y in zip(padded, out):
        windows = [pad[dy : dy + 16, dx : dx + 16] for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(w, y) or np.array_equal(w[:, ::-1], y) for w in windows)
