r"""SINGD as an optax transform: structured inverse-free natural gradient descent.

For a layer with weight :math:`W \in \mathbb{R}^{d_o \times d_i}` (PyTorch orientation;
conv: :math:`d_i = C_{in}/g \cdot k_H k_W`; see :mod:`.layers` for the other layers),
bias appended as the last input column (:math:`d_K = d_i + 1`, :math:`d_C = d_o`),
SINGD keeps structured factors :math:`K \in \mathbb{R}^{d_K\times d_K}`, :math:`C \in
\mathbb{R}^{d_C\times d_C}` (identity at start), their momenta :math:`m_K, m_C`
(zero) and a momentum buffer per parameter. On steps with :math:`t \bmod T = 0`, with
:math:`H_K, H_C` from :mod:`.curvature`, :math:`\widetilde{\operatorname{tr}}(X) =
\operatorname{tr}(X)/\dim` and :math:`\rho = 1-\alpha_1` if ``normalize_lr_cov`` else 1:

.. math::

   \hat m_K &= \tfrac{\rho}{2}\big(\widetilde{\operatorname{tr}}(H_C) H_K
       + \lambda\,\widetilde{\operatorname{tr}}(P_C(C^\top C))\,P_K(K^\top K) - I\big)
       \quad(\text{IKFAC: } H_K + \lambda P_K(K^\top K) - I)\\
   m_K &\leftarrow \alpha_1 m_K + \hat m_K,\qquad
   K \leftarrow K - \beta_1 K m_K,\quad \beta_1 = \mathrm{lr\_cov}(t)
       \;(/\max(1, \max|m_K|) \text{ with normalize\_lr\_cov})

and symmetrically for :math:`C`. Every step, with :math:`\hat G = [\nabla W \mid
\nabla b]`:

.. math::

   \Delta = C C^\top \hat G K K^\top,\quad u = \Delta + \gamma\,p,\quad
   b \leftarrow \mu b + u,\quad p \leftarrow p - \eta\, b.

Kept products (``cache_outer_products=True``): a *dense* factor :math:`S` of side
:math:`d` that the natural gradient applies to :math:`n` columns (:math:`n = d_o` for
:math:`K`, :math:`d_K` for :math:`C`) keeps :math:`S S^\top` next to it when
:math:`d < T n`: forming it once per refresh costs :math:`d^3` multiply-adds, and
it saves :math:`d^2 n` on each of the :math:`T` steps until the next refresh (one
product instead of two). The rule depends on the shapes and :math:`T` only.

A stacked layer (the blocks of an ``nnx.scan``, :mod:`.layers`) has one pair of
factors per slice, stored stacked; every operation on them is ``jax.vmap``-ped.

Parameters outside any preconditioned layer are trained by the ``other`` optax
transform (AdamW by default); ``other=None`` freezes them like the PyTorch reference.

Differences from the PyTorch ``singd`` 0.0.5 reference (deliberate):

- block-diagonal factors use :math:`B_i^\top` where the reference assumes symmetric
  blocks (``structures.BlockDiagonalMatrix(symmetric_blocks=True)`` reproduces it);
- accumulated statistics of several micro-batches are *averaged* (each micro-batch's
  statistics come from its own mean loss), so gradient accumulation equals one big
  batch for INGD and IKFAC alike; the reference sums them, which is wrong for IKFAC.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sing_jax._src.paths import path_str
from sing_jax._src.singd import curvature as curvature_lib
from sing_jax._src.singd import structures as structures_lib
from sing_jax._src.singd.capture import LayerCapture
from sing_jax._src.singd.curvature import LayerCurvature
from sing_jax._src.singd.layers import (
    LayerInfo,
    kernel_from_matrix,
    kernel_matrix,
    layout_from_kernel,
    vmap_stacked,
)

Array = jax.Array
ScalarOrSchedule = float | Callable[[Array], Array]

logger = logging.getLogger("sing_jax.singd")

# AdamW(1e-3) trains parameters outside supported layers unless told otherwise.
_DEFAULT_OTHER = optax.adamw(1e-3)

_OVERRIDABLE = (
    "learning_rate",
    "momentum",
    "damping",
    "alpha1",
    "weight_decay",
    "lr_cov",
    "structures",
    "kfac_approx",
    "loss_average",
    "kfac_like",
    "normalize_lr_cov",
    "preconditioner_dtype",
    "T",
    "cache_outer_products",
)


# A dtype instance, not the class jnp.float32: optax.inject_hyperparams would take the
# callable class for a schedule.
_FLOAT32 = jnp.dtype(jnp.float32)


# -- static records ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Static description of one registered layer (pytree aux data of its state)."""

    path: str
    kind: str  # "linear" or "conv"
    kernel_shape: tuple[int, ...]
    has_bias: bool
    dim_k: int
    dim_c: int
    structure_k: structures_lib.StructureSpec
    structure_c: structures_lib.StructureSpec
    dtype_k: str
    dtype_c: str
    kfac_approx: str
    loss_average: str | None
    T: int
    # Whether the state keeps K K^T / C C^T (see the module docstring).
    cache_k_outer: bool = False
    cache_c_outer: bool = False
    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    num_stacked: int = 0

    @property
    def keeps_outer_products(self) -> bool:
        return self.cache_k_outer or self.cache_c_outer

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[:self.num_stacked]

    @property
    def info(self) -> LayerInfo:
        """The kernel layout, as the capture describes it."""
        return LayerInfo(self.path, self.kind, self.kernel_shape, self.in_axes,
                         self.out_axes, self.has_bias, self.num_stacked)


