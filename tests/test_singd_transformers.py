"""SINGD on transformers built from Flax's own layers.

``nnx.MultiHeadAttention`` projects with ``nnx.LinearGeneral``; a ViT built from it,
plain or with its blocks stacked under ``nnx.scan``, gets every attention and MLP
kernel preconditioned; the scanned stack trains exactly like the unrolled one; a
transformer block matches the PyTorch reference (``singd`` 0.0.5) on its
``nn.Linear`` twin; bf16 training keeps float32 factors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sing_jax
from sing_jax import train
from sing_jax.nn.models import ViT


def tiny_vit(scan, dtype=jnp.float32, seed=0):
    """A ViT-Tiny-shaped model: 2 blocks of width 16 on 8x8 images, Flax attention."""
    return ViT(4, image_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
               mlp_ratio=2.0, attention="mha", scan_blocks=scan, attn_extra_loss_layers=0,
               dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def images(dtype=jnp.float32, n=32):
    x = jax.random.normal(jax.random.key(0), (n, 8, 8, 3), dtype)
    return x, jnp.arange(n) % 4


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def other_parameters(state):
    report = sing_jax.singd_report(state).splitlines()
    start = next(i for i, line in enumerate(report) if "other parameters" in line)
    return sorted(line.strip() for line in report[start + 1:])


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned"])
def test_every_attention_and_mlp_kernel_is_preconditioned(scan):
    model = tiny_vit(scan)
    tx = sing_jax.singd(layers=sing_jax.singd_layers(model))
    state = tx.init(nnx.state(model, nnx.Param))
    blocks = ["blocks"] if scan else ["blocks/0", "blocks/1"]
    projections = ["attn/mha/query", "attn/mha/key", "attn/mha/value", "attn/mha/out",
                   "fc1", "fc2"]
    want = {f"{b}/{p}" for b in blocks for p in projections} | {"patch_embed", "head"}
    layers = {lp.config.path: lp for lp in sing_jax.singd_state(state).layers}
    assert set(layers) == want
    if scan:  # one pair of factors per stacked block
        assert layers["blocks/attn/mha/out"].k.to_dense().shape == (2, 17, 17)
    norms = [f"{b}/{n}/{p}" for b in blocks for n in ("norm1", "norm2")
             for p in ("bias", "scale")]
    assert other_parameters(state) == sorted(
        norms + ["cls_token", "pos_embed", "norm/bias", "norm/scale"])


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scanned"])
@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical"])
def test_vit_training_lowers_the_loss_a_hundredfold(structure, scan):
    # 150 SINGD steps (T=2) memorise 32 random images; embeddings and norms frozen
    # (other=None), so the preconditioned kernels do the work.
    model = tiny_vit(scan)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = sing_jax.singd(0.02, T=2, lr_cov=0.05, structures=(structure, structure),
                        layers=sing_jax.singd_layers(model), other=None)
    x, y = images()

    def step(carry, _):
        params, state = carry
        model = nnx.merge(graphdef, params, rest, copy=True)
        (loss, grads), stats = sing_jax.singd_value_and_grad(loss_fn, model, x, y,
                                                             opt_state=state)
        updates, state = tx.update(grads, state, params, singd_stats=stats)
        return (optax.apply_updates(params, updates), state), loss

    train_steps = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), length=150)[1])
    losses = np.asarray(train_steps(params, tx.init(params)))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])


def test_scanned_blocks_train_exactly_like_unrolled_ones():
    with jax.enable_x64(True):
        scanned, unrolled = tiny_vit(True, jnp.float64), tiny_vit(False, jnp.float64, seed=1)
        weights = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
        stacked = weights.pop("blocks")
        weights["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(2)}
        nnx.update(unrolled, weights)
        x, y = images(jnp.float64, n=8)
        runs = []
        for model in (scanned, unrolled):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            tx = sing_jax.singd(0.05, T=2, lr_cov=0.1, preconditioner_dtype=None,
                                structures=("hierarchical", "dense"), other=optax.sgd(0.1),
                                layers=sing_jax.singd_layers(model))
            state = tx.init(params)

            @jax.jit
            def step(params, state, graphdef=graphdef, rest=rest, tx=tx):
                model = nnx.merge(graphdef, params, rest, copy=True)
                (_, grads), stats = sing_jax.singd_value_and_grad(loss_fn, model, x, y,
                                                                  opt_state=state)
                updates, state = tx.update(grads, state, params, singd_stats=stats)
                return optax.apply_updates(params, updates), state

            for _ in range(3):
                params, state = step(params, state)
            runs.append((nnx.to_pure_dict(params), sing_jax.singd_state(state)))
        (p_scan, s_scan), (p_unrolled, s_unrolled) = runs
        factors = {lp.config.path: lp for lp in s_unrolled.layers}
        for lp in s_scan.layers:
            for i in range(2 if lp.config.path.startswith("blocks") else 1):
                path = lp.config.path.replace("blocks", f"blocks/{i}")
                twin = factors[path]
                for ours, theirs in ((lp.k, twin.k), (lp.c, twin.c), (lp.m_k, twin.m_k)):
                    mat = ours.to_dense() if lp.config.num_stacked == 0 else jax.vmap(
                        type(ours).to_dense)(ours)[i]
                    np.testing.assert_allclose(mat, theirs.to_dense(), rtol=1e-10,
                                               atol=1e-12, err_msg=path)
        stacked = p_scan.pop("blocks")
        p_scan["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(2)}
        for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p_unrolled), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_training_keeps_float32_factors():
    model = tiny_vit(False)
    tx = sing_jax.singd(0.02, T=1, lr_cov=0.05, layers=sing_jax.singd_layers(model))
    state = train.TrainState.create(model, tx, rng=0)
    step = train.make_train_step(tx, mesh=train.data_mesh(jax.devices()[:1]),
                                 options=train.StepOptions(singd=True,
                                                           compute_dtype=jnp.bfloat16))
    state = step.place_state(state)
    x, y = images(n=16)
    batch = {"image": np.asarray(x), "label": np.asarray(y)}
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(10):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
    for lp in sing_jax.singd_state(state.opt_state).layers:
        assert lp.k.dtype == lp.c.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


# --- parity with PyTorch singd 0.0.5 on a transformer block ------------------------------------
D, HEADS, FF, TOKENS, BATCH, CLASSES = 8, 2, 12, 5, 4, 3


class JaxBlock(nnx.Module):
    """Pre-norm transformer block on (batch, tokens, D), mean-pooled into a head."""

    def __init__(self, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(D, **kw)
        self.attn = nnx.MultiHeadAttention(HEADS, D, qkv_features=D, out_features=D,
                                           decode=False, **kw)
        self.norm2 = nnx.LayerNorm(D, **kw)
        self.fc1 = nnx.Linear(D, FF, **kw)
        self.fc2 = nnx.Linear(FF, D, **kw)
        self.head = nnx.Linear(D, CLASSES, **kw)

    def __call__(self, x):
        h = x + self.attn(self.norm1(x))
        h = h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h)), approximate=False))
        return self.head(h.mean(axis=1))


def torch_block(torch):
    nn = torch.nn

    class TorchBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
            self.query, self.key, self.value = (nn.Linear(D, D) for _ in range(3))
            self.out = nn.Linear(D, D)
            self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)
            self.head = nn.Linear(D, CLASSES)

        def forward(self, x):
            b, t, _ = x.shape
            z = self.norm1(x)
            q, k, v = (layer(z).reshape(b, t, HEADS, D // HEADS)
                       for layer in (self.query, self.key, self.value))
            logits = torch.einsum("bqhd,bkhd->bhqk", q / (D // HEADS) ** 0.5, k)
            mixed = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
            h = x + self.out(mixed.reshape(b, t, D))
            h = h + self.fc2(nn.functional.gelu(self.fc1(self.norm2(h))))
            return self.head(h.mean(1))

    return TorchBlock()


# ours -> PyTorch: the layer paths and how a Flax kernel becomes nn.Linear's weight
LAYERS = {"attn/query": "query", "attn/key": "key", "attn/value": "value",
          "attn/out": "out", "fc1": "fc1", "fc2": "fc2", "head": "head"}


def as_torch_weight(kernel, path):
    """LinearGeneral (D, H, Dh) / (H, Dh, D) kernels flattened as nn.Linear's (out, in)."""
    if path == "attn/out":
        return kernel.reshape(-1, kernel.shape[-1]).T
    return kernel.reshape(kernel.shape[0], -1).T


