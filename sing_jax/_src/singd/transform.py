r"""SINGD as an optax transform: structured inverse-free natural gradient descent.

For a layer with weight :math:`W \in \mathbb{R}^{d_o \times d_i}` (PyTorch orientation;
conv: :math:`d_i = C_{in}/g \cdot k_H k_W`), bias appended as the last input column
(:math:`d_K = d_i + 1`, :math:`d_C = d_o`), SINGD keeps structured factors
:math:`K \in \mathbb{R}^{d_K\times d_K}`, :math:`C \in \mathbb{R}^{d_C\times d_C}`
(identity at start), their momenta :math:`m_K, m_C` (zero) and a momentum buffer per
parameter. On steps with :math:`t \bmod T = 0`, from the captured :math:`A, G`
(:mod:`.capture`), with :math:`H_K = P_K(K^\top A^\top A K)`, :math:`H_C = P_C(C^\top
G^\top G C)`, :math:`\widetilde{\operatorname{tr}}(X) = \operatorname{tr}(X)/\dim` and
:math:`\rho = 1-\alpha_1` if ``normalize_lr_cov`` else 1:

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

Dense factors may keep :math:`K K^\top`, :math:`C C^\top` in the state, refreshed with
the factors, where that halves the natural gradient's products for less than it costs
(``cache_outer_products``).

Parameters outside any ``nnx.Linear``/2-D ``nnx.Conv`` kernel (+bias) are trained by
the ``other`` optax transform (AdamW by default); ``other=None`` freezes them like the
PyTorch reference does.

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
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sing_jax._src.singd import capture as capture_lib
from sing_jax._src.singd import structures as structures_lib

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
    kind: str  # "linear" (kernel (in, out)) or "conv" (kernel (kH, kW, C_in/g, C_out))
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
    # Whether the state keeps K K^T / C C^T (dense factors only; see _caches_outer).
    cache_k_outer: bool = False
    cache_c_outer: bool = False

    @property
    def keeps_outer_products(self) -> bool:
        return self.cache_k_outer or self.cache_c_outer


def by_half_blocks(period: int) -> bool:
    """Whether a layer refreshed every ``period`` steps forms ``S^T S`` and ``S S^T``
    of its dense factors from three half-size products
    (:func:`~sing_jax._src.singd.structures.square_gram`): only at T = 1, where they
    are refreshed on every step (``_caches_outer`` costs them the same way). For
    T > 1 the refresh sits in a
    ``lax.cond``, whose half blocks add to XLA:CPU's temporary buffer of every step
    (bench_singd's MLP at T = 10: 29.5 -> 36.6 MiB), for a saving on one step in T."""
    return period == 1


def _caches_outer(spec: structures_lib.StructureSpec, dim: int, other_dim: int, period: int,
                  enabled: bool) -> bool:
    """Whether a dense factor ``S`` keeps ``S S^T`` next to it.

    Each step the natural gradient applies ``S S^T`` to a ``dim x other_dim`` matrix:
    ``S (S^T Y)`` costs ``2 dim^2 other_dim`` multiply-adds, ``(S S^T) Y`` half that
    once ``S S^T`` is known, and forming it costs ``dim^3`` (at T = 1 and from ``dim =
    768``, three quarters of that: :func:`by_half_blocks`) once per refresh (every
    ``T`` steps). So keep it where that is less, at ``dim^2`` more numbers of memory.
    Other structures apply ``S S^T`` cheaply already.
    """
    cost = structures_lib.symmetric_product_cost(dim) if by_half_blocks(period) else 1.0
    return enabled and spec.name == "dense" and cost * dim < period * other_dim


def _outer_product(factor: structures_lib.StructuredMatrix, config: LayerConfig) -> Array:
    """The kept ``S S^T`` of a dense factor."""
    mat = factor.to_dense()
    return structures_lib.square_outer(mat) if by_half_blocks(config.T) else mat @ mat.T


@jax.tree_util.register_pytree_node_class
class LayerPreconditioner:
    """State of one layer: the factors ``K, C``, their momenta (None when alpha1=0) and,
    where ``config`` says so, the dense ``K K^T`` and ``C C^T`` (else None)."""

    def __init__(self, config: LayerConfig, k, c, m_k=None, m_c=None, k_outer=None,
                 c_outer=None):
        self.config, self.k, self.c, self.m_k, self.m_c = config, k, c, m_k, m_c
        self.k_outer, self.c_outer = k_outer, c_outer

    @classmethod
    def with_outer_products(cls, config: LayerConfig, k, c, m_k=None, m_c=None, *,
                            identity_factors: bool = False) -> LayerPreconditioner:
        """The state for factors ``k, c``, with the products ``config`` asks to keep.

        ``identity_factors``: ``k`` and ``c`` are the identity (at ``init``), so their
        products are too, with no ``d^3`` product at start-up. (A new identity, not
        the factor's own array: a state holding one buffer twice cannot be donated.)
        """
        def outer(factor):
            if identity_factors:
                return jnp.eye(factor.dim, dtype=factor.dtype)
            return _outer_product(factor, config)

        return cls(config, k, c, m_k, m_c, outer(k) if config.cache_k_outer else None,
                   outer(c) if config.cache_c_outer else None)

    def with_kept_products(self, keep_k: bool, keep_c: bool) -> LayerPreconditioner:
        """This state keeping ``K K^T`` / ``C C^T`` or not, as asked (dense factors only).

        The kept products are derived from the factors, so a checkpoint written with
        other ones restores into any layout. A product kept on both sides is reused;
        a new one is formed from its factor, or, for a state of
        ``jax.ShapeDtypeStruct`` leaves, takes the factor's shape.
        """
        config = dataclasses.replace(self.config, cache_k_outer=keep_k, cache_c_outer=keep_c)

        def product(factor, kept, keep, which):
            if not keep:
                return None
            if factor.name != "dense":
                raise ValueError(f"layer {self.config.path!r}: only a dense factor keeps "
                                 f"its product, {which} is {factor.name}")
            if kept is not None:
                return kept
            if isinstance(factor.mat, jax.ShapeDtypeStruct):
                return factor.mat
            return _outer_product(factor, config)

        return type(self)(config, self.k, self.c, self.m_k, self.m_c,
                          product(self.k, self.k_outer, keep_k, "K"),
                          product(self.c, self.c_outer, keep_c, "C"))

    def tree_flatten(self):
        children = (self.k, self.c, self.m_k, self.m_c)
        if self.config.keeps_outer_products:
            # Only then: a state without kept products has the layout it always had,
            # so checkpoints written before they existed restore into it.
            children += (self.k_outer, self.c_outer)
        return children, self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        return cls(config, *children)

    def __repr__(self) -> str:
        return f"LayerPreconditioner({self.config.path!r}, K={self.k!r}, C={self.c!r})"



@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LayerCurvature:
    r"""Accumulated :math:`H_K, H_C` of one layer over ``count`` (micro-)batches."""

    h_k: structures_lib.StructuredMatrix
    h_c: structures_lib.StructuredMatrix
    count: Array

    def tree_flatten(self):
        return (self.h_k, self.h_c, self.count), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


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
                f"  {path:<30s} {kind:<6s} K:{sk}[{dk}] C:{sc}[{dc}] precond {nbytes} B"
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
def _leaf_paths(tree: Any) -> tuple[list[str], list[Array], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = []
    for path, _ in flat:
        # nnx.State leaves are Variables whose array sits under `.value`
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        paths.append(capture_lib.path_to_str(path))
    return paths, [leaf for _, leaf in flat], treedef


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


def _kernel_matrix(kernel: Array, kind: str) -> Array:
    """Kernel -> (d_i, d_o) with rows ordered like PyTorch's ``weight.flatten(1)``."""
    if kind == "linear":
        return kernel
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, kernel.shape[-1])


def _kernel_from_matrix(mat: Array, shape: tuple[int, ...], kind: str) -> Array:
    if kind == "linear":
        return mat
    kh, kw, cin, cout = shape
    return jnp.transpose(mat.reshape(cin, kh, kw, cout), (1, 2, 0, 3))


def _find_singd_state(opt_state: Any) -> SINGDState:
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
    return _find_singd_state(opt_state).registration.value.report()


# -- curvature ------------------------------------------------------------------------------
def layer_curvature(layer: LayerPreconditioner, capture: capture_lib.LayerCapture,
                    axis_name: str | None = None) -> LayerCurvature:
    r""":math:`H_K = P_K(K^\top A^\top A K)`, :math:`H_C = P_C(C^\top G^\top G C)` of
    one captured layer with the current factors (averaged over ``axis_name`` and over
    the capture's own ``axis_name``)."""
    cfg = layer.config
    info = capture.info
    if info.kernel_shape != cfg.kernel_shape or info.has_bias != cfg.has_bias:
        raise ValueError(
            f"layer {cfg.path!r}: captured kernel {info.kernel_shape} (bias={info.has_bias}) "
            f"does not match the registered kernel {cfg.kernel_shape} (bias={cfg.has_bias})"
        )
    dtype_k, dtype_c = jnp.dtype(cfg.dtype_k), jnp.dtype(cfg.dtype_c)
    if isinstance(layer.k, structures_lib.DiagonalMatrix):  # no need to unfold conv inputs
        h_k = layer.k.from_square_sums(
            capture_lib.input_square_sums(capture, cfg.kfac_approx, dtype_k))
    elif layer.k.uses_gram(_input_rows(capture, cfg.kfac_approx)):
        chunk_bytes = _patch_chunk_bytes()
        if layer.k.prefers_whole_gram(capture_lib.gram_cost_per_row(info, cfg.kfac_approx)):
            statistic = layer.k.gram_statistic_of_gram(capture_lib.input_gram_statistic(
                capture, cfg.kfac_approx, dtype_k, max_chunk_bytes=chunk_bytes))
        else:
            statistic = capture_lib.input_gram_statistic(
                capture, cfg.kfac_approx, dtype_k, layer.k.gram_statistic,
                max_chunk_bytes=chunk_bytes)
        h_k = layer.k.from_gram_statistic(statistic)
    else:
        h_k = layer.k.from_inner_rows(
            capture_lib.input_matrix(capture, cfg.kfac_approx, dtype_k))
    h_c = layer.c.from_inner_rows(capture_lib.output_grad_matrix(
        capture, cfg.kfac_approx, cfg.loss_average, dtype_c))
    axes = tuple(dict.fromkeys(a for a in (axis_name, capture.axis_name) if a is not None))
    if axes:
        reduce = jax.lax.pmean if cfg.loss_average is not None else jax.lax.psum
        h_k, h_c = reduce((h_k, h_c), axes)
    return LayerCurvature(h_k, h_c, jnp.ones((), jnp.float32))


# Conv patches are unfolded a few images at a time on CPU, where a chunk that stays in
# cache is about twice as fast to build and reduce as the whole patch matrix; other
# backends unfold everything at once (one large product is what they are fast at).
CPU_PATCH_CHUNK_BYTES = 6 * 2**20


def _patch_chunk_bytes() -> int | None:
    return CPU_PATCH_CHUNK_BYTES if jax.default_backend() == "cpu" else None


def _input_rows(capture: capture_lib.LayerCapture, kfac_approx: str) -> int:
    return jax.eval_shape(lambda: capture_lib.input_matrix(capture, kfac_approx)).shape[0]


def zero_curvature(layer: LayerPreconditioner) -> LayerCurvature:
    """Zero statistics with the right structure (steps where nothing is captured)."""
    return LayerCurvature(jax.tree.map(jnp.zeros_like, layer.k),
                          jax.tree.map(jnp.zeros_like, layer.c), jnp.zeros((), jnp.float32))


def singd_curvature(opt_state: Any, captures: Mapping[str, capture_lib.LayerCapture],
                    axis_name: str | None = None) -> dict[str, LayerCurvature]:
    """Per-layer :class:`LayerCurvature` from raw captures and the current factors.

    Sum the results of several micro-batches with :func:`accumulate_singd_stats`; the
    update averages them (``count``) so accumulation equals one big batch.
    """
    state = _find_singd_state(opt_state)
    _check_captured(state, captures)
    return {layer.config.path: layer_curvature(layer, captures[layer.config.path], axis_name)
            for layer in state.layers}


def refreshed_curvature(opt_state: Any, captures: Mapping[str, capture_lib.LayerCapture],
                        axis_name: str | None = None) -> dict[str, LayerCurvature]:
    """:func:`singd_curvature` for the layers refreshed at this step (``count % T == 0``,
    ``T`` per layer), zero statistics without computing them for the others.

    Where the step count is traced (under ``jit``) each layer's curvature sits behind
    a ``lax.cond``. Only the curvature: take the captures outside the conditional,
    from a forward/backward pass that always captures. Under ``jit`` that capture
    is nearly free (the layer inputs are kept for the backward pass anyway, and the
    output cotangents are computed anyway), while inside a ``lax.cond`` XLA:CPU (jaxlib
    0.10) runs the backward pass's convolutions with slow kernels: a 3x3 conv's kernel
    gradient on a 64x8x8x16 input took 12.4 ms there against 0.57 ms outside, and a
    small CNN's SINGD train step 21 ms against 2.5 ms.
    """
    state = _find_singd_state(opt_state)
    _check_captured(state, captures)
    count = _concrete_int(state.count)
    stats = {}
    for lp in state.layers:
        cap, period = captures[lp.config.path], lp.config.T
        if period == 1 or (count is not None and count % period == 0):
            stats[lp.config.path] = layer_curvature(lp, cap, axis_name)
        elif count is not None:
            stats[lp.config.path] = zero_curvature(lp)
        else:
            stats[lp.config.path] = jax.lax.cond(
                state.count % period == 0,
                lambda c, lp=lp: layer_curvature(lp, c, axis_name),
                lambda c, lp=lp: zero_curvature(lp), cap)
    return stats


def _check_captured(state: SINGDState, captures: Mapping[str, Any]) -> None:
    for layer in state.layers:
        path = layer.config.path
        if path not in captures:
            raise ValueError(
                f"no statistics captured for registered layer {path!r}; captured: "
                f"{sorted(captures)}. Either the forward pass did not call it, or it was "
                "called inside an NNX transform (nnx.remat, nnx.vmap, nnx.scan, ...), "
                "which re-creates the module where the capture cannot see it, or it is "
                "not an nnx.Linear/nnx.Conv. Exclude it with "
                f"layer_overrides={{{path!r}: None}} to train it with `other`."
            )


def accumulate_singd_stats(*stats: Mapping[str, LayerCurvature]) -> dict[str, LayerCurvature]:
    """Sum per-layer curvatures of several micro-batches (the update averages them)."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *stats)


class SINGDMultiStepsState(NamedTuple):
    """State of :func:`singd_multi_steps`: the statistics summed so far, and
    ``optax.MultiSteps``' own state."""

    acc_stats: dict[str, LayerCurvature]
    inner: optax.MultiStepsState


def singd_multi_steps(tx: optax.GradientTransformation,
                      every_k_schedule: int | Callable[[Array], Array],
                      ) -> optax.GradientTransformationExtraArgs:
    r"""``optax.MultiSteps`` for an optimizer containing :func:`singd`.

    ``optax.MultiSteps`` averages the gradients of ``k`` micro-batches but hands the
    inner optimizer only the *last* micro-batch's extra arguments, so SINGD would
    refresh ``K, C`` from ``1/k`` of the batch. This wrapper also sums the per-layer
    statistics :math:`H_K, H_C` over the micro-steps (:func:`accumulate_singd_stats`)
    and passes the sum on the ``k``-th, where the update averages it: the step equals
    one big batch for INGD and IKFAC alike.

    ``update(grads, state, params, singd_stats=...)`` needs the
    :class:`LayerCurvature` statistics of :func:`singd_value_and_grad` called with
    ``opt_state`` (the whole state of this wrapper); raw captures cannot be summed.
    """
    multi = optax.MultiSteps(tx, every_k_schedule)

    def zero_stats(inner_state: Any) -> dict[str, LayerCurvature]:
        return {lp.config.path: zero_curvature(lp)
                for lp in _find_singd_state(inner_state).layers}

    def init_fn(params: Any) -> SINGDMultiStepsState:
        inner = multi.init(params)
        return SINGDMultiStepsState(zero_stats(inner), inner)

    def update_fn(updates: Any, state: SINGDMultiStepsState, params: Any = None,
                  singd_stats: Mapping[str, Any] | None = None, **extra_args: Any):
        if singd_stats is None:
            raise ValueError("singd_multi_steps needs singd_stats=... on every micro-step")
        raw = sorted(path for path, st in singd_stats.items()
                     if not isinstance(st, LayerCurvature))
        if raw:
            raise TypeError(
                f"singd_multi_steps sums LayerCurvature statistics, got raw captures for "
                f"{raw}: call singd_value_and_grad(..., opt_state=state) so that they "
                "are computed with the current factors"
            )
        summed = accumulate_singd_stats(state.acc_stats, dict(singd_stats))
        new_updates, inner = multi.update(updates, state.inner, params,
                                          singd_stats=summed, **extra_args)
        applied = inner.mini_step == 0  # the inner optimizer just took its step
        summed = jax.tree.map(lambda a: jnp.where(applied, jnp.zeros_like(a), a), summed)
        return new_updates, SINGDMultiStepsState(summed, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- the transform ----------------------------------------------------------------------
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


def _factor_gram(factor: structures_lib.StructuredMatrix, half_blocks: bool,
                 ) -> structures_lib.StructuredMatrix:
    """``P(S^T S)``; for a dense factor by symmetric half blocks if ``half_blocks``."""
    if half_blocks and factor.name == "dense":
        return structures_lib.DenseMatrix(structures_lib.square_gram(factor.mat))
    return factor.from_inner()


def _update_factors(layer: LayerPreconditioner, curv: LayerCurvature, hyper: _LayerHyper,
                    count: Array) -> LayerPreconditioner:
    k, c = layer.k, layer.c
    num = jnp.maximum(curv.count, 1.0)
    h_k = curv.h_k * (1.0 / num).astype(k.dtype)
    h_c = curv.h_c * (1.0 / num).astype(c.dtype)
    k_tk, c_tc = (_factor_gram(factor, by_half_blocks(layer.config.T)) for factor in (k, c))
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
    beta = _value(hyper.lr_cov, count)
    beta_k = beta_c = beta
    if hyper.normalize_lr_cov:
        beta_k = beta / jnp.maximum(1.0, new_m_k.max_abs())
        beta_c = beta / jnp.maximum(1.0, new_m_c.max_abs())
    new_k = k - k.matmul(new_m_k) * beta_k.astype(k.dtype)
    new_c = c - c.matmul(new_m_c) * beta_c.astype(c.dtype)
    keep_m = hyper.alpha1 != 0.0
    return LayerPreconditioner.with_outer_products(
        layer.config, new_k, new_c, new_m_k if keep_m else None, new_m_c if keep_m else None)


def natural_gradient(layer: LayerPreconditioner, kernel_grad: Array,
                     bias_grad: Array | None) -> tuple[Array, Array | None]:
    r""":math:`C C^\top \hat G K K^\top` split back into kernel and bias (Flax layout)."""
    cfg = layer.config
    x = _kernel_matrix(kernel_grad, cfg.kind)  # (d_i, d_o) = W-grad transposed

    def right(y):  # Y C C^T; the kept product is symmetric
        y = y.astype(cfg.dtype_c)
        return layer.c.right_outer_matmat(y) if layer.c_outer is None else y @ layer.c_outer

    if cfg.has_bias and isinstance(layer.k, structures_lib.DiagonalMatrix):
        # A diagonal K K^T scales the rows, C C^T acts on each row: the kernel rows
        # and the bias row go through apart, never joined into one (d_K, d_o) copy
        # (bench_singd's MLP, diagonal, T=1: two 3-4 MiB concatenations a step).
        k_sq = jnp.square(layer.k.diag)
        k_nat = right(x.astype(cfg.dtype_k) * k_sq[:-1, None])
        b_nat = right((bias_grad.astype(cfg.dtype_k) * k_sq[-1])[None, :])[0]
    else:
        if cfg.has_bias:
            x = jnp.concatenate([x, bias_grad[None, :].astype(x.dtype)], axis=0)
        x = x.astype(cfg.dtype_k)
        # K K^T Ghat^T, then (C C^T Ghat K K^T)^T
        z = right(layer.k.outer_matmat(x) if layer.k_outer is None else layer.k_outer @ x)
        k_nat = z[: cfg.dim_k - int(cfg.has_bias)]
        b_nat = z[-1] if cfg.has_bias else None
    k_nat = _kernel_from_matrix(k_nat, cfg.kernel_shape, cfg.kind)
    return k_nat.astype(kernel_grad.dtype), (
        None if bias_grad is None else b_nat.astype(bias_grad.dtype)
    )


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
) -> optax.GradientTransformationExtraArgs:
    r"""Structured inverse-free natural gradient descent (SINGD, Lin et al. 2023).

    See the module docstring for the update. ``update(grads, state, params,
    singd_stats=...)`` takes the statistics as an extra argument: either the per-layer
    :class:`LayerCurvature` returned by :func:`singd_value_and_grad` (recommended), or
    raw :class:`~sing_jax._src.singd.capture.LayerCapture` s; they are only read on
    steps with ``count % T == 0``.

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
      kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
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
      cache_outer_products: a dense factor ``S`` of dimension ``d`` keeps ``S S^T``
        in the state, refreshed with ``S``, where that saves work: when ``c d < T n``
        for the ``n`` columns it is applied to (``d_o`` for ``K``, ``d_K`` for ``C``),
        with ``c = 3/4`` at T = 1 from ``d = 768`` (``S S^T`` by symmetric half
        blocks), else 1.
        The natural gradient then takes one product instead of two per factor (a
        1025x1024 layer: 9.8 against 19.3 ms on CPU), for ``d^2`` more numbers per
        kept product. False keeps none (the least memory).

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

    def registration(params: Any):
        paths, leaves, _ = _leaf_paths(params)
        index = {p: i for i, p in enumerate(paths)}
        layers = []  # (config, hyper, kernel_idx, bias_idx)
        used: set[int] = set()
        for i, p in enumerate(paths):
            parent, _, name = p.rpartition("/")
            leaf = leaves[i]
            if name != "kernel" or getattr(leaf, "ndim", 0) not in (2, 4):
                continue
            hp = resolve(parent)
            if hp is None:
                continue
            _validate(hp, f"layer {parent!r}: ")
            kind = "linear" if leaf.ndim == 2 else "conv"
            d_out = leaf.shape[-1]
            bias_i = index.get(f"{parent}/bias") if parent else index.get("bias")
            if bias_i is not None and tuple(leaves[bias_i].shape) != (d_out,):
                bias_i = None
            d_k = int(np.prod(leaf.shape[:-1])) + (bias_i is not None)
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
            cfg = LayerConfig(
                path=parent, kind=kind, kernel_shape=tuple(leaf.shape),
                has_bias=bias_i is not None, dim_k=d_k, dim_c=d_out,
                structure_k=s_k, structure_c=s_c,
                dtype_k=jnp.dtype(pdt_k or leaf.dtype).name,
                dtype_c=jnp.dtype(pdt_c or leaf.dtype).name,
                kfac_approx=hp["kfac_approx"], loss_average=hp["loss_average"], T=period,
                cache_k_outer=_caches_outer(s_k, d_k, d_out, period, cache),
                cache_c_outer=_caches_outer(s_c, d_out, d_k, period, cache),
            )
            hyper = _LayerHyper(hp["learning_rate"], hp["momentum"], hp["damping"], alpha,
                                hp["weight_decay"], hp["lr_cov"], bool(hp["kfac_like"]),
                                bool(hp["normalize_lr_cov"]))
            layers.append((cfg, hyper, i, bias_i))
            used.add(i)
            if bias_i is not None:
                used.add(bias_i)
        other_idx = [i for i in range(len(leaves)) if i not in used]
        return layers, other_idx, paths

    def masked(tree: Any, keep: list[int]) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        keep_set = set(keep)
        return treedef.unflatten(
            [x if i in keep_set else optax.MaskedNode() for i, x in enumerate(leaves)]
        )

    def init_fn(params: Any) -> SINGDState:
        layers, other_idx, paths = registration(params)
        warn_unmatched_overrides(paths)
        _, leaves, _ = _leaf_paths(params)
        precs, bufs, rows = [], [], []
        for cfg, hyper, ki, bi in layers:
            k = cfg.structure_k.eye(cfg.dim_k, jnp.dtype(cfg.dtype_k))
            c = cfg.structure_c.eye(cfg.dim_c, jnp.dtype(cfg.dtype_c))
            m_k = m_c = None
            if hyper.alpha1 != 0.0:
                m_k = cfg.structure_k.zeros(cfg.dim_k, jnp.dtype(cfg.dtype_k))
                m_c = cfg.structure_c.zeros(cfg.dim_c, jnp.dtype(cfg.dtype_c))
            prec = LayerPreconditioner.with_outer_products(cfg, k, c, m_k, m_c,
                                                           identity_factors=True)
            precs.append(prec)
            bufs.append((jnp.zeros_like(leaves[ki]),
                         None if bi is None else jnp.zeros_like(leaves[bi])))
            nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(prec))
            rows.append((cfg.path, cfg.kind, str(cfg.structure_k), str(cfg.structure_c),
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
        layers, other_idx, paths = registration(updates)
        if len(layers) != len(state.layers) or any(
            cfg != lp.config for (cfg, *_), lp in zip(layers, state.layers, strict=False)
        ):
            now = {cfg.path: cfg for cfg, *_ in layers}
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
        if singd_stats is None and layers:
            raise ValueError(
                "SINGD's update needs the layer statistics: pass singd_stats=... (from "
                "sing_jax.singd_value_and_grad) on every step"
            )
        count = state.count
        new_leaves: list[Any] = list(g_leaves)
        new_precs, new_bufs = [], []
        for (cfg, hyper, ki, bi), lp, (buf_k, buf_b) in zip(
            layers, state.layers, state.momentum, strict=True
        ):
            if cfg.path not in singd_stats:
                raise ValueError(
                    f"singd_stats has no entry for registered layer {cfg.path!r}; got "
                    f"{sorted(singd_stats)}. If it is not an nnx.Linear/nnx.Conv, exclude it "
                    f"with layer_overrides={{{cfg.path!r}: None}}"
                )
            stats = singd_stats[cfg.path]

            def refresh(lp, stats=stats, hyper=hyper):
                if isinstance(stats, capture_lib.LayerCapture):
                    curv = layer_curvature(lp, stats, axis_name)
                elif isinstance(stats, LayerCurvature):
                    curv = stats
                else:
                    raise TypeError(
                        f"singd_stats[{lp.config.path!r}] must be a LayerCurvature or "
                        f"LayerCapture, got {type(stats).__name__}"
                    )
                return _update_factors(lp, curv, hyper, count)

            if cfg.T == 1:
                lp = refresh(lp)
            else:
                lp = jax.lax.cond(count % cfg.T == 0, refresh, lambda lp: lp, lp)
            new_precs.append(lp)

            gk = g_leaves[ki]
            gb = g_leaves[bi] if bi is not None else None
            nat_k, nat_b = natural_gradient(lp, gk, gb)
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
        capture_lib._check_options(hp["kfac_approx"], hp["loss_average"])
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


# -- the train-step helper -------------------------------------------------------------------
def _concrete_int(x: Any) -> int | None:
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _warn_plain_multisteps(opt_state: Any) -> None:
    """Warns when SINGD sits in optax.MultiSteps without :func:`singd_multi_steps`."""
    wrappers = jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState | SINGDMultiStepsState))
    kinds = {type(w) for w in wrappers}
    if optax.MultiStepsState in kinds and SINGDMultiStepsState not in kinds:
        warnings.warn(
            "SINGD is wrapped in optax.MultiSteps, which hands it only the last "
            "micro-batch's statistics: use sing_jax.singd_multi_steps(tx, k) to sum them "
            "over the micro-batches", stacklevel=3)


def singd_value_and_grad(loss_fn: Callable, model: Any, *args: Any, opt_state: Any = None,
                         has_aux: bool = False, axis_name: str | None = None,
                         layers: Collection[str] | None = None, **kwargs: Any):
    r"""One forward and one backward pass giving the loss, gradients and SINGD statistics.

    ``loss_fn(model, *args, **kwargs)`` runs an unmodified Flax NNX model (made of
    ``nnx.Linear`` / 2-D ``nnx.Conv`` layers plus anything else) and returns the loss
    averaged as SINGD's ``loss_average`` says (or ``(loss, aux)`` with ``has_aux``).

    With ``opt_state`` (the state of an optimizer containing :func:`singd`) the
    statistics are the per-layer :class:`LayerCurvature` :math:`(H_K, H_C)` computed
    with the current factors; a layer whose preconditioner is not refreshed at this
    step (``count % T != 0``, ``T`` per layer) gets zero statistics without computing
    them (``lax.cond`` under ``jit``), and when no layer is refreshed no capture work
    is done at all.
    Without ``opt_state`` the raw per-layer captures are returned (always captured).
    Only the layers SINGD registered (with ``opt_state``), or those in ``layers``
    (default: every ``nnx.Linear``/``nnx.Conv``), are captured; the others, e.g. a
    layer excluded by ``layer_overrides`` because it is called twice or is a 1-D
    conv, run untouched.

    With ``axis_name`` (inside ``shard_map``/``pmap``) the loss, the gradients and the
    curvature statistics are averaged over that axis (the statistics summed for
    ``loss_average=None`` layers). Raw captures (no ``opt_state``) are per-device layer
    inputs and output gradients, which cannot be averaged as such: they carry the axis
    name, and the curvature ``singd``'s update (or :func:`singd_curvature`) builds from
    them is averaged over it. Under plain ``jit`` with a sharded batch no collective is
    needed.

    Returns:
      ``(value, grads), stats``; ``value`` is ``loss`` or ``(loss, aux)``.
    """
    from flax import nnx

    capture_lib._warn_unsupported(model)
    if opt_state is not None:
        # nnx.Optimizer keeps its state in OptState variables: plain arrays from here on
        opt_state = nnx.as_pure(opt_state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    if opt_state is not None:
        _warn_plain_multisteps(opt_state)
    if opt_state is not None and layers is None:
        layers = [lp.config.path for lp in _find_singd_state(opt_state).layers]

    def run(capture: bool):
        return capture_lib.functional_value_and_grad(
            loss_fn, graphdef, params, rest, args, kwargs, has_aux=has_aux, capture=capture,
            only=layers)

    if opt_state is None:
        value, grads, stats, new_rest = run(True)
    else:
        state = _find_singd_state(opt_state)
        count = _concrete_int(state.count)
        if state.layers and count is not None and all(
                count % lp.config.T != 0 for lp in state.layers):
            # a known skip step for every layer: a plain value_and_grad, no capture work
            value, grads, _, new_rest = run(False)
            stats = {lp.config.path: zero_curvature(lp) for lp in state.layers}
        else:
            value, grads, captures, new_rest = run(True)
            stats = refreshed_curvature(opt_state, captures)
    if axis_name is not None:
        value, grads = jax.lax.pmean((value, grads), axis_name)
        if opt_state is None:
            stats = {path: dataclasses.replace(cap, axis_name=axis_name)
                     for path, cap in stats.items()}
        else:
            reduced = {}
            for lp in _find_singd_state(opt_state).layers:
                op = jax.lax.pmean if lp.config.loss_average is not None else jax.lax.psum
                cur = stats[lp.config.path]
                reduced[lp.config.path] = LayerCurvature(
                    *op((cur.h_k, cur.h_c), axis_name), cur.count)
            stats = reduced
    nnx.update(model, new_rest)
    return (value, grads), stats
