"""Seed 004's recipe as spec section 7 describes it, against NumPy/PyTorch re-derivations.

- the auxiliary losses (feature decay on every residual add, attention on the first
  blocks) and their effective weights, from a float64 NumPy forward of the ViT;
- LAMB's parameter groups, trust ratio and both clips, from a float64 NumPy
  re-derivation of timm's ``Lamb`` fed the config's optimizer section;
- the timm initialisation, against the distributions PyTorch's own initialisers draw;
- the depth-24 LearnableScaler ViT's residual stream at initialisation;
- bf16 autocast (matmuls only) and the timm eval preprocessing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import special, stats

from experiments.configs import learnable_scaler_vit
from sing_jax.data import augment, spec_with
from sing_jax.nn import models
from sing_jax.train import optimizers


def _pure(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------ NumPy ViT forward
def _norm(x, p, kind):
    if kind == "learnable_scaler":  # y = a x + b
        return x * p["scale"] + p["bias"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]  # timm: eps 1e-6


def _linear(x, p):
    return x @ p["kernel"] + p["bias"]


def numpy_vit(params, x, *, patch, heads, kind):
    """timm's ViT forward in float64: logits, residual-stream values, attention probs."""
    batch, height, width, chans = x.shape
    grid = x.reshape(batch, height // patch, patch, width // patch, patch, chans)
    patches = grid.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch * patch * chans)
    kernel = params["patch_embed"]["kernel"]
    tokens = patches @ kernel.reshape(-1, kernel.shape[-1]) + params["patch_embed"]["bias"]
    dim = tokens.shape[-1]
    cls = np.broadcast_to(params["cls_token"], (batch, 1, dim))
    h = np.concatenate([cls, tokens], 1) + params["pos_embed"]
    streams, probs = [], []
    for index in sorted(params["blocks"]):
        block = params["blocks"][index]
        qkv = _linear(_norm(h, block["norm1"], kind), block["attn"]["qkv"])
        qkv = qkv.reshape(batch, -1, 3, heads, dim // heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim // heads)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
        h = h + _linear(out, block["attn"]["proj"])
        streams.append(h)
        hidden = _linear(_norm(h, block["norm2"], kind), block["fc1"])
        hidden = 0.5 * hidden * (1 + special.erf(hidden / math.sqrt(2)))  # exact GELU
        h = h + _linear(hidden, block["fc2"])
        streams.append(h)
        probs.append(attn)
    logits = _linear(_norm(h, params["norm"], kind)[:, 0], params["head"])
    return logits, streams, probs


def feature_decay_reference(h, threshold):
    magnitude = np.abs(h)
    danger = magnitude[magnitude > threshold] - threshold
    return danger.mean() + danger.max() if danger.size else 0.0


def attention_reference(attn, threshold):
    row_max = attn.max(-1)
    low = row_max[row_max < threshold]
    return 1.0 - low.mean() if low.size else 0.0


def _between_middle_values(values):
    """A threshold halfway between the two distinct values around the median."""
    distinct = np.unique(values)
    middle = len(distinct) // 2
    return float((distinct[middle - 1] + distinct[middle]) / 2)


@pytest.mark.parametrize("kind", ["learnable_scaler", "layer"])
def test_aux_losses_and_forward_match_numpy(kind, x64):
    # Inputs x 300 reach the 200 danger zone; thresholds then set from the reference's
    # own values so that both sides of each mask are populated, halfway between two of
    # them so that round-off cannot move a value across.
    config = dict(image_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, norm=kind,
                  attn_extra_loss_layers=2, init="timm", param_dtype=jnp.float64)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)) * 300.0
    params = _pure(models.ViT(10, rngs=nnx.Rngs(0), **config))
    want_logits, streams, probs = numpy_vit(params, x, patch=4, heads=2, kind=kind)
    decay_threshold = _between_middle_values(np.abs(np.concatenate([s.ravel() for s in streams])))
    attn_threshold = _between_middle_values(np.concatenate([p.max(-1).ravel() for p in probs[:2]]))
    model = models.ViT(10, rngs=nnx.Rngs(0), feature_decay_threshold=decay_threshold,
                       attn_max_threshold=attn_threshold, **config)
    logits, aux = nnx.jit(lambda m, x: m(x, return_aux=True))(model, jnp.asarray(x))
    np.testing.assert_allclose(logits, want_logits, rtol=1e-9, atol=1e-9)

    decay = sum(feature_decay_reference(s, decay_threshold) for s in streams)
    attention = sum(attention_reference(p, attn_threshold) for p in probs[:2])
    assert decay > 0 and attention > 0
    np.testing.assert_allclose(aux["feature_decay"], decay, rtol=1e-9)
    np.testing.assert_allclose(aux["attn_extra"], attention, rtol=1e-9)
    # The reference: each block adds flag_fd * decay terms and flag_attn * attention
    # terms; the script multiplies the blocks' sum by flag_fd again.
    flag_fd, flag_attn = 0.1, 0.03
    want = flag_fd * (flag_fd * decay + flag_attn * attention)
    weights = models.reference_aux_loss_weights(flag_fd, flag_attn)
    np.testing.assert_allclose(models.learnable_scaler_aux_loss(aux, **weights), want,
                               rtol=1e-9)
    np.testing.assert_allclose(models.learnable_scaler_aux_loss(aux), want, rtol=1e-9)
    # the config trains with those weights; no feature decay means no attention term
    config = learnable_scaler_vit.get_config("16,192,24,learnable_scaler")
    np.testing.assert_allclose([config.aux_loss.feature_decay, config.aux_loss.attn_extra],
                               [0.01, 0.003], rtol=1e-12)
    assert models.reference_aux_loss_weights(0.0, 0.03) == {"feature_decay": 0.0,
                                                           "attn_extra": 0.0}


