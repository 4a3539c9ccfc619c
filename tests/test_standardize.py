"""SING's gradient standardisation pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sing_jax


def chained(grads):
    c, n = sing_jax.centralize_gradients(), sing_jax.normalize_gradients()
    out, _ = c.update(grads, c.init(grads))
    out, _ = n.update(out, n.init(out))
    return out


def fused(grads):
    tx = sing_jax.centralize_and_normalize_gradients()
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    return out


@pytest.mark.parametrize("mean_scale", [0.0, 1.0, 1e4])  # 1e4: the exact fallback branch
def test_fused_standardisation_equals_the_two_steps(mean_scale):
    keys = jax.random.split(jax.random.key(0), 4)
    grads = {"conv": jax.random.normal(keys[0], (3, 3, 4, 8)),
             "dense": jax.random.normal(keys[1], (5, 6)),
             "bias": jax.random.normal(keys[2], (6,))}
    grads["conv"] = grads["conv"] + mean_scale * jax.random.normal(keys[3], (8,))
    want, got = chained(grads), fused(grads)
    for k in grads:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-6)
        if k != "bias":  # centred per output channel, unit norm overall
            # float32 centring of means 1e4 times the spread leaves ~1e-5 after normalising
            np.testing.assert_allclose(jnp.mean(got[k], axis=tuple(range(got[k].ndim - 1))),
                                       0.0, atol=1e-6 if mean_scale <= 1 else 2e-4)
        np.testing.assert_allclose(jnp.linalg.norm(got[k]), 1.0, rtol=1e-4)


def test_fused_standardisation_keeps_bfloat16_and_handles_zero_gradients():
    grads = {"w": jax.random.normal(jax.random.key(1), (4, 3), jnp.bfloat16),
             "zero": jnp.zeros((4, 3))}
    out = fused(grads)
    assert out["w"].dtype == jnp.bfloat16
    assert np.all(np.asarray(out["zero"]) == 0.0)


def _reference_centralize(g_torch):
    """The reference: subtract the mean over every axis but PyTorch's axis 0 (ndim > 1)."""
    if g_torch.ndim <= 1:
        return g_torch
    return g_torch - g_torch.mean(axis=tuple(range(1, g_torch.ndim)), keepdims=True)


def _to_torch_layout(path, leaf):
    # Flax kernels keep the output channel last; PyTorch first. Embeddings are shared.
    if path.endswith("kernel") and leaf.ndim == 2:
        return leaf.T, lambda t: t.T
    if path.endswith("kernel") and leaf.ndim == 4:
        return leaf.transpose(3, 2, 0, 1), lambda t: t.transpose(2, 3, 1, 0)
    return leaf, lambda t: t


def test_centralisation_follows_the_reference_on_a_vit_and_trains_its_embeddings():
    from flax import nnx

    from sing_jax._src.paths import path_str
    from sing_jax.nn import models

    model = models.ViT(10, image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                       rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    spec = sing_jax.output_channel_dims(params)
    assert spec["cls_token"].axes == (0,) and spec["pos_embed"].axes == (0,)
    assert spec["patch_embed"]["kernel"].axes == (-1,) and spec["head"]["bias"] is None
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(jax.tree.structure(params),
                               [jnp.asarray(rng.normal(size=p.shape), jnp.float32)
                                for _, p in flat])
    c = sing_jax.centralize_gradients()
    got, _ = c.update(grads, c.init(params))
    for (path, _), g, out in zip(flat, jax.tree.leaves(grads), jax.tree.leaves(got)):
        name = path_str(path)
        torch_g, back = _to_torch_layout(name, np.asarray(g, np.float64))
        np.testing.assert_allclose(out, back(_reference_centralize(torch_g)), atol=1e-6,
                                   err_msg=name)
    # cls_token (1, 1, D): the global mean is removed, the gradient is not zeroed
    assert float(jnp.abs(got["cls_token"]).min()) > 0
    np.testing.assert_allclose(got["cls_token"], grads["cls_token"] - grads["cls_token"].mean(),
                               atol=1e-6)
    # one SING step moves both embeddings
    tx = sing_jax.sing(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["cls_token"]).min()) > 0
    assert float(jnp.abs(updates["pos_embed"]).min()) > 0


def test_centralisation_never_zeroes_an_embedding_with_single_element_groups():
    # A (N, 1) embedding: the reference's axis-0 groups hold one element each; it is
    # left uncentred instead of zeroed.
    grads = {"pos_embed": jnp.arange(1.0, 4.0).reshape(3, 1),
             "cls_token": jnp.ones((1, 1, 1))}
    assert sing_jax.output_channel_dims(grads) == {"pos_embed": None, "cls_token": None}
    out = chained(grads)
    np.testing.assert_allclose(out["pos_embed"], grads["pos_embed"] / np.sqrt(14.0),
                               rtol=1e-6)
    np.testing.assert_allclose(out["cls_token"], 1.0, rtol=1e-6)
