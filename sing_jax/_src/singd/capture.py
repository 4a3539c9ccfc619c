r"""SINGD's capture: the inputs and output gradients of every preconditioned layer,
from one forward and one backward pass of an unmodified NNX model.

For each call of a layer (:mod:`.layers`) the capture records the input :math:`x` and
the gradient of the loss w.r.t. the output :math:`\partial\ell/\partial s`: the
output gets a zero "perturbation" :math:`s + \epsilon`, and the gradient w.r.t.
:math:`\epsilon` is the output gradient. Both are kept as *rows*: every position of
the call (the axes that are no feature axis) is one row of :math:`d_i` input features
or :math:`d_o` output features (convolutions keep the image, ``(B, H, W, C)``, for
unfolding later).

How the layers are seen. The capture works on its own copy of the model (``nnx.merge``
of the split model): on that copy, and only there, every layer to capture becomes an
instance of a subclass that puts an interceptor between the layer's own class and
its Flax base class (``nnx.Linear``, ...): a user subclass that overrides
``__call__`` and calls ``super().__call__`` is captured at the base call, the linear
map itself. No Flax class is modified, and the interceptor finds its recording
through a :class:`contextvars.ContextVar`, so captures in several threads (or nested
ones) do not see each other. The recordings live in NNX variables on the layers, so
NNX transforms that carry module state (``nnx.scan`` over stacked blocks, ``nnx.remat``)
carry them too: a scanned layer's inputs and output gradients come out stacked, one
slice per layer. Flax's own ``nnx.capture``/``Module.perturb`` cannot carry this:
``perturb`` must be called by the layer's own code (Flax's layers do not), and
``nnx.capture(method_outputs=...)`` records outputs only, by rewriting the methods of
the layer classes for the duration of the call.

A layer called several times in one forward pass (shared weights) gets one record
per call.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
import threading
import types
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx

from sing_jax._src.paths import path_str
from sing_jax._src.singd.layers import (
    SUPPORTED_LAYERS,
    LayerInfo,
    describe_layer,
    einsum_parts,
    supported_modules,
)

Array = jax.Array


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LayerCapture:
    r"""What one forward/backward pass recorded for one layer, one entry per call.

    ``inputs[j]``: the input of call ``j`` as rows, ``stack + (B, positions..., d_i)``
    (convolutions: ``stack + (B, H, W, C_in)``); ``output_grads[j]``: the gradient of
    the loss w.r.t. its output, ``stack + (B, positions..., d_o)`` (convolutions:
    ``stack + (B, H', W', C_out)``). ``stack`` are the stacked-layer axes of a scanned
    layer. ``axis_name``: the mapped axis (``shard_map``/``pmap``) these per-device
    records were taken under; the curvature built from them is averaged over it.
    """

    inputs: tuple[Array, ...]
    output_grads: tuple[Array, ...]
    info: LayerInfo
    axis_name: str | None = None

    def tree_flatten(self):
        return (self.inputs, self.output_grads), (self.info, self.axis_name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        info, axis_name = aux
        return cls(tuple(children[0]), tuple(children[1]), info, axis_name)


# -- rows of one call ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _CallLayout:
    """How one call's input and output become rows: a transpose, then a reshape."""

    input_order: tuple[int, ...]
    input_rows: tuple[int, ...]
    output_order: tuple[int, ...]
    output_rows: tuple[int, ...]
    output_shape: tuple[int, ...]

    def rows_of_input(self, x: Array) -> Array:
        return jnp.transpose(x, self.input_order).reshape(self.input_rows)

    def output_of_rows(self, rows: Array) -> Array:
        permuted = rows.reshape(tuple(self.output_shape[a] for a in self.output_order))
        inverse = [0] * len(self.output_order)
        for position, axis in enumerate(self.output_order):
            inverse[axis] = position
        return jnp.transpose(permuted, inverse)


def _rows_shape(free: tuple[int, ...], features: int) -> tuple[int, ...]:
    # An unbatched call (no position axis) is a batch of one.
    return (free or (1,)) + (features,)