def keeps_outer_product(spec: structures_lib.StructureSpec, dim: int, columns: int,
                        period: int, enabled: bool) -> bool:
    """Whether a factor of side ``dim`` applied to ``columns`` columns keeps ``S S^T``:
    a dense factor, when ``dim < period * columns`` (the module docstring's rule)."""
    return enabled and spec.name == "dense" and dim < period * columns


@jax.tree_util.register_pytree_node_class
class LayerPreconditioner:
    """State of one layer: the factors ``K, C``, their momenta (None when alpha1=0) and,
    where ``config`` says so, the dense ``K K^T`` and ``C C^T`` (else None). A stacked
    layer's arrays carry its stacked axes first."""

    def __init__(self, config: LayerConfig, k, c, m_k=None, m_c=None, k_outer=None,
                 c_outer=None):
        self.config, self.k, self.c, self.m_k, self.m_c = config, k, c, m_k, m_c
        self.k_outer, self.c_outer = k_outer, c_outer

    @classmethod
    def with_outer_products(cls, config: LayerConfig, k, c, m_k=None, m_c=None
                            ) -> LayerPreconditioner:
        """The state for (unstacked) factors ``k, c``, with the products ``config``
        asks to keep."""
        def outer(factor):
            mat = factor.to_dense()
            return mat @ mat.T

        return cls(config, k, c, m_k, m_c, outer(k) if config.cache_k_outer else None,
                   outer(c) if config.cache_c_outer else None)

    @classmethod
    def initial(cls, config: LayerConfig, with_momenta: bool) -> LayerPreconditioner:
        """Identity factors (and kept products), zero momenta."""
        def one_slice(_):
            k = config.structure_k.eye(config.dim_k, jnp.dtype(config.dtype_k))
            c = config.structure_c.eye(config.dim_c, jnp.dtype(config.dtype_c))
            m_k = m_c = None
            if with_momenta:
                m_k = config.structure_k.zeros(config.dim_k, jnp.dtype(config.dtype_k))
                m_c = config.structure_c.zeros(config.dim_c, jnp.dtype(config.dtype_c))
            # A new identity, not the factor's own array: a state holding one buffer
            # twice cannot be donated.
            return cls(config, k, c, m_k, m_c,
                       jnp.eye(config.dim_k, dtype=k.dtype) if config.cache_k_outer else None,
                       jnp.eye(config.dim_c, dtype=c.dtype) if config.cache_c_outer else None)

        return vmap_stacked(one_slice, config.num_stacked)(jnp.zeros(config.stack_shape))

    def curvature(self, capture: LayerCapture, axis_name: str | None = None
                  ) -> LayerCurvature:
        r""":math:`H_K, H_C` of a captured layer with these factors (averaged over
        ``axis_name`` and over the capture's own axis name)."""
        cfg = self.config
        if capture.info.layout() != cfg.info.layout():
            got, want = capture.info, cfg.info
            raise ValueError(
                f"layer {cfg.path!r}: captured kernel {got.kernel_shape} (input axes "
                f"{got.in_axes}, output axes {got.out_axes}, bias={got.has_bias}) does not "
                f"match the registered kernel {want.kernel_shape} (input axes "
                f"{want.in_axes}, output axes {want.out_axes}, bias={want.has_bias}); "
                "pass singd(..., layers=sing_jax.singd_layers(model)) for layers other "
                "than nnx.Linear and 2-D nnx.Conv")
        axes = () if axis_name is None else (axis_name,)
        return curvature_lib.layer_curvature(self.k, self.c, capture, cfg.kfac_approx,
                                             cfg.loss_average, axes)

    def zero_curvature(self) -> LayerCurvature:
        """Zero statistics with the right structure (steps where nothing is captured)."""
        return LayerCurvature(jax.tree.map(jnp.zeros_like, self.k),
                              jax.tree.map(jnp.zeros_like, self.c),
                              jnp.zeros((), jnp.float32))

    def natural_gradient(self, kernel_grad: Array, bias_grad: Array | None
                         ) -> tuple[Array, Array | None]:
        r""":math:`C C^\top \hat G K K^\top` split back into kernel and bias (Flax
        layout, the gradients' dtypes)."""
        cfg = self.config
        x = kernel_matrix(kernel_grad, cfg.info)  # stack + (d_i, d_o): W-grad transposed
        b = None if bias_grad is None else bias_grad.reshape(cfg.stack_shape + (cfg.dim_c,))
        nat_k, nat_b = vmap_stacked(_natural_gradient, cfg.num_stacked)(self, x, b)
        nat_k = kernel_from_matrix(nat_k, cfg.info).astype(kernel_grad.dtype)
        if bias_grad is None:
            return nat_k, None
        return nat_k, nat_b.reshape(bias_grad.shape).astype(bias_grad.dtype)

    def tree_flatten(self):
        children = (self.k, self.c, self.m_k, self.m_c)
        if self.config.keeps_outer_products:
            # Only then: a state without kept products has the layout it always had.
            children += (self.k_outer, self.c_outer)
        return children, self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        return cls(config, *children)

    def __repr__(self) -> str:
        return f"LayerPreconditioner({self.config.path!r}, K={self.k!r}, C={self.c!r})"


