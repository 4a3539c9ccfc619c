"""The training state: one pure pytree that jit, shard_map/pmap and orbax all accept.

A Flax NNX model is split into its static graph definition and three kinds of
arrays: the trainable ``nnx.Param`` leaves, everything else the model carries
(BatchNorm running statistics, dropout RNG counters), and the optimizer state.
:class:`TrainState` holds those arrays as plain nested dicts (``State.to_pure_dict``),
so a checkpoint is readable without the model class, plus the step counter, an RNG
key and the running sums of the current epoch's training metrics (so a run resumed
mid-epoch reports the same epoch averages). The data iterator's position is saved
next to it by :class:`~sing_jax.train.Checkpointer` (grain's checkpoint handler).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Running sums of the training metrics of the current epoch, reset at each epoch start.
EPOCH_METRIC_KEYS = ("loss_sum", "correct_sum", "count")


def zero_epoch_metrics() -> dict[str, jax.Array]:
    """Fresh running sums of the epoch's training metrics (float32 scalars)."""
    return {k: jnp.zeros((), jnp.float32) for k in EPOCH_METRIC_KEYS}


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue, as a pytree.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: trainable parameters, a nested dict of arrays (``nnx.Param`` leaves).
      model_state: the model's other variables (BatchNorm statistics, RNG state).
      opt_state: the optax optimizer state for ``params``.
      rng: raw key data (``jax.random.key_data``) of the training RNG; the step's
        key is ``fold_in(rng, step)``, so a resumed run draws the same keys.
      epoch_metrics: running sums of the current epoch's loss, correct count and
        example count.
      graphdef: the NNX graph definition of the model in training mode (static).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    epoch_metrics: dict[str, jax.Array]
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation,
               rng: jax.Array | int = 0) -> TrainState:
        """Splits ``model`` and initialises ``tx`` on its parameters.

        Args:
          model: an NNX module; it is put in training mode (``model.train()``).
          tx: the optimizer.
          rng: a PRNG key (typed or raw) or an int seed.
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"TrainState.create: model must be an nnx.Module, got "
                            f"{type(model).__name__}")
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError("TrainState.create: tx must be an optax.GradientTransformation, "
                            f"got {type(tx).__name__}")
        model.train()
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        model_state = nnx.to_pure_dict(model_state)
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                   opt_state=tx.init(params), rng=jnp.asarray(rng),
                   epoch_metrics=zero_epoch_metrics(), graphdef=graphdef)

    def model(self, train: bool = False) -> nnx.Module:
        """The NNX model with these parameters, in training or evaluation mode."""
        model = nnx.merge(self.graphdef, self.params, self.model_state)
        if train:
            model.train()
        else:
            model.eval()
        return model

    def arrays(self) -> dict[str, Any]:
        """The array part as a plain dict (what a checkpoint stores).

        Typed PRNG keys (the RNG streams of dropout layers) are stored as raw key data.
        """
        return {"step": self.step, "params": self.params,
                "model_state": jax.tree.map(_key_data, self.model_state),
                "opt_state": jax.tree.map(_key_data, self.opt_state), "rng": self.rng,
                "epoch_metrics": self.epoch_metrics}

    def with_arrays(self, arrays: dict[str, Any]) -> TrainState:
        """This state with its array part replaced by ``arrays`` (from :meth:`arrays`)."""
        arrays = dict(arrays)
        for name in ("model_state", "opt_state"):
            arrays[name] = jax.tree.map(_like_key, arrays[name], getattr(self, name))
        return self.replace(**arrays)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _like_key(x: Any, template: Any) -> Any:
    if _is_key(template) and not _is_key(x):
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(template))
    return x


def num_params(state: TrainState) -> int:
    """Number of trainable scalars."""
    return int(sum(x.size for x in jax.tree.leaves(state.params)))
