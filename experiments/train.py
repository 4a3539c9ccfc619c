"""The one training entry point.

    python -m experiments.train --config=experiments/configs/quickstart.py:digits,sing \\
        --workdir=/tmp/run [--config.num_epochs=3] [--overwrite]

Multi-host: start one process per host with ``--num_processes``, ``--process_id`` and
``--coordinator_address`` (or set them through the environment variables that
``jax.distributed.initialize`` reads on clusters); every process runs the same
command and feeds its own slice of each global batch.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "an experiments/configs file, "
                                          "with ':<arg>' for its get_config")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run directory", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace another experiment's "
                               "checkpoints in --workdir")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                   "(multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "simulate this many CPU devices "
                                    "per process (testing)")


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """``jax.distributed.initialize`` when this is one of several processes."""
    import jax

    if num_processes is not None and num_processes > 1:
        if coordinator is None or process_id is None:
            raise ValueError("--num_processes > 1 needs --coordinator_address and --process_id")
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(
                jax.config.jax_platforms):
            # Cross-process collectives on CPU need an implementation (GPU/TPU have theirs).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CPU_DEVICES.value:
        import jax

        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from experiments.xla_cpu import reuse_host_memory
    from sing_jax.train import train_and_evaluate

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)

    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    if jax.process_index() == 0:
        print(json.dumps(summary.as_dict(), indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