def _natural_gradient(layer: LayerPreconditioner, x: Array, bias_grad: Array | None
                      ) -> tuple[Array, Array | None]:
    """:meth:`LayerPreconditioner.natural_gradient` of one slice: ``x`` is ``(d_i, d_o)``."""
    cfg = layer.config

    def right(y):  # Y C C^T; the kept product is symmetric
        y = y.astype(cfg.dtype_c)
        return layer.c.right_outer_matmat(y) if layer.c_outer is None else y @ layer.c_outer

    if cfg.has_bias and isinstance(layer.k, structures_lib.DiagonalMatrix):
        # A diagonal K K^T scales the rows, C C^T acts on each row: the kernel rows
        # and the bias row go through apart, never joined into one (d_K, d_o) copy.
        k_sq = jnp.square(layer.k.diag)
        k_nat = right(x.astype(cfg.dtype_k) * k_sq[:-1, None])
        b_nat = right((bias_grad.astype(cfg.dtype_k) * k_sq[-1])[None, :])[0]
        return k_nat, b_nat
    if cfg.has_bias:
        x = jnp.concatenate([x, bias_grad[None, :].astype(x.dtype)], axis=0)
    x = x.astype(cfg.dtype_k)
    # K K^T Ghat^T, then (C C^T Ghat K K^T)^T
    z = right(layer.k.outer_matmat(x) if layer.k_outer is None else layer.k_outer @ x)
    return z[: cfg.dim_k - int(cfg.has_bias)], (z[-1] if cfg.has_bias else None)


@dataclasses.dataclass(frozen=True)
class SINGDRegistration:
    """Which layers SINGD preconditions (with which structures) and which params go
    to ``other``; printable with :func:`singd_report`."""

    layers: tuple[tuple[str, str, str, str, int, int, int, int], ...]
    other: tuple[str, ...]
    frozen_other: bool
    T: int

    def report(self) -> str:
        lines = [f"SINGD registration (T={self.T}): {len(self.layers)} layers"]
        for path, kind, sk, sc, dk, dc, nbytes, period in self.layers:
            lines.append(
                f"  {path:<30s} {kind:<12s} K:{sk}[{dk}] C:{sc}[{dc}] precond {nbytes} B"
                + ("" if period == self.T else f" T={period}")
            )
        label = "frozen (other=None)" if self.frozen_other else "trained by `other`"
        lines.append(f"  {len(self.other)} other parameters, {label}:")
        lines.extend(f"    {p}" for p in self.other)
        return "\n".join(lines)


@jax.tree_util.register_pytree_node_class
class _Static:
    """A childless pytree node carrying static data through jit/orbax/MultiSteps."""

    def __init__(self, value: Any):
        self.value = value

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, _):
        return cls(value)


class SINGDState(NamedTuple):
    """State of :func:`singd`."""

    count: Array
    layers: tuple[LayerPreconditioner, ...]
    momentum: tuple[tuple[Array, Array | None], ...]
    other: Any
    registration: _Static