def _call_layout(info: LayerInfo, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                 equation: str | None) -> _CallLayout:
    ndim = len(x_shape)
    if info.kind == "conv":
        if ndim < 3:
            raise ValueError(f"layer {info.path!r}: conv input must be (..., H, W, C), "
                             f"got {x_shape}")
        batch = math.prod(x_shape[:-3])
        return _CallLayout(tuple(range(ndim)), (batch,) + x_shape[-3:],
                           tuple(range(len(y_shape))), (batch,) + y_shape[-3:], y_shape)
    if info.equation:
        equation = (equation or info.equation).replace(" ", "")
        if equation != info.equation:
            raise ValueError(f"layer {info.path!r}: called with einsum_str {equation!r}, "
                             f"registered with {info.equation!r}")
        inp, ker, out = einsum_parts(equation, info.path)
        ellipsis = [f"#{i}" for i in range(ndim - len(inp.replace("...", "")))]

        def letters(subscripts):
            head, dots, tail = subscripts.partition("...")
            return list(head) + (ellipsis if dots else []) + list(tail)

        x_letters, y_letters = letters(inp), letters(out)
        free = [c for c in x_letters if c not in ker]
        contracted = [c for c in ker if c in x_letters]
        out_features = [c for c in y_letters if c in ker]
        input_order = tuple(x_letters.index(c) for c in free + contracted)
        output_order = tuple(y_letters.index(c) for c in free + out_features)
    else:  # nnx.Linear / nnx.LinearGeneral: the free axes, then the output features
        axes = tuple(a % ndim for a in info.axis)
        free_axes = [a for a in range(ndim) if a not in axes]
        input_order = tuple(free_axes) + axes
        output_order = tuple(range(len(y_shape)))
        free = free_axes
    free_shape = tuple(x_shape[a] for a in input_order[:len(free)])
    return _CallLayout(input_order, _rows_shape(free_shape, info.dim_in), output_order,
                       _rows_shape(free_shape, info.dim_out), y_shape)


# -- interception ---------------------------------------------------------------------
class RecordedInput(nnx.Variable):
    """A layer call's input rows, set by the capture's interceptor."""


class OutputPerturbation(nnx.Variable):
    """The zero added to a layer call's output; its gradient is the output gradient."""


_CAPTURE_VARIABLES = nnx.Any(RecordedInput, OutputPerturbation)


class _Recorder:
    """One capture's bookkeeping: which layers, and what their calls looked like."""

    _ids = itertools.count()

    def __init__(self, infos: dict[str, LayerInfo], calls: dict[str, int] | None = None):
        self.id = next(self._ids)
        self.infos = infos
        self.probing = calls is None  # the abstract pass that finds shapes
        self.expected_calls = calls
        self.calls: dict[str, int] = {}
        self.input_rows: dict[str, list[jax.ShapeDtypeStruct]] = {}
        self.output_rows: dict[str, list[jax.ShapeDtypeStruct]] = {}