# ------------------------------------------------------------------ LAMB (timm)
def timm_groups(params):
    """Spec section 7: decay (and trust ratio) only on ndim > 1, not biases/pos_embed/cls_token."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    decayed = [leaf.ndim > 1 and not name.endswith("bias")
               and name.rsplit("/", 1)[-1] not in ("pos_embed", "cls_token")
               for name, (_, leaf) in zip(names, flat)]
    return names, decayed


class NumpyTimmLamb:
    """clip_grad_norm_(clip) then timm's Lamb (global clip 1.0, groups by weight decay)."""

    def __init__(self, params, decayed, lr, wd, clip, b1=0.9, b2=0.999, eps=1e-6):
        self.p = [np.array(x, np.float64) for x in params]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.decayed, self.t = decayed, 0
        self.lr, self.wd, self.clip, self.b1, self.b2, self.eps = lr, wd, clip, b1, b2, eps

    def step(self, grads):
        grads = [np.array(g, np.float64) for g in grads]
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        grads = [g * min(1.0, self.clip / (norm + 1e-6)) for g in grads]  # torch's clip
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        grads = [g / max(norm / 1.0, 1.0) for g in grads]  # Lamb's max_grad_norm=1.0
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for i, g in enumerate(grads):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            update = (self.m[i] / bc1) / (np.sqrt(self.v[i]) / math.sqrt(bc2) + self.eps)
            if self.decayed[i]:
                update = update + self.wd * self.p[i]
                w_norm, u_norm = np.linalg.norm(self.p[i]), np.linalg.norm(update)
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            self.p[i] = self.p[i] - self.lr * update
        return self.p


