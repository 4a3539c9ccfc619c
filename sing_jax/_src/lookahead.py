"""Lookahead as an ordinary gradient transformation."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sing_jax._src import hyperparams


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    ``slow`` holds the slow weights, except right after a synchronisation
    (``sync_pending``), when the slow weights are the current parameters and are
    copied in at the next update; :func:`lookahead_slow_weights` resolves both.
    """

    count: chex.Array  # int32, steps since the last synchronisation
    sync_pending: chex.Array  # bool: the last step synchronised
    slow: optax.Params


def lookahead(sync_period: int = 5, alpha: float = 0.5) -> optax.GradientTransformation:
    r"""Lookahead (SING step 7) on top of whatever updates come in.

    With fast parameters :math:`p_t + u_t` after the incoming update, every
    ``sync_period``-th step

    .. math::
      p \leftarrow \alpha\, (p_t + u_t) + (1 - \alpha)\, p_{\text{slow}}, \qquad
      p_{\text{slow}} \leftarrow p

    and on the other steps the update passes through unchanged. The slow copy
    starts equal to the initial parameters and lives in this transform's state;
    the parameters themselves stay a plain pytree, so unlike
    ``optax.lookahead`` (which needs ``LookaheadParams``) this composes as the last
    element of an ``optax.chain`` and inside ``nnx.Optimizer``. Put it last: it
    needs the final (learning-rate-scaled) updates. The inner optimizer's moments
    are not reset at a sync.

    After a sync the new slow weights *are* the parameters that the update
    produces, so instead of writing them from the update (which makes XLA
    compute the whole upstream chain twice), the state marks the sync as
    pending and copies the parameters in at the start of the next update. This
    assumes the parameters given to the next update are the result of applying
    this one (``optax.apply_updates``), which is how optimizers are used.

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
        return LookaheadState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.bool_), slow)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        slow = lookahead_slow_weights(state, params)
        count = state.count + 1
        sync = count >= sync_period
        # On a sync the new parameters are alpha (p + u) + (1 - alpha) slow, so the
        # update is that minus p. A select on the scalar ``sync`` rather than
        # ``u + pull * (s - p - u)`` with ``pull = 0`` between syncs: XLA:CPU's loop then
        # reads the slow weights only on syncs (bench_optimizers, SING on ResNet-18:
        # 12.5-12.9 -> 11.8-12.2 ms). Written as the new parameters minus p rather than
        # as u + (1 - alpha)(s - p - u): the steps between syncs then took 10.0 instead of
        # 10.8 ms (same values up to rounding; the compiled loops differ).
        new_updates = jax.tree.map(
            lambda u, p, s: jnp.where(sync, alpha * (p + u) + (1 - alpha) * s - p,
                                      u).astype(u.dtype),
            updates, params, slow)
        return new_updates, LookaheadState(jnp.where(sync, 0, count).astype(jnp.int32),
                                           sync, slow)

    return optax.GradientTransformation(init_fn, update_fn)


def lookahead_slow_weights(state: LookaheadState, params: optax.Params) -> optax.Params:
    """The slow weights of a :func:`lookahead` state, given the current parameters.

    A ``lax.cond`` rather than a ``where``: between syncs the slow weights are
    passed through instead of being read and written again on every step.
    """
    return jax.lax.cond(
        state.sync_pending,
        lambda: jax.tree.map(lambda p, s: jnp.asarray(p).astype(s.dtype), params, state.slow),
        lambda: state.slow)