# The captures active in this context (thread, task): recorder id -> recorder.
_ACTIVE: contextvars.ContextVar[Mapping[int, _Recorder]] = contextvars.ContextVar(
    "sing_jax_singd_captures", default=types.MappingProxyType({}))


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    token = _ACTIVE.set(types.MappingProxyType({**_ACTIVE.get(), recorder.id: recorder}))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def _input_argument(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs["inputs"]


def _intercepted_call(layer: nnx.Module, base_call: Callable, args: tuple,
                      kwargs: dict) -> Any:
    out = base_call(*args, **kwargs)
    key = getattr(layer, "_singd_capture", None)
    recorder = _ACTIVE.get().get(key[0]) if key is not None else None
    if recorder is None:
        return out
    path = key[1]
    info = recorder.infos[path]
    x = _input_argument(args, kwargs)
    equation = None
    if info.equation:
        equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    layout = _call_layout(info, tuple(x.shape), tuple(out.shape), equation)
    call = recorder.calls.get(path, 0)
    recorder.calls[path] = call + 1
    stacked = info.kernel_shape[:len(info.kernel_shape) - layer.kernel.ndim]
    if stacked != info.stack_shape:
        raise ValueError(
            f"layer {path!r} with kernel {info.kernel_shape} was called with a kernel of "
            f"shape {tuple(layer.kernel.shape)}: SINGD preconditions a stacked layer "
            "called once per stacked slice (nnx.scan/nnx.vmap over its blocks)")
    if recorder.probing:
        recorder.input_rows.setdefault(path, []).append(
            jax.ShapeDtypeStruct(info.stack_shape + layout.input_rows, x.dtype))
        recorder.output_rows.setdefault(path, []).append(
            jax.ShapeDtypeStruct(info.stack_shape + layout.output_rows, out.dtype))
        return out
    if call >= recorder.expected_calls.get(path, 0):
        raise ValueError(f"layer {path!r} was called more often than in the capture's "
                         "first pass; SINGD needs the same calls on every trace")
    perturbation = getattr(layer, f"singd_output_{call}")[...]
    getattr(layer, f"singd_input_{call}").value = layout.rows_of_input(x)
    return out + layout.output_of_rows(perturbation).astype(out.dtype)


_CLASS_LOCK = threading.Lock()
_INTERCEPTORS: dict[type, type] = {}  # Flax base class -> its interceptor subclass
_CAPTURING: dict[type, type] = {}  # a layer's class -> the class its captured copy takes


def _interceptor(base: type) -> type:
    """A subclass of the Flax layer ``base`` whose ``__call__`` records the call."""

    def __call__(self, *args, **kwargs):
        return _intercepted_call(self, super(interceptor, self).__call__, args, kwargs)

    interceptor = type(base)(f"SINGDCaptured{base.__name__}", (base,),
                             {"__call__": __call__, "__module__": __name__})
    return interceptor


def _capturing_class(cls: type) -> type:
    """``cls`` with the interceptor of its Flax base class right above that base in
    the method resolution order: ``cls``'s own ``__call__`` (if any) runs first, its
    ``super().__call__`` reaches the interceptor, which calls the Flax layer."""
    with _CLASS_LOCK:
        if cls not in _CAPTURING:
            base = next(b for b in cls.__mro__ if b in SUPPORTED_LAYERS)
            if base not in _INTERCEPTORS:
                _INTERCEPTORS[base] = _interceptor(base)
            interceptor = _INTERCEPTORS[base]
            _CAPTURING[cls] = interceptor if cls is base else type(cls)(
                cls.__name__, (cls, interceptor), {"__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__})
        return _CAPTURING[cls]


def _instrument(modules: dict[str, nnx.Module], recorder: _Recorder,
                perturbations: dict[str, tuple[Array, ...]] | None,
                input_rows: dict[str, list[jax.ShapeDtypeStruct]] | None) -> None:
    """Makes the capture's copies of ``modules`` record into ``recorder``.

    The variables a call writes exist beforehand (NNX transforms carry the values of
    a module's variables in and out, not new ones)."""
    for path, module in modules.items():
        module.__class__ = _capturing_class(type(module))
        module._singd_capture = (recorder.id, path)
        for call, perturbation in enumerate((perturbations or {}).get(path, ())):
            setattr(module, f"singd_output_{call}", OutputPerturbation(perturbation))
        for call, rows in enumerate((input_rows or {}).get(path, ())):
            setattr(module, f"singd_input_{call}", RecordedInput(jnp.zeros(rows.shape,
                                                                           rows.dtype)))


# -- the capture itself ------------------------------------------------------------------
def unsupported_parameter_owners(model: nnx.Module) -> dict[str, list[str]]:
    """Modules other than the supported layers that directly hold ``nnx.Param``s
    (path -> attribute names)."""
    owners: dict[str, list[str]] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, SUPPORTED_LAYERS):
            continue
        names = [k for k, v in vars(module).items() if isinstance(v, nnx.Param)]
        if names:
            owners[path_str(path)] = names
    return owners


_WARNED: set[tuple[int, str]] = set()
_WARNED_LOCK = threading.Lock()


def warn_unsupported(model: nnx.Module) -> None:
    """Warns once per model class and module about parameters no factor covers."""
    for path, names in unsupported_parameter_owners(model).items():
        key = (id(type(model)), path)
        with _WARNED_LOCK:
            if key in _WARNED:
                continue
            _WARNED.add(key)
        warnings.warn(
            f"SINGD: module {path!r} holds parameters {names} but is not an nnx.Linear, "
            "nnx.LinearGeneral, nnx.Einsum or 2-D nnx.Conv; its parameters get no "
            "Kronecker preconditioner (the `other` transform trains them)",
            stacklevel=3,
        )


def _run(loss_fn: Callable, has_aux: bool, args: tuple, kwargs: dict, graphdef: Any,
         params: Any, rest: Any, only: Collection[str] | None,
         calls: dict[str, int] | None, perturbations: dict[str, tuple[Array, ...]] | None,
         input_rows: dict[str, list[jax.ShapeDtypeStruct]] | None):
    # Layers outside `only` (e.g. excluded from SINGD by an override) run untouched: a
    # layer of a kind SINGD cannot precondition is then no error.
    model = nnx.merge(graphdef, params, rest, copy=True)
    modules = {p: m for p, m in supported_modules(model).items()
               if only is None or p in only}
    recorder = _Recorder({p: describe_layer(m, p) for p, m in modules.items()}, calls)
    _instrument(modules, recorder, perturbations, input_rows)
    with _recording(recorder):
        result = loss_fn(model, *args, **kwargs)
    loss, aux = result if has_aux else (result, None)
    return model, modules, recorder, loss, aux


def functional_value_and_grad(loss_fn: Callable, graphdef: Any, params: Any, rest: Any,
                              args: tuple, kwargs: dict, *, has_aux: bool = False,
                              capture: bool = True, only: Collection[str] | None = None):
    """The capture on a split model: ``(value, grads, captures, new_rest)``.

    ``captures`` is empty when ``capture`` is False (a plain ``value_and_grad``, no
    capture work at all). With ``only``, just the layers with those paths are captured.
    """
    if not capture:
        def plain(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            result = loss_fn(m, *args, **kwargs)
            loss, aux = result if has_aux else (result, None)
            return loss, (aux, nnx.state(m, nnx.Not(nnx.Param)))

        (loss, (aux, new_rest)), grads = jax.value_and_grad(plain, has_aux=True)(params, rest)
        return ((loss, aux) if has_aux else loss), grads, {}, new_rest

    found: dict[str, Any] = {}

    def probe(params, rest):
        *_, recorder, _, _ = _run(loss_fn, has_aux, args, kwargs, graphdef, params, rest,
                                  only, None, None, None)
        found["recorder"] = recorder

    def objective(params, perturbations, rest):
        model, modules, recorder, loss, aux = _run(
            loss_fn, has_aux, args, kwargs, graphdef, params, rest, only, calls,
            perturbations, probed.input_rows)
        missing = {p: (n, recorder.calls.get(p, 0)) for p, n in calls.items()
                   if recorder.calls.get(p, 0) != n}
        if missing:
            raise ValueError(f"layers were called fewer times than in the capture's first "
                             f"pass ((expected, seen) per layer: {missing}); SINGD needs the "
                             "same calls on every trace")
        inputs = {p: tuple(getattr(modules[p], f"singd_input_{c}")[...] for c in range(n))
                  for p, n in calls.items()}
        new_rest = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, _CAPTURE_VARIABLES)))
        return loss, (aux, inputs, new_rest)

    try:
        # an abstract pass: which layers run, how often, with which output shapes
        jax.eval_shape(probe, params, rest)
        probed: _Recorder = found["recorder"]
        calls = dict(probed.calls)
        perturbations = {p: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
                         for p, shapes in probed.output_rows.items()}
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        (loss, (aux, inputs, new_rest)), (grads, output_grads) = grad_fn(
            params, perturbations, rest)
    except (jax.errors.UnexpectedTracerError, flax_errors.TraceContextError) as err:
        raise ValueError(
            "SINGD's capture saw a layer called inside a JAX transform of the forward pass "
            "that does not carry NNX module state (jax.vmap, jax.lax.scan, jax.checkpoint, "
            "...): its inputs cannot leave that transform. Call the layers on the whole "
            "batch, use the NNX transforms (nnx.scan, nnx.remat, nnx.vmap), or exclude the "
            "layers with layer_overrides={path: None} (and layers=[...] for raw captures)."
        ) from err
    captures = {p: LayerCapture(inputs[p], output_grads[p], probed.infos[p])
                for p in sorted(inputs)}
    return ((loss, aux) if has_aux else loss), grads, captures, new_rest


def capture_value_and_grad(loss_fn: Callable, model: nnx.Module, *args: Any,
                           has_aux: bool = False, layers: Collection[str] | None = None,
                           **kwargs: Any):
    """Loss, parameter gradients and per-layer captures from one forward/backward pass.

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``) on any unmodified NNX model.
      model: the NNX model; its non-parameter state (batch stats, RNG counters) is
        updated in place like ``nnx.value_and_grad`` does.
      layers: paths of the layers to capture (default: every ``nnx.Linear``,
        ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``); the others run
        untouched.

    Returns:
      ``(value, grads, captures)``: ``value`` is ``loss`` or ``(loss, aux)``, ``grads``
      an ``nnx.State`` of the parameters, ``captures`` maps layer paths to
      :class:`LayerCapture`.
    """
    warn_unsupported(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value, grads, captures, new_rest = functional_value_and_grad(
        loss_fn, graphdef, params, rest, args, kwargs, has_aux=has_aux, capture=True,
        only=layers)
    nnx.update(model, new_rest)
    return value, grads, captures