def test_lamb_groups_trust_ratio_and_clips_match_timm(x64):
    config = learnable_scaler_vit.get_config("16,192,24,learnable_scaler,tiny")
    opt = config.optimizer.to_dict()
    assert (opt["b1"], opt["b2"], opt["eps"], opt["weight_decay"], opt["clip_grad_norm"],
            opt["max_grad_norm"], opt["learning_rate"]) == (0.9, 0.999, 1e-6, 0.02, 14.0,
                                                             1.0, 5e-3)
    model = models.ViT(10, image_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                       norm="learnable_scaler", init="timm", param_dtype=jnp.float64,
                       rngs=nnx.Rngs(1))
    params = jax.tree.map(jnp.asarray, _pure(model))
    names, decayed = timm_groups(params)
    assert [n for n, d in zip(names, decayed) if d] == [
        "blocks/0/attn/proj/kernel", "blocks/0/attn/qkv/kernel", "blocks/0/fc1/kernel",
        "blocks/0/fc2/kernel", "head/kernel", "patch_embed/kernel"]
    assert jax.tree.leaves(optimizers.lamb_decay_mask(params)) == decayed

    accum = opt["grad_accum_steps"]
    tx = optimizers.build_optimizer(opt, opt["learning_rate"], params)
    state, update = tx.init(params), jax.jit(tx.update)
    leaves, treedef = jax.tree.flatten(params)
    reference = NumpyTimmLamb(leaves, decayed, opt["learning_rate"], opt["weight_decay"],
                              opt["clip_grad_norm"])
    rng = np.random.default_rng(2)
    # accumulated-gradient norms above 14, between 1 and 14, and below 1; the draws are
    # float32 numbers because optax.MultiSteps keeps its accumulator in float32 here
    for scale in (40.0, 3.0, 0.05, 8.0, 0.2):
        micro = [[(rng.normal(size=leaf.shape) * scale / math.sqrt(leaf.size * len(leaves))
                   ).astype(np.float32).astype(np.float64)
                  for leaf in leaves] for _ in range(accum)]
        for grads in micro:
            updates, state = update(treedef.unflatten([jnp.asarray(g) for g in grads]),
                                    state, params)
            params = optax.apply_updates(params, updates)
        want = reference.step([np.mean(gs, axis=0) for gs in zip(*micro)])
        for got, expected in zip(jax.tree.leaves(params), want):
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_lamb_without_weight_decay_has_no_trust_ratio():
    # timm: weight_decay=0 puts every leaf in one undecayed group, so no layer adaptation
    params = {"w": jnp.full((3, 2), 10.0)}
    grads = {"w": jnp.full((3, 2), 1e-3)}
    tx = optimizers.build_optimizer(dict(name="lamb", learning_rate=0.1, weight_decay=0.0),
                                    0.1, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 / (1 + 1e-6 / 1e-3), rtol=1e-5)


# ------------------------------------------------------------------ timm initialisation
def test_timm_init_draws_the_distributions_of_pytorch_initialisers():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    embed, hidden, patch, classes = 64, 256, 8, 100
    model = models.ViT(classes, image_size=32, patch_size=patch, embed_dim=embed, depth=2,
                       num_heads=2, norm="layer", init="timm", rngs=nnx.Rngs(3))
    params = _pure(model)
    linear = torch.nn.Linear(embed, hidden)  # timm: trunc_normal_(std=.02), bias 0
    torch.nn.init.trunc_normal_(linear.weight, std=0.02)
    conv = torch.nn.Conv2d(3, embed, patch, patch)  # PyTorch's default
    cls_token = torch.nn.init.normal_(torch.empty(1, 1, embed), std=1e-6)
    pos_embed = torch.nn.init.trunc_normal_(torch.empty(1, 17, embed), std=0.02)
    pairs = {
        "fc1 kernel": (params["blocks"][0]["fc1"]["kernel"], linear.weight),
        "patch kernel": (params["patch_embed"]["kernel"], conv.weight),
        "patch bias": (params["patch_embed"]["bias"], conv.bias),
        "cls_token": (params["cls_token"], cls_token),
        "pos_embed": (params["pos_embed"], pos_embed),
    }
    for name, (ours, theirs) in pairs.items():
        theirs = theirs.detach().numpy().ravel()
        assert ours.size == theirs.size, name
        # the same distribution (two-sample Kolmogorov-Smirnov) and spread
        assert stats.ks_2samp(ours.ravel(), theirs).pvalue > 1e-3, name
        np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.15, err_msg=name)
    bound = 1 / math.sqrt(3 * patch * patch)
    assert np.abs(params["patch_embed"]["kernel"]).max() <= bound
    for block in params["blocks"].values():
        for layer in (block["attn"]["qkv"], block["attn"]["proj"], block["fc1"],
                      block["fc2"]):
            np.testing.assert_allclose(layer["kernel"].std(), 0.02, rtol=0.1)
            assert np.all(layer["bias"] == 0)
        for norm in (block["norm1"], block["norm2"]):
            assert np.all(norm["scale"] == 1) and np.all(norm["bias"] == 0)
    np.testing.assert_allclose(params["head"]["kernel"].std(), 0.02, rtol=0.1)
    assert np.all(params["head"]["bias"] == 0)
    assert model.blocks[0].norm1.epsilon == 1e-6  # timm's LayerNorm eps
    scaler = models.ViT(classes, image_size=32, patch_size=patch, embed_dim=embed, depth=1,
                        num_heads=2, norm="learnable_scaler", init="timm", rngs=nnx.Rngs(4))
    a = np.asarray(scaler.blocks[0].norm1.scale[...])  # the reference: a ~ N(0, 1), b = 0
    assert stats.kstest(a, "norm").pvalue > 1e-3
    assert np.all(np.asarray(scaler.blocks[0].norm1.bias[...]) == 0)