# -- helpers ------------------------------------------------------------------------------
def singd_state(opt_state: Any) -> SINGDState:
    """The one :class:`SINGDState` inside an optimizer state (a chain, ``MultiSteps``,
    ``inject_hyperparams``, an ``nnx.Optimizer``'s ``opt_state``, ...)."""
    found = [
        s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SINGDState))
        if isinstance(s, SINGDState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SINGD state inside opt_state, found {len(found)}"
        )
    return found[0]


def singd_report(opt_state: Any) -> str:
    """A readable table of the registered layers and the ``other`` parameters."""
    return singd_state(opt_state).registration.value.report()


def _value(x: ScalarOrSchedule, count: Array) -> Array:
    return x(count) if callable(x) else jnp.asarray(x)


def _as_number(name: str, value: Any, where: str, *, static: bool = False) -> Any:
    """A Python number from a number or a concrete 0-d array; tracers pass unless static.

    ``optax.inject_hyperparams`` hands numeric hyper-parameters over as arrays (traced
    inside ``jit``); the ones that shape the state or the program must stay static.
    """
    if callable(value):
        return value
    if isinstance(value, jax.core.Tracer):
        if static:
            raise TypeError(
                f"{where}{name} decides the state's structure and must be a concrete number, "
                f"got a traced value; under optax.inject_hyperparams pass "
                f"static_args=({name!r}, ...)"
            )
        return value
    if isinstance(value, jax.Array | np.ndarray) and np.ndim(value) == 0:
        return value.item()
    return value


def _check_nonneg(name: str, value: Any, where: str) -> None:
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    if not isinstance(value, int | float | np.floating | np.integer) or value < 0:
        raise ValueError(f"{where}{name} must be a non-negative number or schedule, got {value!r}")



# -- the preconditioner update ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _LayerHyper:
    learning_rate: Any
    momentum: float
    damping: float
    alpha1: float
    weight_decay: float
    lr_cov: Any
    kfac_like: bool
    normalize_lr_cov: bool


def _update_factors(layer: LayerPreconditioner, h_k: structures_lib.StructuredMatrix,
                    h_c: structures_lib.StructuredMatrix, hyper: _LayerHyper,
                    beta: Array) -> LayerPreconditioner:
    """One Riemannian step of one slice's ``K, C`` from its (averaged) ``H_K, H_C``."""
    k, c = layer.k, layer.c
    k_tk, c_tc = k.from_inner(), c.from_inner()  # P(K^T K), P(C^T C)
    scale = 0.5 * ((1.0 - hyper.alpha1) if hyper.normalize_lr_cov else 1.0)
    damping = hyper.damping
    if hyper.kfac_like:
        new_m_k = h_k + k_tk * damping
        new_m_c = h_c + c_tc * damping
    else:
        new_m_k = h_k * h_c.average_trace() + k_tk * (damping * c_tc.average_trace())
        new_m_c = h_c * h_k.average_trace() + c_tc * (damping * k_tk.average_trace())
    new_m_k = new_m_k.add_diagonal(-1.0) * scale
    new_m_c = new_m_c.add_diagonal(-1.0) * scale
    if hyper.alpha1 != 0.0:
        new_m_k = new_m_k + layer.m_k * hyper.alpha1
        new_m_c = new_m_c + layer.m_c * hyper.alpha1
    beta_k = beta_c = beta
    if hyper.normalize_lr_cov:
        beta_k = beta / jnp.maximum(1.0, new_m_k.max_abs())
        beta_c = beta / jnp.maximum(1.0, new_m_c.max_abs())
    new_k = k - k.matmul(new_m_k) * beta_k.astype(k.dtype)
    new_c = c - c.matmul(new_m_c) * beta_c.astype(c.dtype)
    keep_m = hyper.alpha1 != 0.0
    return LayerPreconditioner.with_outer_products(
        layer.config, new_k, new_c, new_m_k if keep_m else None, new_m_c if keep_m else None)


def _refreshed(layer: LayerPreconditioner, curv: LayerCurvature, hyper: _LayerHyper,
               count: Array) -> LayerPreconditioner:
    """``layer`` after the preconditioner update from the statistics of ``curv.count``
    (micro-)batches (their average)."""
    inv = 1.0 / jnp.maximum(curv.count, 1.0)
    h_k = curv.h_k * inv.astype(layer.k.dtype)
    h_c = curv.h_c * inv.astype(layer.c.dtype)
    beta = _value(hyper.lr_cov, count)
    update = vmap_stacked(lambda lp, hk, hc: _update_factors(lp, hk, hc, hyper, beta),
                      layer.config.num_stacked)
    return update(layer, h_k, h_c)


