r"""SINGD for training loops: loss, gradients and curvature from one forward and one
backward pass, and gradient accumulation over micro-batches.

:func:`singd_value_and_grad` (on an NNX model) and :func:`singd_value_and_grad_split`
(on a split model: graph definition, parameters, other state; what a jitted
``shard_map``/``pmap`` train step holds) run the capture (:mod:`.capture`) and,
given the optimizer state, the curvature refresh (:mod:`.curvature`) of the layers
whose factors are refreshed at this step: what ``tx.update(...,
singd_stats=...)`` reads.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sing_jax._src.singd import capture as capture_lib
from sing_jax._src.singd.capture import LayerCapture
from sing_jax._src.singd.curvature import LayerCurvature
from sing_jax._src.singd.transform import SINGDState, singd_state

Array = jax.Array


def _concrete_int(x: Any) -> int | None:
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _check_captured(state: SINGDState, captures: Mapping[str, Any]) -> None:
    for layer in state.layers:
        path = layer.config.path
        if path not in captures:
            raise ValueError(
                f"no statistics captured for registered layer {path!r}; captured: "
                f"{sorted(captures)}. Either the forward pass did not call it, or it was "
                "called inside a transform that re-creates the module where the capture "
                "cannot see it (a jax transform, or an NNX transform that does not carry "
                "the module's state), or its class does not call the Flax layer's "
                "__call__. Exclude it with "
                f"layer_overrides={{{path!r}: None}} to train it with `other`."
            )


def singd_curvature(opt_state: Any, captures: Mapping[str, LayerCapture],
                    axis_name: str | None = None) -> dict[str, LayerCurvature]:
    """Per-layer :class:`LayerCurvature` from raw captures and the current factors.

    Sum the results of several micro-batches with :func:`accumulate_singd_stats`; the
    update averages them (``count``) so accumulation equals one big batch.
    """
    state = singd_state(opt_state)
    _check_captured(state, captures)
    return {layer.config.path: layer.curvature(captures[layer.config.path], axis_name)
            for layer in state.layers}


def _refreshed_curvature(state: SINGDState, captures: Mapping[str, LayerCapture],
                         axis_name: str | None) -> dict[str, LayerCurvature]:
    """:func:`singd_curvature` for the layers refreshed at this step (``count % T ==
    0``, ``T`` per layer), zero statistics without computing them for the others.

    Where the step count is traced (under ``jit``) each layer's curvature sits behind
    a ``lax.cond``; only the curvature: the captures come from a forward/backward pass
    outside it, which under ``jit`` costs next to nothing more than the plain one (the
    layer inputs are kept for the backward pass, the output gradients computed
    anyway), whereas a whole model behind a ``lax.cond`` runs slowly on some backends
    (XLA:CPU picks slow convolution kernels there).
    """
    _check_captured(state, captures)
    count = _concrete_int(state.count)
    stats = {}
    for lp in state.layers:
        cap, period = captures[lp.config.path], lp.config.T
        if period == 1 or (count is not None and count % period == 0):
            stats[lp.config.path] = lp.curvature(cap, axis_name)
        elif count is not None:
            stats[lp.config.path] = lp.zero_curvature()
        else:
            stats[lp.config.path] = jax.lax.cond(
                state.count % period == 0,
                lambda c, lp=lp: lp.curvature(c, axis_name),
                lambda c, lp=lp: lp.zero_curvature(), cap)
    return stats


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
        return {lp.config.path: lp.zero_curvature()
                for lp in singd_state(inner_state).layers}

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


def _warn_plain_multisteps(opt_state: Any) -> None:
    """Warns when SINGD sits in optax.MultiSteps without :func:`singd_multi_steps`."""
    wrappers = jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState | SINGDMultiStepsState))
    kinds = {type(w) for w in wrappers}
    if optax.MultiStepsState in kinds and SINGDMultiStepsState not in kinds:
        warnings.warn(
            "SINGD is wrapped in optax.MultiSteps, which hands it only the last "
            "micro-batch's statistics: use sing_jax.singd_multi_steps(tx, k) to sum them "
            "over the micro-batches", stacklevel=4)


class SINGDValueAndGrad(NamedTuple):
    """What :func:`singd_value_and_grad_split` returns."""

    value: Any  # the loss, or (loss, aux) with has_aux
    grads: Any  # the parameters' gradients
    stats: dict[str, LayerCurvature | LayerCapture]  # singd_stats for tx.update
    model_state: Any  # the new non-parameter state (batch statistics, RNG counts, ...)


def _value_grad_and_stats(loss_fn: Callable, graphdef: Any, params: Any, rest: Any,
                          args: tuple, kwargs: dict, opt_state: Any, has_aux: bool,
                          axis_name: str | None, layers: Collection[str] | None):
    if opt_state is not None:
        # nnx.Optimizer keeps its state in OptState variables: plain arrays from here on
        opt_state = nnx.as_pure(opt_state)
        _warn_plain_multisteps(opt_state)
        state = singd_state(opt_state)
        if layers is None:
            layers = [lp.config.path for lp in state.layers]

    def run(capture: bool):
        return capture_lib.functional_value_and_grad(
            loss_fn, graphdef, params, rest, args, kwargs, has_aux=has_aux,
            capture=capture, only=layers)

    if opt_state is None:
        value, grads, stats, new_rest = run(True)
        if axis_name is not None:
            stats = {path: dataclasses.replace(cap, axis_name=axis_name)
                     for path, cap in stats.items()}
    else:
        count = _concrete_int(state.count)
        if state.layers and count is not None and all(
                count % lp.config.T != 0 for lp in state.layers):
            # a known skip step for every layer: a plain value_and_grad, no capture work
            value, grads, _, new_rest = run(False)
            stats = {lp.config.path: lp.zero_curvature() for lp in state.layers}
        else:
            value, grads, captures, new_rest = run(True)
            stats = _refreshed_curvature(state, captures, axis_name)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    return value, grads, stats, new_rest


def singd_value_and_grad_split(loss_fn: Callable, graphdef: nnx.GraphDef, params: Any,
                               model_state: Any, *args: Any, opt_state: Any = None,
                               has_aux: bool = False, axis_name: str | None = None,
                               **kwargs: Any) -> SINGDValueAndGrad:
    r""":func:`singd_value_and_grad` on a split model, for a pure (jitted) train step.

    ``loss_fn(model, *args, **kwargs)`` gets ``nnx.merge(graphdef, params,
    model_state)``; ``params`` and ``model_state`` are ``nnx.State`` s or pure dicts
    (``nnx.to_pure_dict``), the returned ``model_state`` is of the same kind. With
    ``axis_name`` (inside ``shard_map``/``pmap``) the gradients and the curvature are
    averaged over that axis (the curvature summed for ``loss_average=None`` layers);
    the ``value`` stays this device's.

    Returns:
      :class:`SINGDValueAndGrad` ``(value, grads, stats, model_state)``: pass
      ``singd_stats=stats`` to ``tx.update``.
    """
    value, grads, stats, new_rest = _value_grad_and_stats(
        loss_fn, graphdef, params, model_state, args, kwargs, opt_state, has_aux,
        axis_name, None)
    if not isinstance(model_state, nnx.State):
        new_rest = nnx.to_pure_dict(new_rest)
    return SINGDValueAndGrad(value, grads, stats, new_rest)


def singd_value_and_grad(loss_fn: Callable, model: nnx.Module, *args: Any,
                         opt_state: Any = None, has_aux: bool = False,
                         axis_name: str | None = None,
                         layers: Collection[str] | None = None, **kwargs: Any):
    r"""One forward and one backward pass giving the loss, gradients and SINGD statistics.

    ``loss_fn(model, *args, **kwargs)`` runs an unmodified Flax NNX model and returns
    the loss averaged as SINGD's ``loss_average`` says (or ``(loss, aux)`` with
    ``has_aux``). The model's non-parameter state (batch statistics, ...) is updated
    in place, as ``nnx.value_and_grad`` does.

    With ``opt_state`` (the state of an optimizer containing :func:`singd`) the
    statistics are the per-layer :class:`LayerCurvature` :math:`(H_K, H_C)` computed
    with the current factors; a layer whose preconditioner is not refreshed at this
    step (``count % T != 0``, ``T`` per layer) gets zero statistics without computing
    them (``lax.cond`` under ``jit``), and when no layer is refreshed no capture work
    is done at all.
    Without ``opt_state`` the raw per-layer :class:`LayerCapture` s are returned.
    Only the layers SINGD registered (with ``opt_state``), or those in ``layers``
    (default: every supported layer), are captured; the others (e.g. a layer
    excluded by ``layer_overrides``) run untouched.

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
    capture_lib.warn_unsupported(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value, grads, stats, new_rest = _value_grad_and_stats(
        loss_fn, graphdef, params, rest, args, kwargs, opt_state, has_aux, axis_name,
        layers)
    if axis_name is not None:
        value = jax.lax.pmean(value, axis_name)
    nnx.update(model, new_rest)
    return (value, grads), stats