def test_depth24_learnable_scaler_stream_is_order_one_at_init():
    # Seed 003's default (Glorot/He) init compounds through the 48 residual branches
    # to an RMS of ~5e5 here; timm's init keeps it near 0.5 (measured).
    model = models.ViT(10, image_size=32, patch_size=16, embed_dim=192, depth=24, num_heads=3,
                       norm="learnable_scaler", init="timm",
                       rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))

    @nnx.jit
    def stream_rms(model, x):
        tokens = model.patch_embed(x).reshape(x.shape[0], -1, 192)
        cls = jnp.broadcast_to(model.cls_token[...], (x.shape[0], 1, 192))
        h = jnp.concatenate([cls, tokens], 1) + model.pos_embed[...]
        out = []
        for block in model.blocks:
            h, _, _ = block(h)
            out.append(jnp.sqrt(jnp.mean(h * h)))
        return jnp.stack(out)

    rms = np.asarray(stream_rms(model, jax.random.normal(jax.random.key(1), (2, 32, 32, 3))))
    assert rms.shape == (24,) and np.all(rms > 0.05) and np.all(rms < 5.0), rms


# ------------------------------------------------------------------ precision, input
def test_bf16_matmuls_keep_stream_norms_and_softmax_in_float32():
    kwargs = dict(image_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                  norm="learnable_scaler", init="timm")
    mixed = models.ViT(10, matmul_dtype="bfloat16", rngs=nnx.Rngs(5), **kwargs)
    full = models.ViT(10, rngs=nnx.Rngs(5), **kwargs)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))

    @nnx.jit  # one compile for every probe
    def probe(mixed, full, x):
        block = mixed.blocks[0]
        h = jnp.zeros((2, 5, 16), jnp.float32) + 0.5
        normed = block.norm1(h)
        return (mixed.patch_embed(x), normed, block.attn.qkv(normed), block(h),
                mixed(x), full(x))

    tokens, normed, qkv, (h_out, h_attn, probs), logits, want = probe(mixed, full, x)
    assert tokens.dtype == qkv.dtype == jnp.bfloat16  # the conv and Linear layers
    assert normed.dtype == jnp.float32  # LearnableScaler's affine map
    assert (h_out.dtype, h_attn.dtype, probs.dtype) == (jnp.float32,) * 3  # stream, softmax
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(mixed, nnx.Param)))
    assert logits.dtype == jnp.bfloat16 and want.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits, np.float32), want, rtol=0.05, atol=2e-3)


def test_timm_eval_preprocessing():
    spec = spec_with("imagenet2012", dict(mean=augment.INCEPTION_MEAN,
                                          std=augment.INCEPTION_STD, eval_crop_pct=0.9,
                                          eval_interpolation="bicubic"))
    assert augment.eval_resize_size(224, spec.eval_crop_pct) == 248
    assert augment.eval_resize_size(224, 0.875) == 256  # the default is unchanged
    assert augment.fill_colour(spec.mean) == (128, 128, 128)
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    from PIL import Image

    want = np.asarray(Image.fromarray(image).resize((331, 248), Image.BICUBIC))
    got = augment.resize_center_crop(image, 248, 224, "bicubic")
    np.testing.assert_array_equal(got, want[12:236, 53:277])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['crop'\]"):
        spec_with("imagenet2012", {"crop": 0.9})
    with pytest.raises(ValueError, match=r"mean=\(0.5,\) has 1 values"):
        spec_with("imagenet2012", {"mean": (0.5,)})
    config = learnable_scaler_vit.get_config("16,192,24,layer")
    assert (config.dataset.eval_crop_pct, config.dataset.eval_interpolation,
            tuple(config.dataset.mean), tuple(config.dataset.extra_test)) == (
        0.9, "bicubic", (0.5, 0.5, 0.5), ("imagenet_v2",))
    assert config.eval_batch_size % 8 == 0
    assert {learnable_scaler_vit.get_config(f"{p},{e},{d},{n}").optimizer.learning_rate
            for p, e, d in learnable_scaler_vit.TABLE for n in ("layer",
                                                                "learnable_scaler")} == {5e-3}
