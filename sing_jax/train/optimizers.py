"""Optimizers and learning-rate schedules from a config.

``config.optimizer`` names the optimizer and holds its keyword arguments; any key
that the optimizer does not take is an error (a typo is never ignored)::

    optimizer = dict(name='adamsrt', learning_rate=1e-3, b2=0.99, weight_decay=7.8125e-6,
                     channel_dims='conv', clip_grad_norm=None, grad_accum_steps=1)

Training-level keys, valid for every optimizer:

- ``channel_dims``: which leaves are spherical (AdamS/AdamSRT/SGDMRT/AdamG only):
  ``'none'`` (all Euclidean), ``'conv'`` (every kernel with ``ndim >= 3``, the seed
  001 protocol: the conv layers followed by BatchNorm), ``'auto'``
  (:func:`sing_jax.detect_channel_dims` on a training batch) or ``'rules'`` with
  ``channel_rules = [(regex, axes | None), ...]`` over '/'-joined parameter paths;
- ``clip_grad_norm``: clip the global gradient norm first (``None``/0: off);
- ``grad_accum_steps``: ``optax.MultiSteps`` over that many micro-batches;
- ``freeze``: a regex (or list) of parameter paths left untouched.

``config.schedule`` is a learning-rate multiplier over epochs (see :func:`build_schedule`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

import sing_jax
from sing_jax._src.channels import ChannelDims, channel_dims_from_rules
from sing_jax._src.paths import leaf_paths


def _adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0):
    """Adam with coupled L2 (``torch.optim.Adam``'s ``weight_decay``)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.adam(learning_rate, b1, b2, eps))


def _adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 1e-2):
    """AdamW, decoupled weight decay on every leaf (``torch.optim.AdamW``)."""
    return optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)


def _sgd(learning_rate, momentum: float = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0):
    """SGD with momentum and coupled L2 (``torch.optim.SGD``)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum or None, nesterov))


# timm's param_groups_weight_decay: no decay for 1-D leaves, '.bias' and the model's
# no_weight_decay() names (a ViT's pos_embed, cls_token, dist_token).
LAMB_NO_DECAY = ("bias", "pos_embed", "cls_token", "dist_token")


def lamb_decay_mask(params: Any, no_decay: Sequence[str] = LAMB_NO_DECAY) -> Any:
    """True for the leaves in timm's decayed group: ``ndim > 1`` and not named in ``no_decay``.

    A leaf's name is the last part of its path (``blocks/0/attn/qkv/bias`` -> ``bias``).
    """
    names = [path.rsplit("/", 1)[-1] for path in leaf_paths(params)]
    flags = [jax.numpy.ndim(leaf) > 1 and name not in no_decay
             for name, leaf in zip(names, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def _lamb(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
          weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
          no_decay: Sequence[str] = LAMB_NO_DECAY, always_adapt: bool = False):
    r"""LAMB as timm's ``Lamb`` with timm's two parameter groups (seed 004's optimizer).

    .. math::
      g \leftarrow g / \max(1, \lVert g \rVert / c), \quad
      u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda p, \quad
      p \leftarrow p - \eta\, \frac{\lVert p \rVert}{\lVert u \rVert}\, u

    with Adam's bias-corrected moments, ``c = max_grad_norm`` (timm's own global
    clip over every leaf, after any ``clip_grad_norm`` of the config). Weight decay
    ``lambda`` and the trust ratio (1 where either norm is 0) apply only to the
    decayed group (:func:`lamb_decay_mask`); the other leaves (biases, norms'
    affine parameters, LearnableScaler's ``a``/``b``, ``pos_embed``, ``cls_token``)
    take the plain Adam step ``p - eta u``. As in timm, ``weight_decay=0`` leaves a
    single undecayed group, so no leaf gets the trust ratio, and ``always_adapt``
    gives every leaf the trust ratio.
    """
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"lamb: weight_decay={weight_decay!r}; expected a float >= 0 "
                         "(timm groups the leaves by whether it is 0).")
    parts = [optax.clip_by_global_norm(float(max_grad_norm))] if max_grad_norm else []
    parts.append(optax.scale_by_adam(b1, b2, eps))
    if weight_decay:
        decayed = optax.chain(optax.add_decayed_weights(weight_decay),
                              optax.scale_by_trust_ratio())
        parts.append(optax.masked(decayed, lambda p: lamb_decay_mask(p, no_decay)))
        if always_adapt:
            parts.append(optax.masked(
                optax.scale_by_trust_ratio(),
                lambda p: jax.tree.map(lambda d: not d, lamb_decay_mask(p, no_decay))))
    elif always_adapt:
        parts.append(optax.scale_by_trust_ratio())
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# name -> (constructor, takes channel_dims)
OPTIMIZERS: dict[str, tuple[Callable[..., optax.GradientTransformation], bool]] = {
    "adam": (_adam, False),
    "adamw": (_adamw, False),
    "sgd": (_sgd, False),
    "lamb": (_lamb, False),
    "sing": (sing_jax.sing, False),
    "adams": (sing_jax.adams, True),
    "adamsrt": (sing_jax.adamsrt, True),
    "sgdmrt": (sing_jax.sgdmrt, True),
    "adamg": (sing_jax.adamg, True),
    "singd": (sing_jax.singd, False),
}
TRAINING_KEYS = ("name", "learning_rate", "channel_dims", "channel_rules", "clip_grad_norm",
                 "grad_accum_steps", "freeze")
CHANNEL_DIMS_MODES = ("none", "conv", "auto", "rules")


def _as_dict(cfg: Any) -> dict[str, Any]:
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def optimizer_kwargs(opt_cfg: Any) -> tuple[str, dict[str, Any]]:
    """The optimizer's name and constructor kwargs; errors on unknown names and keys."""
    cfg = _as_dict(opt_cfg)
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    constructor, _ = OPTIMIZERS[name]
    # The valid keys are the constructor's keyword arguments (config.optimizer is not a
    # locked ConfigDict: its keys depend on the optimizer, and a list of them would repeat
    # these). axis_name, other and SINGD's layers are wired by the training loop, not set
    # from a config.
    accepted = [p for p in inspect.signature(constructor).parameters
                if p not in ("learning_rate", "channel_dims", "axis_name", "other", "layers")]
    kwargs = {k: v for k, v in cfg.items() if k not in TRAINING_KEYS}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"config.optimizer: {name} takes no key(s) {unknown}; its keys are "
                         f"{sorted(accepted)} plus {list(TRAINING_KEYS)}")
    spec_mode = cfg.get("channel_dims", "none") or "none"
    if spec_mode not in CHANNEL_DIMS_MODES:
        raise ValueError(f"config.optimizer.channel_dims={spec_mode!r}; expected one of "
                         f"{CHANNEL_DIMS_MODES}")
    if spec_mode != "none" and not OPTIMIZERS[name][1]:
        raise ValueError(f"config.optimizer.channel_dims={spec_mode!r} but {name} has no "
                         "channel geometry; use one of adams, adamsrt, sgdmrt, adamg or "
                         "channel_dims='none'")
    for key, value in kwargs.items():
        if isinstance(value, list):  # ml_collections/JSON turn tuples into lists
            kwargs[key] = tuple(value)
    return name, kwargs


