"""Learning-rate schedules of the seeds, as optax schedules (``step -> value``).

Every function here returns a plain ``optax.Schedule``: pass it wherever a
learning rate is accepted (``optax.adamw(learning_rate=...)``, ``sing_jax``'s
optimizers, ``optax.scale_by_learning_rate``). The step count is the one optax
passes, the number of updates already applied (0 for the first update).

What optax already has is reused, not rewritten:

* SING's warmup + cosine is ``optax.warmup_cosine_decay_schedule``;
* SING's warmup + constant + cosine is ``optax.join_schedules`` over
  ``optax.linear_schedule``, ``optax.constant_schedule`` and
  ``optax.cosine_decay_schedule``;
* seed 001's x0.1 at epochs 135/225/315 is ``optax.piecewise_constant_schedule``;
* PyTorch's ``CosineAnnealingWarmRestarts`` is ``optax.join_schedules`` over
  ``optax.cosine_decay_schedule`` pieces of growing length.

Only seed 004's ``custom`` schedule (spec section 7) is new math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

# Seed 001's protocol: 405 epochs, the learning rate times 0.1 at these epochs.
SPHERICAL_BENCHMARK_EPOCHS = 405
SPHERICAL_BENCHMARK_DECAY_EPOCHS = (135, 225, 315)


def _check_fraction(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from e
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def warmup_cosine(peak_value: float, total_steps: int, warmup_fraction: float = 0.05, *,
                  init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
    r"""SING's first schedule: linear warmup, then cosine decay to ``end_value``.

    With :math:`W = \mathrm{round}(\text{warmup\_fraction}\cdot T)`:

    .. math::

      \eta(t) = \begin{cases}
        \eta_0 + (\eta_{peak} - \eta_0)\, t / W & t < W \\
        \eta_{end} + \tfrac12 (\eta_{peak} - \eta_{end})
          \left(1 + \cos\frac{\pi (t - W)}{T - W}\right) & W \le t \le T
      \end{cases}

    and :math:`\eta_{end}` after :math:`T`. This is
    ``optax.warmup_cosine_decay_schedule(init_value, peak_value, W, T, end_value)``.

    Args:
      peak_value: the learning rate reached at the end of the warmup.
      total_steps: ``T``, the number of updates of the whole run (warmup included).
      warmup_fraction: the share of ``total_steps`` spent warming up, in [0, 1].
      init_value: the learning rate of the first update.
      end_value: the learning rate at ``total_steps``.

    Returns:
      An optax schedule.

    Example::

      >>> s = warmup_cosine(1e-2, total_steps=1000)   # 50 warmup steps
      >>> round(float(s(25)), 6), round(float(s(50)), 6), round(float(s(1000)), 6)
      (0.005, 0.01, 0.0)
    """
    total_steps = _check_positive_int("total_steps", total_steps)
    warmup_fraction = _check_fraction("warmup_fraction", warmup_fraction)
    warmup_steps = int(round(warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=end_value)


def warmup_constant_cosine(peak_value: float, total_steps: int,
                           warmup_fraction: float = 0.05, constant_fraction: float = 0.6, *,
                           init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
    r"""SING's second schedule: linear warmup, a constant plateau, then cosine decay.

    With :math:`W = \mathrm{round}(f_w T)` and :math:`P = \mathrm{round}((f_w + f_c) T)`:
    linear from :math:`\eta_0` to :math:`\eta_{peak}` on :math:`[0, W)`, constant
    :math:`\eta_{peak}` on :math:`[W, P)`, and on :math:`[P, T]`

    .. math::

      \eta(t) = \eta_{end} + \tfrac12(\eta_{peak} - \eta_{end})
                \left(1 + \cos\frac{\pi (t - P)}{T - P}\right),

    :math:`\eta_{end}` after :math:`T`. Built with ``optax.join_schedules`` over
    ``optax.linear_schedule``, ``optax.constant_schedule`` and
    ``optax.cosine_decay_schedule``.

    Args:
      peak_value: the plateau learning rate.
      total_steps: ``T``, updates in the whole run.
      warmup_fraction: ``f_w`` in [0, 1] (SING advises 0.05).
      constant_fraction: ``f_c`` in [0, 1] (SING advises 0.6); ``f_w + f_c <= 1``.
      init_value: the learning rate of the first update.
      end_value: the learning rate at ``total_steps``.

    Returns:
      An optax schedule.
    """
    total_steps = _check_positive_int("total_steps", total_steps)
    warmup_fraction = _check_fraction("warmup_fraction", warmup_fraction)
    constant_fraction = _check_fraction("constant_fraction", constant_fraction)
    if warmup_fraction + constant_fraction > 1.0 + 1e-12:
        raise ValueError(
            "warmup_fraction + constant_fraction must be <= 1, got "
            f"{warmup_fraction} + {constant_fraction} = {warmup_fraction + constant_fraction}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    plateau_end = min(total_steps, int(round((warmup_fraction + constant_fraction) * total_steps)))
    decay_steps = total_steps - plateau_end
    alpha = end_value / peak_value if peak_value != 0 else 0.0
    pieces = [
        optax.linear_schedule(init_value, peak_value, max(warmup_steps, 1)),
        optax.constant_schedule(peak_value),
        # A zero-length decay would divide by zero inside optax; one step is its limit.
        optax.cosine_decay_schedule(peak_value, max(decay_steps, 1), alpha=alpha),
        # From T on: end_value, also when the plateau fills the run (no decay phase).
        optax.constant_schedule(end_value),
    ]
    return optax.join_schedules(pieces, [warmup_steps, plateau_end, total_steps])


def step_decay_at_epochs(init_value: float, steps_per_epoch: int,
                         decay_epochs: Sequence[int] = SPHERICAL_BENCHMARK_DECAY_EPOCHS,
                         factor: float = 0.1) -> Schedule:
    r"""Multiply the learning rate by ``factor`` at the start of each listed epoch.

    .. math:: \eta(t) = \eta_0 \cdot \text{factor}^{\#\{e_i : t \ge e_i \cdot S\}}

    with ``S = steps_per_epoch``: the first update of epoch ``e_i`` (0-based) already
    uses the reduced value, as PyTorch's ``MultiStepLR`` stepped once per epoch.
    The defaults are seed 001's protocol (x0.1 at epochs 135, 225, 315 of 405).
    This is ``optax.piecewise_constant_schedule`` with boundaries in steps.

    Args:
      init_value: the learning rate before the first decay.
      steps_per_epoch: updates per epoch.
      decay_epochs: increasing epochs at which the decay applies.
      factor: the multiplier, >= 0.

    Returns:
      An optax schedule.
    """
    steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
    factor = _check_nonnegative("factor", factor)
    epochs = [int(e) for e in decay_epochs]
    if any(e < 0 for e in epochs) or sorted(set(epochs)) != epochs:
        raise ValueError(
            "decay_epochs must be strictly increasing non-negative ints, got "
            f"{tuple(decay_epochs)}")
    return optax.piecewise_constant_schedule(
        init_value, {e * steps_per_epoch: factor for e in epochs})


def damped_cosine(peak_value: float, total_epochs: int, steps_per_epoch: int = 1, *,
                  factor: float = 0.8, threshold: float = 0.5, ramp_end: float = 0.66,
                  per_step: bool = False) -> Schedule:
    r"""Seed 004's ``custom`` schedule (spec section 7): a damped cosine, a ramp, a cosine.

    With :math:`c(e) = (1 + \cos(\pi e / E))/2`, :math:`e_1 = \text{threshold}\cdot E`
    and :math:`e_2 = \lfloor \text{ramp\_end} \cdot E \rfloor`:

    .. math::

      \frac{\eta(e)}{\eta_{peak}} = \begin{cases}
        f\, c(e) & e < e_1 \\
        f\, c(e_1) + \left(c(e_2) - f\, c(e_1)\right)\frac{e - e_1}{e_2 - e_1}
          & e_1 \le e < e_2 \\
        c(e) & e \ge e_2
      \end{cases}

    The reference steps it once per epoch: ``e = floor(t / steps_per_epoch)``
    (``per_step=False``). With ``per_step=True`` the epoch is fractional,
    ``e = t / steps_per_epoch``, which gives the same curve without the stairs.

    Args:
      peak_value: the base learning rate (``--lr``).
      total_epochs: ``E`` (``--epochs``).
      steps_per_epoch: updates per epoch; 1 makes the step count an epoch count.
      factor: ``f`` (``--epoch-factor``, 0.8), >= 0.
      threshold: the fraction of ``E`` where the damping ends (``--epoch-threshold``,
        0.5), in [0, 1].
      ramp_end: the fraction of ``E`` where the ramp reaches the cosine (0.66 in
        the reference), in [0, 1].
      per_step: fractional epochs instead of whole ones.

    Returns:
      An optax schedule.
    """
    total_epochs = _check_positive_int("total_epochs", total_epochs)
    steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
    factor = _check_nonnegative("factor", factor)
    threshold = _check_fraction("threshold", threshold)
    ramp_end = _check_fraction("ramp_end", ramp_end)
    e1 = threshold * total_epochs
    e2 = float(math.floor(ramp_end * total_epochs))

    def cosine(e):
        return 0.5 * (1.0 + jnp.cos(jnp.pi * e / total_epochs))

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        epoch = count / steps_per_epoch
        if not per_step:
            epoch = jnp.floor(epoch)
        start = factor * cosine(e1)
        # Where e2 <= e1 the ramp is empty; the guard only avoids 0/0 there.
        ramp = start + (cosine(e2) - start) * (epoch - e1) / max(e2 - e1, 1e-12)
        value = jnp.where(epoch < e1, factor * cosine(epoch),
                          jnp.where(epoch < e2, ramp, cosine(epoch)))
        return peak_value * value

    return schedule


def cosine_warm_restarts(init_value: float, first_period: int, period_multiplier: int = 1,
                         min_value: float = 0.0) -> Schedule:
    r"""Cosine annealing with warm restarts (SGDR; PyTorch's ``CosineAnnealingWarmRestarts``).

    Cycle :math:`i` lasts :math:`T_i = T_0 m^i` steps; inside it, at step :math:`\tau`
    since its start,

    .. math:: \eta = \eta_{min} + \tfrac12(\eta_0 - \eta_{min})(1 + \cos(\pi\tau / T_i)).

    optax's ``sgdr_schedule`` wants every cycle listed; this builds them from
    ``(T_0, m)``: with ``m == 1`` it is ``optax.cosine_decay_schedule`` evaluated at
    ``t mod T_0``; with ``m > 1`` it joins ``optax.cosine_decay_schedule`` pieces with
    ``optax.join_schedules``, enough of them to cover :math:`2^{31}` steps.

    Args:
      init_value: :math:`\eta_0`, the value at each restart.
      first_period: :math:`T_0` in steps.
      period_multiplier: :math:`m`, a positive int (PyTorch's ``T_mult``).
      min_value: :math:`\eta_{min}`.

    Returns:
      An optax schedule.
    """
    first_period = _check_positive_int("first_period", first_period)
    period_multiplier = _check_positive_int("period_multiplier", period_multiplier)
    alpha = min_value / init_value if init_value != 0 else 0.0
    if period_multiplier == 1:
        cycle = optax.cosine_decay_schedule(init_value, first_period, alpha=alpha)
        return lambda count: cycle(jnp.asarray(count) % first_period)
    periods, covered = [], 0
    while covered < 2**31:
        periods.append(first_period * period_multiplier ** len(periods))
        covered += periods[-1]
    pieces = [optax.cosine_decay_schedule(init_value, p, alpha=alpha) for p in periods]
    return optax.join_schedules(pieces, [int(b) for b in np.cumsum(periods)[:-1]])


def epochwise(schedule_of_epoch: Schedule, steps_per_epoch: int) -> Schedule:
    """Turns a schedule indexed by epoch into one indexed by step, constant in each epoch.

    This is what a PyTorch scheduler stepped once per epoch does:
    ``value(t) = schedule_of_epoch(floor(t / steps_per_epoch))``. For example
    ``epochwise(optax.exponential_decay(lr, 1, 0.9), spe)`` is ``ExponentialLR(gamma=0.9)``
    stepped per epoch.
    """
    steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)

    def schedule(count):
        return schedule_of_epoch(jnp.asarray(count) // steps_per_epoch)

    return schedule
