"""Per-leaf gradient, update and parameter norms, and SING's rising-gradient-norm check.

:func:`with_diagnostics` wraps any optimizer and records in its state, every step
and under jit, for each parameter leaf ``l`` (paths as in
:mod:`sing_jax._src.regularizers`):

.. math::

  \\lVert g_l \\rVert_2,\\quad \\lVert u_l \\rVert_2,\\quad \\lVert p_l \\rVert_2,\\quad
  \\eta^{\\mathrm{eff}}_l = \\operatorname{mean}_c \\frac{\\eta}{\\langle p_l, p_l\\rangle_c}

where ``g`` is the gradient entering the optimizer, ``u`` the update it returns,
``p`` the parameters before the update, and the last one (the effective learning
rate of the spherical view: a scale-invariant channel ``w`` moves on its sphere
as if the learning rate were :math:`\\eta / \\lVert w\\rVert^2`) is recorded only for
the leaves that ``channel_dims`` marks scale invariant (group size > 1).
:func:`diagnostics_metrics` reads them back as a flat ``{name: scalar}`` dict for
logging. :class:`GradNormMonitor` automates seed 000's advice: flag the leaves
whose gradient norm keeps rising while the loss falls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sing_jax._src.channels import channel_inner, resolve_channel_dims
from sing_jax._src.regularizers import named_leaves

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
METRIC_FIELDS = ("grad_norm", "update_norm", "param_norm", "effective_lr")


class DiagnosticsState(NamedTuple):
    """The wrapped optimizer's state plus the last step's per-leaf measurements.

    The dicts are keyed by parameter path; ``effective_lr`` only has the
    scale-invariant leaves (empty when no learning rate was given).
    """

    count: jax.Array
    learning_rate: jax.Array
    grad_norm: dict[str, jax.Array]
    update_norm: dict[str, jax.Array]
    param_norm: dict[str, jax.Array]
    effective_lr: dict[str, jax.Array]
    inner_state: Any


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))))


def with_diagnostics(tx: optax.GradientTransformation, *,
                     learning_rate: ScalarOrSchedule | None = None,
                     channel_dims: Any = None,
                     metrics: Sequence[str] = METRIC_FIELDS
                     ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that its state records per-leaf norms and effective learning rates.

    The updates are exactly those of ``tx``; the cost is one reduction per leaf
    for each of ``g``, ``u``, ``p`` (and one per channel for the effective learning
    rate), cheap enough for every step under jit.

    Args:
      tx: any optimizer (optax's or sing_jax's).
      learning_rate: the learning rate ``tx`` uses (a float or the same schedule,
        evaluated at the update count) for the effective learning rate; ``None``
        records no effective learning rate.
      channel_dims: the channel spec (as given to the spherical optimizers: a
        ``ChannelDims``, a tree of ``ChannelDims | None``, or a callable) that marks
        the scale-invariant leaves.
      metrics: which of ``'grad_norm'``, ``'update_norm'``, ``'param_norm'``,
        ``'effective_lr'`` to record (the others stay empty dicts). Leaving out
        ``'update_norm'`` spares materialising the update: on CPU it is the costly
        one (see ``experiments/bench_diagnostics.py``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`DiagnosticsState`; ``update`` needs ``params``.

    Example::

      tx = with_diagnostics(optax.adam(1e-3), learning_rate=1e-3)
      ...
      metrics = diagnostics_metrics(opt_state)   # {'grad_norm/dense/kernel': ..., ...}
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRIC_FIELDS]
    if unknown:
        raise ValueError(f"with_diagnostics: unknown metrics {unknown}; expected some of "
                         f"{METRIC_FIELDS}")
    inner = optax.with_extra_args_support(tx)

    def norms(field, names, tree):
        if field not in metrics:
            return {}
        return {n: _norm(x) for n, x in zip(names, jax.tree.leaves(tree))}

    def measure(count, grads, updates, params):
        names = [name for name, _ in named_leaves(params)]
        param_leaves = jax.tree.leaves(params)
        grad_norm = norms("grad_norm", names, grads)
        update_norm = norms("update_norm", names, updates)
        param_norm = norms("param_norm", names, params)
        if learning_rate is None:
            lr = jnp.asarray(jnp.nan, jnp.float32)
        else:
            lr = jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate,
                             jnp.float32)
        effective_lr = {}
        if (learning_rate is not None and channel_dims is not None
                and "effective_lr" in metrics):
            geometries = resolve_channel_dims(channel_dims, params)
            for name, geometry, p in zip(names, geometries, param_leaves):
                if geometry.is_spherical:
                    p32 = jnp.asarray(p, jnp.float32)
                    effective_lr[name] = jnp.mean(lr / channel_inner(p32, p32, geometry))
        return lr, grad_norm, update_norm, param_norm, effective_lr

    def init_fn(params):
        # The structure of the measurements, zeroed: measure once on the params.
        plain = _pure(params)
        lr, grad_norm, update_norm, param_norm, effective_lr = jax.tree.map(
            jnp.zeros_like, measure(jnp.zeros([], jnp.int32), plain, plain, plain))
        return DiagnosticsState(count=jnp.zeros([], jnp.int32), learning_rate=lr,
                                grad_norm=grad_norm, update_norm=update_norm,
                                param_norm=param_norm, effective_lr=effective_lr,
                                inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("with_diagnostics: update needs params (for the parameter norms "
                             "and the effective learning rate)")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        lr, grad_norm, update_norm, param_norm, effective_lr = measure(
            state.count, updates, new_updates, params)
        return new_updates, DiagnosticsState(
            count=optax.safe_increment(state.count), learning_rate=lr, grad_norm=grad_norm,
            update_norm=update_norm, param_norm=param_norm, effective_lr=effective_lr,
            inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _pure(tree: Any) -> Any:
    """Strips Flax Variables (``nnx.State`` of ``Param`` s, ``nnx.Optimizer`` states)."""
    return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def find_diagnostics_state(opt_state: Any) -> DiagnosticsState:
    """The :class:`DiagnosticsState` inside an optimizer state (``nnx.Optimizer``'s too)."""
    found = [x for x in jax.tree.leaves(opt_state,
                                        is_leaf=lambda x: isinstance(x, DiagnosticsState))
             if isinstance(x, DiagnosticsState)]
    if not found:
        raise ValueError("find_diagnostics_state: no DiagnosticsState in this optimizer state; "
                         "wrap the optimizer with sing_jax.with_diagnostics(...)")
    if len(found) > 1:
        raise ValueError(f"find_diagnostics_state: found {len(found)} DiagnosticsStates; "
                         "wrap the optimizer only once")
    return _pure(found[0])


def diagnostics_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """The last step's measurements as a flat dict for logging.

    Keys: ``'grad_norm/<path>'``, ``'update_norm/<path>'``, ``'param_norm/<path>'``,
    ``'effective_lr/<path>'`` (scale-invariant leaves only), and the global norms
    ``'grad_norm/global'``, ``'update_norm/global'``, ``'param_norm/global'``, and
    ``'learning_rate'`` when one was given. Works under jit.
    """
    state = find_diagnostics_state(opt_state)
    metrics: dict[str, jax.Array] = {}
    for field in METRIC_FIELDS:
        values = getattr(state, field)
        for name, value in values.items():
            metrics[f"{field}/{name}"] = value
        if field != "effective_lr" and values:
            metrics[f"{field}/global"] = jnp.sqrt(sum(jnp.square(v) for v in values.values()))
    metrics["learning_rate"] = state.learning_rate
    return metrics


# ---------------------------------------------------------------------------------
# SING's advice: gradient norms that rise while the loss falls


class RisingGradNorms(NamedTuple):
    """What :func:`find_rising_grad_norms` found.

    ``leaves``: the flagged paths, largest rise first; ``rise``: for every leaf, the
    relative change of its fitted gradient norm over the window (0.5 = +50%);
    ``loss_change``: the same for the loss; ``message``: a readable report.
    """

    leaves: tuple[str, ...]
    rise: dict[str, float]
    loss_change: float
    message: str


def _fitted_change(values: np.ndarray, log: bool) -> float:
    """Relative change between the ends of a least-squares line through ``values``."""
    steps = np.arange(len(values), dtype=np.float64)
    y = np.log(np.maximum(values, 1e-30)) if log else values
    slope, intercept = np.polyfit(steps, y, 1)
    if log:
        return float(math.expm1(slope * (len(values) - 1)))
    start = intercept
    end = intercept + slope * (len(values) - 1)
    return float((end - start) / max(abs(start), 1e-30))


def find_rising_grad_norms(losses: Sequence[float], grad_norms: Mapping[str, Sequence[float]],
                           *, min_rise: float = 0.2) -> RisingGradNorms:
    """Flags the leaves whose gradient norm rose while the loss fell (seed 000's advice).

    Over the given window, a line is fitted to the loss and to the log of each
    leaf's gradient norm. When the loss fell, every leaf whose fitted gradient norm
    rose by at least ``min_rise`` (relative) is flagged. SING advises freezing such
    layers (typically LayerNorm/LayerScale affine parameters): see
    :func:`sing_jax.freeze` with :func:`sing_jax.frozen_by_regex` or
    :func:`sing_jax.frozen_norm_affine`.

    Args:
      losses: the training loss at each step of the window (3 or more).
      grad_norms: per leaf path, its gradient norm at the same steps.
      min_rise: the relative rise that counts, > 0.

    Returns:
      A :class:`RisingGradNorms`.
    """
    if not min_rise > 0:
        raise ValueError(f"find_rising_grad_norms: min_rise must be > 0, got {min_rise}")
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 1 or len(losses) < 3:
        raise ValueError(f"find_rising_grad_norms: need a 1-D window of 3 or more losses, "
                         f"got shape {losses.shape}")
    if not np.all(np.isfinite(losses)):
        raise ValueError("find_rising_grad_norms: the losses contain NaN or inf")
    rise = {}
    for name, norms in grad_norms.items():
        norms = np.asarray(norms, np.float64)
        if norms.shape != losses.shape:
            raise ValueError(f"find_rising_grad_norms: {name} has {norms.shape} gradient norms "
                             f"for {losses.shape} losses")
        rise[name] = _fitted_change(norms, log=True)
    loss_change = _fitted_change(losses, log=False)
    flagged = ()
    if loss_change < 0:
        flagged = tuple(sorted((n for n, r in rise.items() if r >= min_rise),
                               key=lambda n: -rise[n]))
    if flagged:
        lines = [f"the loss fell {-loss_change:.0%} over the last {len(losses)} steps while "
                 "these gradient norms rose:"]
        lines += [f"  {n}: +{rise[n]:.0%}" for n in flagged]
        patterns = ", ".join(repr(n) for n in flagged)
        lines.append("SING's advice: stop learning these parameters (LayerNorm/LayerScale "
                     "affine ones in particular), e.g. "
                     f"tx = sing_jax.freeze(tx, sing_jax.frozen_by_regex([{patterns}])) "
                     "or sing_jax.frozen_norm_affine(model).")
        message = "\n".join(lines)
    elif loss_change >= 0:
        message = f"the loss did not fall over the last {len(losses)} steps; nothing flagged"
    else:
        message = f"no gradient norm rose by {min_rise:.0%} or more; nothing flagged"
    return RisingGradNorms(flagged, rise, loss_change, message)


class GradNormMonitor:
    """Keeps the last ``window`` steps of loss and per-leaf gradient norms, and checks them.

    Feed it the training loss and :func:`diagnostics_metrics` (host-side, e.g. at
    each logging step)::

      monitor = GradNormMonitor(window=200)
      monitor.record(loss, diagnostics_metrics(opt_state))
      report = monitor.check()        # a RisingGradNorms; report.leaves, report.message
    """

    def __init__(self, window: int = 100, min_rise: float = 0.2):
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"GradNormMonitor: window must be an int >= 3, got {window!r}")
        self.window = window
        self.min_rise = min_rise
        self.losses: list[float] = []
        self.grad_norms: dict[str, list[float]] = {}

    def record(self, loss: float, metrics: Mapping[str, Any]) -> None:
        """Adds one step: the loss and the ``'grad_norm/<path>'`` entries of ``metrics``."""
        norms = {k[len("grad_norm/"):]: float(v) for k, v in metrics.items()
                 if k.startswith("grad_norm/") and k != "grad_norm/global"}
        if not norms:
            raise ValueError("GradNormMonitor.record: metrics has no 'grad_norm/<path>' entry; "
                             "pass diagnostics_metrics(opt_state)")
        if self.grad_norms and set(norms) != set(self.grad_norms):
            raise ValueError("GradNormMonitor.record: the leaves changed between steps: "
                             f"{sorted(set(norms) ^ set(self.grad_norms))[:4]}")
        self.losses = (self.losses + [float(loss)])[-self.window:]
        for name, value in norms.items():
            self.grad_norms[name] = (self.grad_norms.get(name, []) + [value])[-self.window:]

    @property
    def full(self) -> bool:
        """True once ``window`` steps were recorded."""
        return len(self.losses) >= self.window

    def check(self, warn: bool = False) -> RisingGradNorms:
        """:func:`find_rising_grad_norms` over the recorded window.

        With ``warn=True`` a flagged window is also reported as a ``UserWarning``
        carrying the report's message.
        """
        report = find_rising_grad_norms(self.losses, self.grad_norms, min_rise=self.min_rise)
        if warn and report.leaves:
            warnings.warn(report.message, stacklevel=2)
        return report