def conv_kernels(params: Any) -> Any:
    """Seed 001's channel-wise group: ``ChannelDims((-1,))`` for every leaf with ndim >= 3."""
    return jax.tree.map(lambda p: ChannelDims((-1,)) if p.ndim >= 3 else None, params)


def channel_dims_spec(opt_cfg: Any, params: Any,
                      detect: Callable[[], Any] | None = None) -> Any:
    """The channel spec tree the config asks for (``None`` for Euclidean everywhere)."""
    cfg = _as_dict(opt_cfg)
    mode = cfg.get("channel_dims", "none") or "none"
    if mode not in CHANNEL_DIMS_MODES:
        raise ValueError(f"config.optimizer.channel_dims={mode!r}; expected one of "
                         f"{CHANNEL_DIMS_MODES}")
    if mode == "none":
        return None
    if mode == "conv":
        return conv_kernels(params)
    if mode == "auto":
        if detect is None:
            raise ValueError("channel_dims='auto' needs a model and a batch to probe")
        return detect()
    rules = cfg.get("channel_rules") or ()
    if not rules:
        raise ValueError("channel_dims='rules' needs config.optimizer.channel_rules = "
                         "[(regex, axes or None), ...]")
    parsed = []
    for rule in rules:
        pattern, axes = rule
        parsed.append((pattern, None if axes is None else ChannelDims(tuple(axes))))
    return channel_dims_from_rules(params, parsed)


