r"""Monte Carlo dropout (Gal & Ghahramani 2016; seed 003).

Dropout stays active at prediction time while every other layer is in eval
mode (BatchNorm uses its running averages); ``N`` stochastic passes give

.. math::

  \bar p = \frac1N \sum_{i=1}^N f(x; m_i), \qquad
  s = \sqrt{\frac{1}{N - \mathrm{ddof}} \sum_{i=1}^N (f(x; m_i) - \bar p)^2}

with ``f`` the class probabilities (softmax of the logits) and ``m_i``
independent dropout masks. The ``N`` passes are one ``jax.vmap``-ed, jitted call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sing_jax.nn.norms import module_paths


def mc_dropout_predict(model: nnx.Module, x: jax.Array, num_samples: int, *,
                       key: jax.Array | int,
                       transform: Callable[[jax.Array], jax.Array] | None = jax.nn.softmax,
                       ddof: int = 0) -> tuple[jax.Array, jax.Array]:
    """Mean and standard deviation of ``transform(model(x))`` over ``num_samples`` dropout masks.

    The model is not changed (its state is split and merged inside the
    vectorised function; every ``nnx.Dropout`` gets a fresh stream per sample).

    Args:
      model: an NNX model with at least one ``nnx.Dropout``.
      x: the input batch.
      num_samples: number of stochastic passes ``N``.
      key: PRNG key (or int seed) of the dropout masks.
      transform: applied to each pass's output; softmax gives class
        probabilities, ``None`` keeps the raw outputs.
      ddof: delta degrees of freedom of the std (0: population std; 1: unbiased
        variance, as PyTorch's ``std``).

    Returns:
      ``(mean, std)``, each shaped like one pass's output.

    Raises:
      ValueError: ``num_samples <= ddof`` or a model without ``nnx.Dropout``.
    """
    if not isinstance(num_samples, int) or num_samples <= max(ddof, 0):
        raise ValueError(
            f"mc_dropout_predict: num_samples={num_samples!r}; expected an int > ddof={ddof}."
        )
    dropout_paths = [path for path, _ in module_paths(model, nnx.Dropout)]
    if not dropout_paths:
        raise ValueError(
            f"mc_dropout_predict: {type(model).__name__} has no nnx.Dropout; MC dropout "
            "needs dropout layers (build the model with dropout_rate > 0)."
        )
    if isinstance(key, int):
        key = jax.random.key(key)
    graphdef, state = nnx.split(model)
    run = _compiled_passes(graphdef, transform, ddof)
    return run(state, x, jax.random.split(key, num_samples))


@functools.lru_cache(maxsize=32)
def _compiled_passes(graphdef: Any, transform: Callable[[jax.Array], jax.Array] | None,
                     ddof: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted, vmapped passes for one model structure (cached: no retrace per call)."""
    apply = transform if transform is not None else (lambda y: y)

    def one_pass(state, x, sample_key):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        for index, (_, dropout) in enumerate(module_paths(copy, nnx.Dropout)):
            dropout.deterministic = False
            dropout.rngs = nnx.RngStream(jax.random.fold_in(sample_key, index),
                                         tag="dropout")
        return apply(copy(x))

    @jax.jit
    def run(state, x, keys):
        outputs = jax.vmap(one_pass, in_axes=(None, None, 0))(state, x, keys)
        outputs = outputs.astype(jnp.float32)
        return jnp.mean(outputs, axis=0), jnp.std(outputs, axis=0, ddof=ddof)

    return run
