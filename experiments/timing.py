"""Timing helpers shared by the benchmark scripts.

Every benchmark here compares our step with a baseline measured in the same
process. :func:`interleaved_medians` lets the calls take turns, round by round,
so that noise on this shared machine hits all of them alike, and reports medians.
:func:`copy_bandwidth` gives the unit of the memory-traffic floors the scripts print,
:func:`update_floor_bytes` their numerator.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def seconds_of(call: Callable[[], Any]) -> float:
    """Wall-clock seconds of one ``call()``; the call must block until its work is done."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_medians(calls: Mapping[str, Callable[[], Any]], repeats: int,
                        warmup_rounds: int = 1, period: int = 1) -> dict[str, float]:
    """Median seconds of each blocking call, the calls taking turns.

    ``warmup_rounds`` untimed rounds (compilation, first-touch page faults) come
    first; then ``repeats`` rounds call each entry once, in an order shuffled per
    round (seeded, so runs repeat), so that no call always runs right after the
    same other one: PyTorch's worker threads keep spinning for a while after its
    step, which slowed the JAX step always timed next (bench_singd's MLP, diagonal:
    3.8 ms without PyTorch in the run, 4.4 ms right after it).

    ``period > 1`` is for calls whose cost repeats with that period (an optimizer
    step with Lookahead every ``period`` steps): the timed calls are grouped by
    their position in the period and the result is the mean of the positions'
    medians, the average cost of a call. A plain median would land between the
    cheap and the dear positions and report neither. ``repeats`` must then be a
    multiple of ``period``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if period < 1 or repeats % period:
        raise ValueError(f"period must be >= 1 and divide repeats ({repeats}), got {period}")
    for _ in range(warmup_rounds):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, shuffler = list(calls), random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(seconds_of(calls[name]))
    return {name: statistics.fmean(statistics.median(t[position::period])
                                   for position in range(period))
            for name, t in times.items()}


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def update_floor_bytes(params: Any, opt_state: Any, lookahead_every: int | None = None) -> float:
    """Bytes an optimizer step must move at the least, per step.

    It reads the parameters, the gradients (the parameters' shapes and dtypes) and
    every state array once, and writes the parameters and the state arrays once:
    ``2 params + grads + 2 state``. The slow weights of a ``sing_jax.lookahead``
    (its ``LookaheadState.slow``) are the exception: they are read on a synchronising
    step and written on the next, so they move ``2 / lookahead_every`` of their bytes
    per step (``lookahead_every`` is required when the state holds such weights).

    A per-channel reduction that must finish before its leaf's elementwise update
    (SING's gradient statistics, the RT steps' inner products) reads the leaf once
    more; that second read is not counted: a leaf of these models (at most 9.4 MB
    of float32) fits an accelerator's last-level cache, so it need not come from
    device memory again.
    """
    from sing_jax import LookaheadState

    is_lookahead = lambda x: isinstance(x, LookaheadState)  # noqa: E731
    slow_bytes = 0
    rest = []
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_lookahead):
        if is_lookahead(leaf):
            slow_bytes += tree_bytes(leaf.slow)
            rest.append(leaf.count)
        else:
            rest.append(leaf)
    if slow_bytes and not lookahead_every:
        raise ValueError("update_floor_bytes: the state holds Lookahead slow weights; pass "
                         f"lookahead_every (the sync period), got {lookahead_every!r}")
    slow_share = 2 * slow_bytes / lookahead_every if slow_bytes else 0.0
    return 3 * tree_bytes(params) + 2 * tree_bytes(rest) + slow_share


def copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Bytes per second of a jitted in-place read + write of a large float32 array.

    Donated, so the output reuses the input's buffer as a donated optimizer step
    does: a copy into fresh memory would mostly time page faults.
    """
    x = jnp.ones(num_bytes // 4, jnp.float32)
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = scale(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = scale(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / statistics.median(times)
