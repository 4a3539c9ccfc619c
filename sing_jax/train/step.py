"""The jitted, data-parallel train and eval steps.

The per-device step is written once. It runs inside a named mapped axis ``'data'``:
each device holds a replicated copy of the :class:`~sing_jax.train.TrainState` and
its shard of the global batch, gradients are averaged with ``lax.pmean`` over
``'data'`` and the metric sums are ``lax.psum``-ed, so the update equals the one a
single device computes on the whole batch (up to float32 summation order).

Two wrappers map it over the devices:

- ``parallel='shard_map'`` (default): ``jax.shard_map`` over a 1-D mesh of every
  device (of every process, in a multi-host run), state replicated (``P()``),
  batch split on its leading axis (``P('data')``), under ``jax.jit``;
- ``parallel='pmap'``: ``jax.pmap`` over the local devices, the batch reshaped to
  ``(devices, per_device, ...)``, the state broadcast in and returned unmapped.

Both donate the incoming state's buffers.

BatchNorm. With ``sync_batch_stats=True`` (default) every ``nnx.BatchNorm`` of the
model normalises with the statistics of the *global* batch (its ``axis_name`` is
set to ``'data'``, one ``pmean`` per layer), so the result does not depend on the
device count. With ``False`` each device normalises with its own shard's
statistics (cheaper, like PyTorch DDP without SyncBatchNorm) and the running
averages are averaged over devices after the step, so the state stays one copy.

Mixed precision: ``compute_dtype=jnp.bfloat16`` runs the forward and backward
pass with bf16 copies of the float32 parameters and inputs; gradients, optimizer
state and master weights stay float32 and the loss is computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sing_jax import singd_value_and_grad_split
from sing_jax.nn.norms import batch_mask
from sing_jax.train.state import TrainState

AXIS = "data"
PARALLEL_MODES = ("shard_map", "pmap")

Batch = Mapping[str, Any]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def data_mesh(devices: Any = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def set_batch_norm_axis(model: nnx.Module, sync_batch_stats: bool = True) -> int:
    """Sets ``axis_name`` of every ``nnx.BatchNorm`` in ``model`` for cross-device sync.

    Returns the number of BatchNorm layers found. Call it before
    :meth:`TrainState.create`: the axis name is part of the static graph.
    """
    count = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            module.axis_name = AXIS if sync_batch_stats else None
            count += 1
    return count


def check_global_batch(global_batch: int, num_devices: int, what: str = "batch_size") -> int:
    """The per-device batch size; a ValueError when it does not divide evenly."""
    if global_batch % num_devices:
        raise ValueError(
            f"{what}={global_batch} does not divide over {num_devices} devices "
            f"({global_batch} % {num_devices} = {global_batch % num_devices}); use a "
            f"multiple of {num_devices}, e.g. {(global_batch // num_devices + 1) * num_devices}."
        )
    return global_batch // num_devices


def _cast_floating(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _match_dtypes(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


def _mean_floating(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, AXIS) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _eval_graphdef(graphdef: nnx.GraphDef, params: Any, model_state: Any) -> nnx.GraphDef:
    # Runs at trace time only: the eval graph differs from the train graph in static flags.
    model = nnx.merge(graphdef, params, model_state)
    model.eval()
    return nnx.graphdef(model)


def _batch_weights(batch: Batch, labels: jax.Array) -> jax.Array:
    if "mask" in batch:
        return jnp.asarray(batch["mask"], jnp.float32)
    return jnp.ones(labels.shape[:1], jnp.float32)


def classification_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                        label_smoothing: float = 0.0, soft_targets: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-shard mean cross-entropy and the (unreduced) sums of loss, correct, count.

    ``soft_targets`` (mixup/cutmix) replace the one-hot labels in the loss; accuracy is
    always measured against ``labels``. The loss is computed in float32, or in the
    logits' dtype when that is wider (float64 logits give a float64 loss, as PyTorch
    computes its loss in the model's dtype).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    num_classes = logits.shape[-1]
    if soft_targets is not None:
        per_example = optax.softmax_cross_entropy(logits, soft_targets)
    elif label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = weights.astype(per_example.dtype)
    count = jnp.sum(weights)
    loss_sum = jnp.sum(per_example * weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
    mean_loss = loss_sum / jnp.maximum(count, 1.0)
    return mean_loss, {"loss_sum": loss_sum, "correct_sum": correct, "count": count}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step.

    Attributes:
      sync_batch_stats: see the module docstring (also call
        :func:`set_batch_norm_axis` on the model with the same value).
      compute_dtype: dtype of the forward/backward pass (``None``: the params' dtype).
      label_smoothing: label smoothing of the cross-entropy.
      grad_norms: also return the per-leaf norms recorded by an optimizer wrapped in
        :func:`sing_jax.with_diagnostics` (``grad_norm/<path>``, ``param_norm/<path>``,
        ``effective_lr/<path>`` and the global norms).
      singd: the optimizer contains :func:`sing_jax.singd`: the gradient pass also
        captures its per-layer curvature statistics
        (``sing_jax.singd_value_and_grad_split``, averaged over the devices; computed
        only on the steps where a layer's preconditioner is refreshed, every ``T`` of
        its updates) and passes them to ``tx.update``. With ``compute_dtype`` the
        captured activations and gradients are in that dtype; the curvature and the
        factors are in SINGD's ``preconditioner_dtype``.
      mixing: ``(num_classes, mixup_alpha, cutmix_alpha, label_smoothing)``: mix each
        device's shard with :func:`sing_jax.data.augment.mix_batch` (a key from
        ``(rng, step, device)``) and train on the soft labels (the ImageNet recipe).
      aux_loss: optional ``(model, images) -> (logits, extra_loss)`` used instead of
        ``model(images)``; ``extra_loss`` is added to the cross-entropy (e.g. the
        LearnableScaler recipe's feature-decay and attention losses).
      masked_batch_stats: the batches may hold padding (``batch['mask'] == 0``, the
        padded last partial batch of an epoch): the model runs inside
        :func:`sing_jax.nn.batch_mask`, so its :class:`sing_jax.nn.BatchNorm` layers
        take their statistics over the real examples only. The loss is always the
        mean over the real examples of the global batch.
    """

    sync_batch_stats: bool = True
    compute_dtype: Any = None
    label_smoothing: float = 0.0
    grad_norms: bool = False
    aux_loss: Callable[[nnx.Module, jax.Array], tuple[jax.Array, jax.Array]] | None = None
    singd: bool = False
    mixing: tuple[int, float, float, float] | None = None
    masked_batch_stats: bool = False