def run_block_parity(ref_structure, ours, cfg, steps, x64):
    torch = pytest.importorskip("torch")
    singd_ref = pytest.importorskip("singd.optim.optimizer")
    tdtype, jdtype = (torch.float64, jnp.float64) if x64 else (torch.float32, jnp.float32)
    torch.manual_seed(0)
    tnet, jnet = torch_block(torch).to(tdtype), JaxBlock(jdtype, nnx.Rngs(0))
    weights = nnx.to_pure_dict(nnx.state(jnet, nnx.Param))
    for path, name in LAYERS.items():
        layer, target = getattr(tnet, name), weights
        for part in path.split("/"):
            target = target[part]
        w = layer.weight.detach().numpy().copy()
        target["kernel"] = jnp.asarray(w.T.reshape(target["kernel"].shape), jdtype)
        target["bias"] = jnp.asarray(layer.bias.detach().numpy().copy().reshape(
            target["bias"].shape), jdtype)
    for norm in ("norm1", "norm2"):
        weights[norm]["scale"] = jnp.ones(D, jdtype)
        weights[norm]["bias"] = jnp.zeros(D, jdtype)
    nnx.update(jnet, weights)
    linear = [p for n, p in tnet.named_parameters() if not n.startswith("norm")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = singd_ref.SINGD(tnet, params=linear, lr=0.1, damping=1e-3,
                              structures=(ref_structure,) * 2,
                              preconditioner_dtype=(None, None), **cfg)
    tx = sing_jax.singd(0.1, damping=1e-3, structures=(ours,) * 2, preconditioner_dtype=None,
                        other=None, layers=sing_jax.singd_layers(jnet), **cfg)
    graphdef, params, rest = nnx.split(jnet, nnx.Param, ...)
    state = tx.init(params)
    rng = np.random.default_rng(0)

    def loss_jax(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @jax.jit
    def step(params, state, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        (_, grads), stats = sing_jax.singd_value_and_grad(loss_jax, model, x, y,
                                                          opt_state=state)
        updates, state = tx.update(grads, state, params, singd_stats=stats)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(steps):
        xb, yb = rng.normal(size=(BATCH, TOKENS, D)), rng.integers(0, CLASSES, BATCH)
        ref.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.functional.cross_entropy(tnet(torch.tensor(xb, dtype=tdtype)),
                                              torch.tensor(yb)).backward()
            ref.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LayerNorms go to `other` (None here)
            params, state = step(params, state, jnp.asarray(xb, jdtype), jnp.asarray(yb))
        ours_layers = {lp.config.path: lp for lp in sing_jax.singd_state(state).layers}
        current = nnx.to_pure_dict(params)
        snap = []
        for path, name in LAYERS.items():
            lp = ours_layers[path]
            snap += [(f"{path}.K", lp.k.to_dense(), ref.Ks[name].to_dense()),
                     (f"{path}.C", lp.c.to_dense(), ref.Cs[name].to_dense())]
            if lp.m_k is not None:
                snap += [(f"{path}.mK", lp.m_k.to_dense(), ref.m_Ks[name].to_dense()),
                         (f"{path}.mC", lp.m_c.to_dense(), ref.m_Cs[name].to_dense())]
            target = current
            for part in path.split("/"):
                target = target[part]
            layer = getattr(tnet, name)
            snap += [(f"{path}.kernel", as_torch_weight(target["kernel"], path),
                      layer.weight.detach()),
                     (f"{path}.bias", target["bias"].reshape(-1), layer.bias.detach())]
        history.append([(n, np.asarray(a), b.numpy().copy()) for n, a, b in snap])
    return history


BLOCK_CONFIGS = {
    "ingd": dict(kfac_like=False, alpha1=0.5, T=1, normalize_lr_cov=False, lr_cov=1e-2,
                 loss_average="batch", kfac_approx="expand", weight_decay=0.0, momentum=0.9),
    "ikfac_reduce_seq": dict(kfac_like=True, alpha1=0.0, T=2, normalize_lr_cov=True,
                             lr_cov=5e-2, loss_average="batch+sequence", kfac_approx="reduce",
                             weight_decay=1e-3, momentum=0.5),
}
BLOCK_CASES = [  # (reference structure, ours, config)
    ("dense", "dense", "ingd"), ("dense", "dense", "ikfac_reduce_seq"),
    ("diagonal", "diagonal", "ingd"),
    ("block30diagonal", sing_jax.singd_structures.structure(
        "block_diagonal", block_size=30, symmetric_blocks=True), "ingd"),
    ("hierarchical15_15", "hierarchical", "ikfac_reduce_seq"),
    ("triltoeplitz", "tril_toeplitz", "ingd"), ("triutoeplitz", "triu_toeplitz", "ingd"),
]


@pytest.mark.parametrize(("ref_structure", "ours", "config"), BLOCK_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in BLOCK_CASES])
def test_transformer_block_matches_pytorch_singd(ref_structure, ours, config):
    # The reference's other structures support float32 only. In float64 the two
    # attention implementations round differently by ~1e-11 a step, which 5 steps of
    # lr 0.1 grow to ~2e-9 (measured).
    x64 = ref_structure in ("dense", "diagonal")
    rtol, atol = (1e-7, 1e-8) if x64 else (2e-4, 2e-6)
    with jax.enable_x64(x64):
        history = run_block_parity(ref_structure, ours, BLOCK_CONFIGS[config], 5, x64=x64)
    for step, snap in enumerate(history):
        for name, got, want in snap:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol,
                                       err_msg=f"step {step}: {name}")