def frozen_mask(patterns: str | Sequence[str], params: Any) -> Any:
    """True for the leaves whose path fullmatches one of ``patterns``."""
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = [re.compile(p) for p in patterns]
    paths = leaf_paths(params)
    flags = [any(c.fullmatch(path) for c in compiled) for path in paths]
    for c in compiled:
        if not any(c.fullmatch(path) for path in paths):
            raise ValueError(f"config.optimizer.freeze: pattern {c.pattern!r} matches no "
                             f"parameter (paths look like {paths[:4]})")
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def build_optimizer(opt_cfg: Any, learning_rate: optax.ScalarOrSchedule, params: Any, *,
                    detect_channel_dims: Callable[[], Any] | None = None,
                    diagnostics: bool = False, model: Any = None
                    ) -> optax.GradientTransformation:
    """The optimizer of ``opt_cfg`` with ``learning_rate`` (float or schedule).

    Args:
      opt_cfg: ``config.optimizer`` (see the module docstring).
      learning_rate: the learning rate or schedule (of the optimizer's update count).
      params: the parameters (for channel specs and masks).
      detect_channel_dims: ``() -> spec``, used when ``channel_dims='auto'``.
      diagnostics: wrap in :func:`sing_jax.with_diagnostics` (per-leaf gradient norms,
        read back with :func:`sing_jax.diagnostics_metrics`).
      model: the NNX model; SINGD then preconditions every layer
        :func:`sing_jax.singd_layers` finds (``nnx.LinearGeneral``, ``nnx.Einsum``,
        scanned blocks too), not only the 2-D/4-D kernels.
    """
    cfg = _as_dict(opt_cfg)
    name, kwargs = optimizer_kwargs(cfg)
    constructor, takes_channel_dims = OPTIMIZERS[name]
    if takes_channel_dims:
        kwargs["channel_dims"] = channel_dims_spec(cfg, params, detect_channel_dims)
    if name == "singd" and model is not None:
        kwargs["layers"] = sing_jax.singd_layers(model)
    tx = constructor(learning_rate, **kwargs)
    clip = cfg.get("clip_grad_norm")
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    freeze = cfg.get("freeze")
    if freeze:
        patterns = [freeze] if isinstance(freeze, str) else list(freeze)
        frozen_mask(patterns, params)  # a pattern matching nothing is a config error
        tx = sing_jax.freeze(tx, sing_jax.frozen_by_regex(patterns))
    if diagnostics:
        # Per-leaf gradient/parameter norms (and effective lr on spherical leaves) in the state.
        tx = sing_jax.with_diagnostics(
            tx, learning_rate=learning_rate, channel_dims=kwargs.get("channel_dims"),
            metrics=("grad_norm", "param_norm", "effective_lr"))
    accum = int(cfg.get("grad_accum_steps", 1) or 1)
    if accum < 1:
        raise ValueError(f"config.optimizer.grad_accum_steps={accum}; expected an int >= 1")
    if accum > 1 and name == "singd":
        # optax.MultiSteps would refresh SINGD's factors from the last micro-batch only.
        tx = sing_jax.singd_multi_steps(tx, every_k_schedule=accum)
    elif accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx


SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_constant_cosine", "step",
             "custom")
_SCHEDULE_KEYS = {
    "constant": (),
    "cosine": ("final_fraction",),
    "warmup_cosine": ("warmup_fraction", "final_fraction"),
    "warmup_constant_cosine": ("warmup_fraction", "constant_fraction", "final_fraction"),
    "step": ("decay_epochs", "decay_factor"),
    "custom": ("factor", "threshold"),
}


def build_schedule(schedule_cfg: Any, base_lr: float, steps_per_epoch: int,
                   num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    """``step -> learning rate`` over the optimizer's update count.

    Names: ``constant``; ``cosine`` (to ``final_fraction * base_lr``);
    ``warmup_cosine`` (linear warmup over ``warmup_fraction`` of the steps, then
    cosine); ``warmup_constant_cosine`` (warmup, constant for ``constant_fraction``,
    cosine: seed 000's second recipe); ``step`` (x``decay_factor`` at each epoch in
    ``decay_epochs``: seed 001's protocol); ``custom`` (seed 004's per-epoch schedule
    with ``factor`` and ``threshold``, see the spec section 7).
    """
    cfg = _as_dict(schedule_cfg) if schedule_cfg is not None else {"name": "constant"}
    name = cfg.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {list(SCHEDULES)}")
    extra = sorted(set(cfg) - {"name", *_SCHEDULE_KEYS[name]})
    if extra:
        raise ValueError(f"config.schedule: {name} takes no key(s) {extra}; its keys are "
                         f"{list(_SCHEDULE_KEYS[name])}")
    total = max(1, steps_per_epoch * num_epochs)
    final = float(cfg.get("final_fraction", 0.0)) * base_lr
    schedules = sing_jax.schedules
    if name == "constant":
        return optax.constant_schedule(base_lr)
    if name == "cosine":
        return optax.cosine_decay_schedule(base_lr, total,
                                           alpha=final / base_lr if base_lr else 0.0)
    if name == "warmup_cosine":
        return schedules.warmup_cosine(base_lr, total, float(cfg.get("warmup_fraction", 0.05)),
                                       end_value=final)
    if name == "warmup_constant_cosine":
        return schedules.warmup_constant_cosine(
            base_lr, total, float(cfg.get("warmup_fraction", 0.05)),
            float(cfg.get("constant_fraction", 0.6)), end_value=final)
    if name == "step":
        return schedules.step_decay_at_epochs(
            base_lr, steps_per_epoch, tuple(int(e) for e in cfg.get("decay_epochs", ())),
            float(cfg.get("decay_factor", 0.1)))
    return schedules.damped_cosine(base_lr, num_epochs, steps_per_epoch,
                                   factor=float(cfg.get("factor", 0.8)),
                                   threshold=float(cfg.get("threshold", 0.5)))