def _singd_gradients(state: TrainState, forward: Callable[[nnx.Module], Any]):
    """Gradients, metric sums, new model state and SINGD curvature of one shard.

    One forward/backward pass also captures the layer statistics
    (:func:`sing_jax.singd_value_and_grad_split`); the gradients and the curvature of
    the layers whose preconditioner is refreshed at this step are averaged over
    ``'data'``, the other layers get zeros.
    """
    (loss, sums), grads, stats, model_state = singd_value_and_grad_split(
        forward, state.graphdef, state.params, state.model_state,
        opt_state=state.opt_state, has_aux=True, axis_name=AXIS)
    del loss  # the metric sums carry it
    return grads, sums, model_state, stats


def per_device_train_step(state: TrainState, batch: Batch, *,
                          tx: optax.GradientTransformation,
                          options: StepOptions = StepOptions()
                          ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's shard; must run inside the ``'data'`` axis."""
    images, labels = batch["image"], batch["label"]
    weights = _batch_weights(batch, labels)
    soft_targets = None
    if options.mixing is not None:
        from sing_jax.data.augment import mix_batch

        num_classes, mixup_alpha, cutmix_alpha, smoothing = options.mixing
        key = jax.random.fold_in(jax.random.fold_in(
            jax.random.wrap_key_data(state.rng), state.step), jax.lax.axis_index(AXIS))
        mixed = mix_batch(key, {"image": images, "label": labels}, num_classes,
                          mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                          label_smoothing=smoothing)
        images, soft_targets = mixed["image"], mixed["soft_label"]
    if options.compute_dtype is not None:
        images = images.astype(options.compute_dtype)
    # The gradients are pmean-ed over devices, so each device's loss is its sum over
    # the global mean count: the mean over the real examples of the global batch even
    # when padding leaves the devices with unequal counts.
    mean_count = jax.lax.pmean(jnp.sum(weights), AXIS)

    def forward(model):
        with batch_mask(weights if options.masked_batch_stats else None):
            if options.aux_loss is None:
                logits = model(images)
            else:
                logits, extra = options.aux_loss(model, images)
        _, sums = classification_sums(logits, labels, weights, options.label_smoothing,
                                      soft_targets)
        divisor = jnp.where(mean_count > 0, mean_count, 1.0).astype(sums["loss_sum"].dtype)
        loss = sums["loss_sum"] / divisor
        if options.aux_loss is not None:
            loss = loss + extra.astype(jnp.float32)
        return loss, sums

    def loss_fn(params):
        if options.compute_dtype is not None:
            params = _cast_floating(params, options.compute_dtype)
        model = nnx.merge(state.graphdef, params, state.model_state)
        loss, sums = forward(model)
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss, (sums, new_model_state)

    extra_args = {}
    if options.singd:
        def singd_forward(model):
            if options.compute_dtype is not None:  # inside the gradient: float32 grads
                nnx.update(model, _cast_floating(nnx.state(model, nnx.Param),
                                                 options.compute_dtype))
            return forward(model)

        grads, sums, model_state, stats = _singd_gradients(state, singd_forward)
        extra_args["singd_stats"] = stats
    else:
        grads, (sums, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
    model_state = _match_dtypes(model_state, state.model_state)
    if not options.sync_batch_stats:
        model_state = _mean_floating(model_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
    params = optax.apply_updates(state.params, updates)
    sums = jax.lax.psum(sums, AXIS)
    metrics = {"loss": sums["loss_sum"] / jnp.maximum(sums["count"], 1.0),
               "accuracy": sums["correct_sum"] / jnp.maximum(sums["count"], 1.0)}
    if options.grad_norms:
        from sing_jax import diagnostics_metrics

        metrics.update({k: v for k, v in diagnostics_metrics(opt_state).items()
                        if k != "learning_rate"})
    epoch_metrics = {k: (state.epoch_metrics[k] + sums[k]).astype(state.epoch_metrics[k].dtype)
                     for k in state.epoch_metrics}
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, epoch_metrics=epoch_metrics)
    return new_state, metrics


def per_device_eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums of loss, correct predictions and examples over the global batch (eval mode).

    Examples with ``batch['mask'] == 0`` (padding of a last partial batch) are ignored.
    """
    graphdef = _eval_graphdef(state.graphdef, state.params, state.model_state)
    model = nnx.merge(graphdef, state.params, state.model_state)
    labels = batch["label"]
    _, sums = classification_sums(model(batch["image"]), labels, _batch_weights(batch, labels))
    return jax.lax.psum(sums, AXIS)


class ParallelStep:
    """A per-device function mapped over the devices with shard_map or pmap.

    Call it with the (unsharded or replicated) state and a *global* batch of host
    arrays or jax arrays: it checks the batch size, places the shards and returns
    replicated outputs. ``host_batch`` in a multi-process run is the process's part.
    """

    def __init__(self, fn: Callable[..., Any], *, parallel: str = "shard_map",
                 mesh: jax.sharding.Mesh | None = None, donate_state: bool = True,
                 returns_state: bool = True):
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={parallel!r}; expected one of {PARALLEL_MODES}")
        self.parallel = parallel
        explicit_mesh = mesh is not None
        self.mesh = data_mesh() if mesh is None else mesh
        self.returns_state = returns_state
        donate = (0,) if donate_state else ()
        if parallel == "shard_map":
            out_specs = (P(), P()) if returns_state else P()
            # check_vma=False: without it, the gradient of a replicated input is
            # psum-ed implicitly, and the per-device code would differ from pmap's.
            mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                   out_specs=out_specs, check_vma=False)
            self._fn = jax.jit(mapped, donate_argnums=donate)
            self.num_shards = self.mesh.devices.size
        else:
            out_axes = (None, None) if returns_state else None
            # An explicit mesh picks the devices; by default pmap takes every local one.
            devices = list(self.mesh.devices.flat) if explicit_mesh else None
            self._fn = jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=out_axes,
                                donate_argnums=donate, devices=devices)
            self.num_shards = len(devices) if devices else jax.local_device_count()
        if parallel == "shard_map":
            self.num_local_shards = len(self.mesh.local_devices)
        elif devices:
            self.num_local_shards = sum(d.process_index == jax.process_index() for d in devices)
        else:
            self.num_local_shards = jax.local_device_count()

    def place_state(self, state: TrainState) -> TrainState:
        """Replicates the state over the mesh (shard_map) or leaves it as is (pmap)."""
        if self.parallel == "pmap":
            return state
        sharding = NamedSharding(self.mesh, P())
        if jax.process_count() == 1:
            return jax.device_put(state, sharding)

        def put(x):
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                                impl=jax.random.key_impl(x))
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))

        return jax.tree.map(put, state)

    def place_batch(self, batch: Batch) -> Batch:
        """Shards a process-local batch over the devices.

        ``batch`` leaves are ``(local_batch, ...)``, or ``(local_devices, per_device,
        ...)`` as :mod:`sing_jax.data` yields them (recognised by 2-D labels).
        """
        batch = dict(batch)
        if np.ndim(batch["label"]) == 2:
            devices = int(np.shape(batch["label"])[0])
            if devices != self.num_local_shards:
                raise ValueError(f"the batch has a leading device axis of {devices} but the "
                                 f"step runs on {self.num_local_shards} local devices")
            batch = {k: np.reshape(np.asarray(v), (-1,) + np.shape(v)[2:])
                     for k, v in batch.items()}
        local = int(np.shape(batch["label"])[0])
        check_global_batch(local, self.num_local_shards,
                           "batch size per process" if jax.process_count() > 1
                           else "batch_size")
        if self.parallel == "pmap":
            return {k: np.reshape(np.asarray(v), (self.num_local_shards, -1) + np.shape(v)[1:])
                    for k, v in batch.items()}
        sharding = NamedSharding(self.mesh, P(AXIS))
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()}

    def __call__(self, state: TrainState, batch: Batch) -> Any:
        return self._fn(state, self.place_batch(batch))


def make_train_step(tx: optax.GradientTransformation, *, parallel: str = "shard_map",
                    mesh: jax.sharding.Mesh | None = None,
                    options: StepOptions = StepOptions(), donate: bool = True) -> ParallelStep:
    """``train_step(state, batch) -> (state, metrics)``, jitted and data parallel.

    Args:
      tx: the optimizer the state was created with.
      parallel: ``'shard_map'`` (default) or ``'pmap'``.
      mesh: the 1-D ``'data'`` mesh (default: every device).
      options: :class:`StepOptions`.
      donate: donate the incoming state's buffers (do not reuse it after the call).
    """
    fn = functools.partial(per_device_train_step, tx=tx, options=options)
    return ParallelStep(fn, parallel=parallel, mesh=mesh, donate_state=donate)


def make_eval_step(*, parallel: str = "shard_map",
                   mesh: jax.sharding.Mesh | None = None) -> ParallelStep:
    """``eval_step(state, batch) -> {'loss_sum', 'correct_sum', 'count'}`` (global sums)."""
    return ParallelStep(per_device_eval_step, parallel=parallel, mesh=mesh,
                        donate_state=False, returns_state=False)


def to_host(tree: Any) -> Any:
    """Fetches replicated (possibly multi-process) arrays as NumPy values."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)
