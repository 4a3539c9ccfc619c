"""Lookahead as an ordinary gradient transformation."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sing_jax._src import hyperparams


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`."""

    count: chex.Array  # int32, steps since the last synchronisation
    slow: optax.Params  # the slow weights


def lookahead(sync_period: int = 5, alpha: float = 0.5) -> optax.GradientTransformation:
    r"""Lookahead (SING step 7) on top of whatever updates come in.

    With fast parameters :math:`p_t + u_t` after the incoming update, every
    ``sync_period``-th step

    .. math::
      p_{\text{slow}} \leftarrow \alpha\, (p_t + u_t) + (1 - \alpha)\, p_{\text{slow}},
      \qquad p \leftarrow p_{\text{slow}}

    and on the other steps the update passes through unchanged. The slow copy
    starts equal to the initial parameters and lives in this transform's state
    (``state.slow``); the parameters themselves stay a plain pytree, so unlike
    ``optax.lookahead`` (which needs ``LookaheadParams``, and which ``nnx.Optimizer``
    cannot feed) this composes as the last element of an ``optax.chain`` and inside
    ``nnx.Optimizer``. Put it last: it needs the final (learning-rate-scaled)
    updates. The inner optimizer's moments are not reset at a sync.

    Args:
      sync_period: steps between synchronisations (``k``), an integer >= 1.
      alpha: weight of the fast weights at a sync, in ``[0, 1]`` (``optax.lookahead``'s
        ``slow_step_size``).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`LookaheadState`.
    """
    hyperparams.check_positive_int("lookahead", "sync_period", sync_period)
    hyperparams.check_unit_interval("lookahead", "alpha", alpha, include_one=True)

    def init_fn(params):
        slow = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return LookaheadState(jnp.zeros([], jnp.int32), slow)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        count = state.count + 1
        sync = count >= sync_period

        def synced(p, u, s):
            return alpha * (p + u) + (1 - alpha) * s

        new_slow = jax.tree.map(
            lambda p, u, s: jnp.where(sync, synced(p, u, s), s).astype(s.dtype),
            params, updates, state.slow)
        new_updates = jax.tree.map(
            lambda p, u, s: jnp.where(sync, s - p, u).astype(u.dtype),
            params, updates, new_slow)
        return new_updates, LookaheadState(jnp.where(sync, 0, count).astype(jnp.int32),
                                           new_slow)

    return optax.GradientTransformation(init_fn, update_fn)