def singd(
    learning_rate: ScalarOrSchedule = 1e-3,
    momentum: float = 0.9,
    damping: float = 1e-3,
    alpha1: float = 0.5,
    weight_decay: float = 0.0,
    T: int = 10,
    lr_cov: ScalarOrSchedule = 1e-2,
    structures: tuple[structures_lib.StructureLike, structures_lib.StructureLike] = (
        "dense", "dense"),
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    preconditioner_dtype: Any = _FLOAT32,
    other: optax.GradientTransformation | None = _DEFAULT_OTHER,
    layer_overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
    axis_name: str | None = None,
    cache_outer_products: bool = True,
    layers: Mapping[str, LayerInfo] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Structured inverse-free natural gradient descent (SINGD, Lin et al. 2023).

    See the module docstring for the update. ``update(grads, state, params,
    singd_stats=...)`` takes the statistics as an extra argument: either the per-layer
    :class:`LayerCurvature` returned by :func:`singd_value_and_grad` (recommended), or
    raw :class:`~sing_jax._src.singd.capture.LayerCapture` s; they are only read on
    steps with ``count % T == 0``.

    Which leaves are layers: with ``layers`` (:func:`singd_layers` of the model), the
    kernels of those layers (``{path}/kernel``, with ``{path}/bias``); without it, by
    shape: every 2-D ``kernel`` leaf is an ``nnx.Linear`` and every 4-D one a 2-D
    ``nnx.Conv``. Every other leaf goes to ``other``.

    Args:
      learning_rate: :math:`\eta` (float or schedule of the step count).
      momentum: :math:`\mu`, momentum on the preconditioned updates.
      damping: :math:`\lambda`.
      alpha1: :math:`\alpha_1`, Riemannian momentum of :math:`m_K, m_C` (forced to 0,
        with a warning, when ``kfac_like``).
      weight_decay: :math:`\gamma`, added after preconditioning.
      T: preconditioner update period (a positive int; per layer through
        ``layer_overrides``).
      lr_cov: :math:`\beta_1` (float or schedule of the step count).
      structures: structures of ``(K, C)``: names (see
        :func:`~sing_jax._src.singd.structures.structure`) or specs.
      kfac_approx: ``"expand"`` or ``"reduce"``: how positions and repeated calls of
        a layer enter its statistics (:mod:`.curvature`).
      loss_average: ``"batch"``, ``"batch+sequence"`` or None (sum loss).
      kfac_like: the IKFAC update.
      normalize_lr_cov: normalized gradient descent on ``K, C``.
      preconditioner_dtype: dtype of ``K, C, m_K, m_C`` (None: the kernel's dtype), or
        a pair for ``(K, C)``.
      other: optax transform for parameters outside supported layers; None freezes them.
      layer_overrides: ``{regex: {hyper-parameter: value} or None}`` matched with
        ``re.search`` on layer paths (``"block/0/linear"``); the values of all matching
        patterns apply in order (a later pattern's value wins), and a matching None,
        wherever it comes, sends the layer to ``other``. A pattern that matches no
        layer is reported with a warning at ``init``. Overridable:
        ``learning_rate, momentum, damping, alpha1, weight_decay, lr_cov, structures,
        kfac_approx, loss_average, kfac_like, normalize_lr_cov, preconditioner_dtype, T,
        cache_outer_products``.
      axis_name: with raw captures (``singd_value_and_grad`` without ``opt_state``),
        average ``H_K, H_C`` over this mapped axis (captures taken with the helper's
        ``axis_name`` are averaged over that axis without it).
      cache_outer_products: a dense factor ``S`` of side ``d`` keeps ``S S^T`` in the
        state, refreshed with ``S``, when ``d < T n`` for the ``n`` columns it is
        applied to (``d_o`` for ``K``, ``d_K`` for ``C``): fewer multiply-adds, for
        ``d^2`` more numbers per kept product. False keeps none (the least memory).
      layers: ``{layer path: LayerInfo}`` from :func:`singd_layers` (the layers and
        their kernel layouts); None goes by kernel shape (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Lin et al., *Structured Inverse-Free Natural Gradient: Memory-Efficient &
      Numerically-Stable KFAC*, 2023 (arXiv:2312.05705).
    """
    layer_overrides = dict(layer_overrides or {})
    for pattern, override in layer_overrides.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"layer_overrides: bad regex {pattern!r}: {e}") from e
        if override is None:  # the layer is excluded
            continue
        if not isinstance(override, Mapping):
            raise ValueError(
                f"layer_overrides[{pattern!r}] is {override!r}; expected a dict of "
                f"hyper-parameters (any of {list(_OVERRIDABLE)}) or None (exclude the layer)"
            )
        unknown = set(override) - set(_OVERRIDABLE)
        if unknown:
            raise ValueError(
                f"layer_overrides[{pattern!r}] has unknown keys {sorted(unknown)}; "
                f"overridable: {list(_OVERRIDABLE)}"
            )
    defaults = dict(
        learning_rate=learning_rate, momentum=momentum, damping=damping, alpha1=alpha1,
        weight_decay=weight_decay, lr_cov=lr_cov, structures=structures,
        kfac_approx=kfac_approx, loss_average=loss_average, kfac_like=kfac_like,
        normalize_lr_cov=normalize_lr_cov, preconditioner_dtype=preconditioner_dtype, T=T,
        cache_outer_products=cache_outer_products,
    )
    _validate(defaults, "")
    if layers is not None:
        layers = dict(layers)
        bad = {p: type(v).__name__ for p, v in layers.items() if not isinstance(v, LayerInfo)}
        if bad:
            raise TypeError(f"layers must map layer paths to LayerInfo (from "
                            f"sing_jax.singd_layers(model)); got {bad}")
    other_tx = optax.with_extra_args_support(other) if other is not None else None

    def resolve(path: str) -> dict[str, Any] | None:
        matching = [override for pattern, override in layer_overrides.items()
                    if re.search(pattern, path)]
        if any(override is None for override in matching):
            return None
        hp = dict(defaults)
        for override in matching:
            hp.update(override)
        return hp

    def warn_unmatched_overrides(paths: list[str]) -> None:
        layer_paths = [p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == "kernel"]
        for pattern in layer_overrides:
            if not any(re.search(pattern, path) for path in layer_paths):
                warnings.warn(
                    f"SINGD layer_overrides: pattern {pattern!r} matches no layer path "
                    f"(layer paths look like {layer_paths[:3]})", stacklevel=3)

    def layout_of(parent: str, leaf: Any, bias: Any) -> LayerInfo | None:
        """The registered layout of the kernel ``leaf`` of layer ``parent``, if any."""
        shape = tuple(getattr(leaf, "shape", ()))
        if layers is None:
            has_bias = bias is not None and tuple(bias.shape) == shape[-1:]
            return layout_from_kernel(parent, shape, has_bias)
        if parent not in layers:
            return None
        info = layers[parent]
        if info.kernel_shape != shape:
            raise ValueError(
                f"layer {parent!r}: kernel of shape {shape}, but `layers` describes "
                f"{info.kernel_shape}; pass the singd_layers of this model")
        has_bias = bias is not None and tuple(bias.shape)[:info.num_stacked] == (
            info.stack_shape) and int(np.prod(bias.shape)) == (
            int(np.prod(info.stack_shape)) * info.dim_out)
        return dataclasses.replace(info, has_bias=has_bias)

    def registration(params: Any):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [path_str(p) for p, _ in flat]
        leaves = [leaf for _, leaf in flat]
        index = {p: i for i, p in enumerate(paths)}
        found = []  # (config, hyper, kernel_idx, bias_idx)
        used: set[int] = set()
        for i, p in enumerate(paths):
            parent, _, name = p.rpartition("/")
            if name != "kernel":
                continue
            bias_i = index.get(f"{parent}/bias") if parent else index.get("bias")
            info = layout_of(parent, leaves[i], None if bias_i is None else leaves[bias_i])
            if info is None:
                continue
            hp = resolve(parent)
            if hp is None:
                continue
            _validate(hp, f"layer {parent!r}: ")
            if not info.has_bias:
                bias_i = None
            d_k, d_out = info.dim_in + info.has_bias, info.dim_out
            alpha = hp["alpha1"]
            if hp["kfac_like"] and alpha != 0.0:
                warnings.warn(
                    f"SINGD layer {parent!r}: kfac_like=True ignores alpha1={alpha}; "
                    "using alpha1=0", stacklevel=3)
                alpha = 0.0
            pdt = hp["preconditioner_dtype"]
            pdt_k, pdt_c = pdt if isinstance(pdt, tuple | list) else (pdt, pdt)
            s_k, s_c = (structures_lib.structure(s) for s in hp["structures"])
            period, cache = int(hp["T"]), bool(hp["cache_outer_products"])
            leaf = leaves[i]
            cfg = LayerConfig(
                path=parent, kind=info.kind, kernel_shape=info.kernel_shape,
                has_bias=info.has_bias, dim_k=d_k, dim_c=d_out,
                structure_k=s_k, structure_c=s_c,
                dtype_k=jnp.dtype(pdt_k or leaf.dtype).name,
                dtype_c=jnp.dtype(pdt_c or leaf.dtype).name,
                kfac_approx=hp["kfac_approx"], loss_average=hp["loss_average"], T=period,
                cache_k_outer=keeps_outer_product(s_k, d_k, d_out, period, cache),
                cache_c_outer=keeps_outer_product(s_c, d_out, d_k, period, cache),
                in_axes=info.in_axes, out_axes=info.out_axes, num_stacked=info.num_stacked,
            )
            hyper = _LayerHyper(hp["learning_rate"], hp["momentum"], hp["damping"], alpha,
                                hp["weight_decay"], hp["lr_cov"], bool(hp["kfac_like"]),
                                bool(hp["normalize_lr_cov"]))
            found.append((cfg, hyper, i, bias_i))
            used.add(i)
            if bias_i is not None:
                used.add(bias_i)
        other_idx = [i for i in range(len(leaves)) if i not in used]
        return found, other_idx, paths

    def masked(tree: Any, keep: list[int]) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        keep_set = set(keep)
        return treedef.unflatten(
            [x if i in keep_set else optax.MaskedNode() for i, x in enumerate(leaves)]
        )

    def init_fn(params: Any) -> SINGDState:
        found, other_idx, paths = registration(params)
        warn_unmatched_overrides(paths)
        leaves = jax.tree.leaves(params)
        precs, bufs, rows = [], [], []
        for cfg, hyper, ki, bi in found:
            prec = LayerPreconditioner.initial(cfg, with_momenta=hyper.alpha1 != 0.0)
            precs.append(prec)
            bufs.append((jnp.zeros_like(leaves[ki]),
                         None if bi is None else jnp.zeros_like(leaves[bi])))
            nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(prec))
            kind = cfg.kind + ("" if not cfg.num_stacked else f" x{cfg.stack_shape}")
            rows.append((cfg.path, kind, str(cfg.structure_k), str(cfg.structure_c),
                         cfg.dim_k, cfg.dim_c, int(nbytes), cfg.T))
        reg = SINGDRegistration(tuple(rows), tuple(paths[i] for i in other_idx),
                                other is None, int(T))
        logger.info(reg.report())
        other_state = other_tx.init(masked(params, other_idx)) if other_tx else None
        return SINGDState(jnp.zeros((), jnp.int32), tuple(precs), tuple(bufs), other_state,
                          _Static(reg))

    def update_fn(updates: Any, state: SINGDState, params: Any = None,
                  singd_stats: Mapping[str, Any] | None = None, **extra_args: Any):
        del extra_args
        found, other_idx, paths = registration(updates)
        if len(found) != len(state.layers) or any(
            cfg != lp.config for (cfg, *_), lp in zip(found, state.layers, strict=False)
        ):
            now = {cfg.path: cfg for cfg, *_ in found}
            before = {lp.config.path: lp.config for lp in state.layers}
            differences = (
                [f"{p!r} is new" for p in now if p not in before]
                + [f"{p!r} is missing" for p in before if p not in now]
                + [f"{p!r} has " + ", ".join(
                    f"{f.name} {getattr(before[p], f.name)!r} -> {getattr(now[p], f.name)!r}"
                    for f in dataclasses.fields(LayerConfig)
                    if getattr(before[p], f.name) != getattr(now[p], f.name))
                   for p in now if p in before and now[p] != before[p]])
            raise ValueError(
                "the gradient tree does not match the tree SINGD was initialized with: "
                + "; ".join(differences[:5] or ["the layers come in another order"])
                + ". Re-initialise the optimizer state for this model."
            )
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params) if params is not None else None
        if singd_stats is None and found:
            raise ValueError(
                "SINGD's update needs the layer statistics: pass singd_stats=... (from "
                "sing_jax.singd_value_and_grad) on every step"
            )
        count = state.count
        new_leaves: list[Any] = list(g_leaves)
        new_precs, new_bufs = [], []
        for (cfg, hyper, ki, bi), lp, (buf_k, buf_b) in zip(
            found, state.layers, state.momentum, strict=True
        ):
            if cfg.path not in singd_stats:
                raise ValueError(
                    f"singd_stats has no entry for registered layer {cfg.path!r}; got "
                    f"{sorted(singd_stats)}. If SINGD cannot precondition it, exclude it "
                    f"with layer_overrides={{{cfg.path!r}: None}}"
                )
            stats = singd_stats[cfg.path]

            def refresh(lp, stats=stats, hyper=hyper):
                if isinstance(stats, LayerCapture):
                    curv = lp.curvature(stats, axis_name)
                elif isinstance(stats, LayerCurvature):
                    curv = stats
                else:
                    raise TypeError(
                        f"singd_stats[{lp.config.path!r}] must be a LayerCurvature or "
                        f"LayerCapture, got {type(stats).__name__}"
                    )
                return _refreshed(lp, curv, hyper, count)

            if cfg.T == 1:
                lp = refresh(lp)
            else:
                lp = jax.lax.cond(count % cfg.T == 0, refresh, lambda lp: lp, lp)
            new_precs.append(lp)

            gk = g_leaves[ki]
            gb = g_leaves[bi] if bi is not None else None
            nat_k, nat_b = lp.natural_gradient(gk, gb)
            lr = _value(hyper.learning_rate, count)
            outs = []
            for nat, buf, idx in ((nat_k, buf_k, ki), (nat_b, buf_b, bi)):
                if idx is None:
                    outs.append(None)
                    continue
                u = nat
                if not (isinstance(hyper.weight_decay, float | int) and hyper.weight_decay == 0):
                    if p_leaves is None:
                        raise ValueError("SINGD with weight_decay needs params in update()")
                    u = u + (hyper.weight_decay * p_leaves[idx]).astype(u.dtype)
                new_buf = (hyper.momentum * buf + u).astype(buf.dtype)
                new_leaves[idx] = (-lr * new_buf).astype(g_leaves[idx].dtype)
                outs.append(new_buf)
            new_bufs.append(tuple(outs))

        new_other = state.other
        if other_tx is not None:
            o_upd, new_other = other_tx.update(
                masked(updates, other_idx), state.other,
                None if params is None else masked(params, other_idx))
            o_leaves = jax.tree.leaves(o_upd)
            for i, val in zip(other_idx, o_leaves, strict=True):
                new_leaves[i] = val
        else:
            for i in other_idx:
                new_leaves[i] = jnp.zeros_like(g_leaves[i])
        new_state = SINGDState(optax.safe_increment(count), tuple(new_precs), tuple(new_bufs),
                               new_other, state.registration)
        return treedef.unflatten(new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate(hp: dict[str, Any], where: str) -> None:
    """Checks the hyper-parameters of one layer; turns concrete 0-d arrays into numbers."""
    for name in ("learning_rate", "lr_cov", "momentum", "damping", "weight_decay"):
        hp[name] = _as_number(name, hp[name], where)
    for name in ("T", "alpha1"):
        hp[name] = _as_number(name, hp[name], where, static=True)
    period = hp["T"]
    if isinstance(period, bool) or not isinstance(period, int | np.integer) or period < 1:
        raise ValueError(f"{where}T must be a positive int, got {period!r}")
    for name in ("learning_rate", "lr_cov", "momentum", "damping", "weight_decay", "alpha1"):
        _check_nonneg(name, hp[name], where)
    if not callable(hp["alpha1"]) and hp["alpha1"] >= 1:
        raise ValueError(f"{where}alpha1 must be in [0, 1), got {hp['alpha1']!r}")
    for name in ("momentum", "damping", "alpha1", "weight_decay"):
        if callable(hp[name]):
            raise TypeError(f"{where}{name} must be a number, got a callable")
    try:
        curvature_lib.check_options(hp["kfac_approx"], hp["loss_average"])
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    s = hp["structures"]
    if not isinstance(s, tuple | list) or len(s) != 2:
        raise ValueError(f"{where}structures must be a (K, C) pair, got {s!r}")
    for x in s:
        structures_lib.structure(x)
    _check_preconditioner_dtype(hp["preconditioner_dtype"], where)
    if not isinstance(hp["cache_outer_products"], bool | np.bool_):
        raise ValueError(f"{where}cache_outer_products must be True or False, got "
                         f"{hp['cache_outer_products']!r}")


def _check_preconditioner_dtype(value: Any, where: str) -> None:
    pair = value if isinstance(value, tuple | list) else (value,)
    hint = ""
    if isinstance(value, int | float | jax.Array | np.ndarray):
        hint = (" (optax.inject_hyperparams takes a dtype class such as jnp.bfloat16 for a "
                "schedule: pass static_args=('preconditioner_dtype', ...))")
    ok = len(pair) in (1, 2) if isinstance(value, tuple | list) else True
    for dt in pair:
        if dt is None:
            continue
        try:
            ok = ok and bool(jnp.issubdtype(jnp.dtype(dt), jnp.floating))
        except TypeError:
            ok = False
    if not ok or (isinstance(value, tuple | list) and len(pair) != 2):
        raise ValueError(
            f"{where}preconditioner_dtype must be a floating dtype (e.g. jnp.float32), None "
            f"(the kernel's dtype) or a (K, C) pair of those; got {value!r}{hint}"
        )
