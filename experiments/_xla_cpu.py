"""The XLA:CPU setting of the benchmarks that race PyTorch on CPU (README: CPU notes).

jaxlib 0.10 runs convolutions through YNNPACK by default, slower than its Eigen
kernels for small CNNs, while YNNPACK's matrix products are the faster ones for thin
products. These scripts ask for YNNPACK's products one call at a time and its
reductions, and give convolutions to Eigen. Nothing here imports jax: the flag only
counts if it is set before jax is.
"""

from __future__ import annotations

import importlib.metadata
import os

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
