"""Host tuning for XLA:CPU runs of the experiment scripts (docs/xla_cpu.md).

Two process-wide settings that only matter on a CPU backend, kept out of the
library: the YNNPACK flag of the benchmarks that race PyTorch on CPU, and glibc
malloc settings that keep XLA:CPU's large per-step temporaries in the heap.

jaxlib 0.10 runs convolutions through YNNPACK by default, slower than its Eigen
kernels for small CNNs, while YNNPACK's matrix products are the faster ones for thin
products. These scripts ask for YNNPACK's products one call at a time and its
reductions, and give convolutions to Eigen. Nothing here imports jax: the flag only
counts if it is set before jax is.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "individual_dot,reduce"


def with_cpu_flag(xla_flags: str, jaxlib_version: str) -> str:
    """``xla_flags`` with ``YNN_FLAG=YNN_VALUE`` added, unless it already names the flag
    (the user's choice wins) or the jaxlib is not 0.10 (the flag and its values are
    0.10's, and an unknown flag aborts jax at start-up)."""
    if YNN_FLAG in xla_flags or not jaxlib_version.startswith("0.10."):
        return xla_flags
    return f"{xla_flags} {YNN_FLAG}={YNN_VALUE}".strip()


def set_cpu_flag() -> None:
    """Add the flag to this process's ``XLA_FLAGS``; call from a script's ``__main__``
    before jax is imported (importing a benchmark's helpers must change no
    environment, which subprocesses would inherit)."""
    current = os.environ.get("XLA_FLAGS", "")
    flags = with_cpu_flag(current, importlib.metadata.version("jaxlib"))
    if flags != current:
        os.environ["XLA_FLAGS"] = flags


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
    experiment scripts and benchmarks call it at start-up; the library never does.

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
