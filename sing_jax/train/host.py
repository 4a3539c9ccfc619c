"""Host memory for XLA:CPU steps: let glibc's malloc reuse big blocks."""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes an int


def reuse_host_memory(*, only_on_cpu: bool = True) -> bool:
    """Makes glibc's malloc serve every block from its heap and keep freed memory.

    XLA:CPU takes each run's temporary buffer from ``malloc``. glibc maps a block
    above its mmap threshold (32 MiB at most) afresh and unmaps it when freed, so a
    step whose temporaries exceed 32 MiB page-faults all of them in again on every
    call. After this call (``mallopt``: ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` =
    2 GiB) the block is reused. On the 2-core CPU of ``experiments/bench_singd.py``:
    the small CNN's SGD step 40 -> 26 ms, its diagonal SINGD step at T=10 44 -> 25 ms,
    the dense MLP's at T=10 39 -> 28 ms; steps with smaller temporaries
    (``bench_optimizers.py``'s updates) and the ResNet-20 step of ``bench_train``
    do not change.

    It is process-wide: the process keeps the memory it has freed (its resident
    size stays at its peak), which is what a training process wants. The
    experiment scripts and benchmarks call it at start-up; the library never does
    by itself.

    Args:
      only_on_cpu: change nothing unless jax's default backend is the CPU (this
        initialises jax's backends: call it after ``jax.distributed.initialize``).

    Returns:
      True where it applied (Linux with glibc); False elsewhere, changing nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    if only_on_cpu:
        import jax

        if jax.default_backend() != "cpu":
            return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
