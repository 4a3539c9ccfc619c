"""The README's main command: every optimizer family on the embedded datasets.

    python -m experiments.quickstart [--workdir=/tmp/sing_jax_quickstart] [--tiny]

Trains AdamW, SING, AdamSRT, SGDMRT and SINGD on ``digits`` and ``mnist1d``
(built offline from scikit-learn and the MNIST-1D generator; no network), then
prints a table of the test accuracy at the best-validation epoch (seed 001's
protocol), the final test accuracy and the time per step, and writes one PNG of
the curves per dataset. Finished runs are not retrained: a second call only
re-reads their summaries (delete the workdir to start over).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from experiments.configs import quickstart


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join("/tmp", "sing_jax_quickstart"))
    parser.add_argument("--datasets", default=",".join(quickstart.DATASETS))
    parser.add_argument("--optimizers", default=",".join(quickstart.OPTIMIZERS))
    parser.add_argument("--tiny", action="store_true", help="1 epoch per run (CI)")
    parser.add_argument("--verbose", action="store_true", help="per-epoch progress")
    args = parser.parse_args(argv)

    from sing_jax.train import plot_curves, read_metrics, train_and_evaluate

    rows, start = [], time.perf_counter()
    for dataset in args.datasets.split(","):
        curves = {}
        for optimizer in args.optimizers.split(","):
            arg = f"{dataset},{optimizer}" + (",tiny" if args.tiny else "")
            config = quickstart.get_config(arg)
            config.logging.plot = False
            workdir = os.path.join(args.workdir, dataset, optimizer)
            print(f"[{time.perf_counter() - start:6.1f}s] {dataset} / {optimizer} ...",
                  file=sys.stderr, flush=True)
            summary = train_and_evaluate(config, workdir, overwrite=True,
                                         quiet=not args.verbose)
            curves[optimizer] = read_metrics(workdir)
            rows.append(dict(dataset=dataset, optimizer=optimizer, **summary.as_dict()))
        path = plot_curves(curves, os.path.join(args.workdir, f"quickstart_{dataset}.png"),
                           keys=("train_loss", "valid_accuracy", "test_accuracy"),
                           title=f"{dataset}: {quickstart.DATASETS[dataset][0]['name']}")
        print(f"plot: {path}", file=sys.stderr)

    print()
    print(f"{'dataset':<9} {'optimizer':<9} {'test acc @ best valid':>21} {'final test':>10} "
          f"{'ms/step':>8} {'compile s':>9}")
    for r in rows:
        best = r["test_accuracy_at_best_valid"]
        best = f"{100 * best:.2f}%" if best is not None else "-"
        step_ms = r["step_time_s"] * 1e3
        print(f"{r['dataset']:<9} {r['optimizer']:<9} {best:>21} "
              f"{100 * r['final_test_accuracy']:>9.2f}% {step_ms:>8.2f} "
              f"{r['compile_time_s']:>9.1f}")
    print(f"total {time.perf_counter() - start:.0f}s; plots and runs in {args.workdir}")
    return rows


if __name__ == "__main__":
    from experiments.xla_cpu import reuse_host_memory

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
