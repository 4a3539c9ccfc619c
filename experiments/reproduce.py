"""Runs a seed table's grid over N seeds and prints mean (std) next to the published numbers.

    python -m experiments.reproduce --config=spherical --grid=cifar10,resnet20 --seeds=3
    python -m experiments.reproduce --config=learnable_scaler_vit --grid=16,192,24 --seeds=1
    python -m experiments.reproduce --config=spherical --grid=cifar10,resnet20 --tiny \\
        --only=sgdmrt,adamsrt --seeds=2      # CI-sized: digits, 1 epoch

Seed 001 reports the test accuracy of the best-validation epoch (``--metric`` default),
seed 004 the best top-1 over the epochs (timm's "best metric"), then two more tables:
the final top-1 and ImageNet-V2 at the best epoch. Each run lives in
``<workdir>/<cell>/seed<k>`` and is resumed, not retrained, when the command is
repeated. The table has the seed's layout: one row per method, ``ours mean (std)``
then ``[published mean (std)]``; the std is the sample standard deviation over seeds
(0 for one seed), as the seed tables report.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import numpy as np

CONFIGS = ("spherical", "learnable_scaler_vit")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), in %."""
    values = 100.0 * np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def format_table(column: str, rows: Sequence[tuple[str, Sequence[float],
                                                   tuple[float, float] | None]]) -> str:
    """A Markdown table: ``| Method | <column> |`` with ``mean (std) [published]`` cells."""
    lines = [f"| Method | {column} (ours) | {column} (published) |",
             "| :-- | :--: | :--: |"]
    for name, values, published in rows:
        mean, std = mean_std(values)
        pub = "-" if published is None else f"{published[0]:.2f} ({published[1]:.2f})"
        lines.append(f"| {name} | {mean:.2f} ({std:.2f}) | {pub} |")
    return "\n".join(lines)


def _cells(config: str, grid: str, only: list[str] | None):
    module = importlib.import_module(f"experiments.configs.{config}")
    if config == "spherical":
        dataset, model = grid.split(",")
        cells = []
        for arg in module.grid(grid):
            optimizer = arg.split(",")[2]
            if only and optimizer not in only:
                continue
            cells.append((module.ROW_NAMES[optimizer], arg,
                          module.PUBLISHED[(dataset, model)].get(optimizer)))
        return module, f"{dataset.upper()} {model}", cells
    patch, embed, depth = (int(x) for x in grid.split(","))
    row = module.TABLE.get((patch, embed, depth))
    if row is None:
        raise ValueError(f"no seed 004 row {grid!r}; rows: {sorted(module.TABLE)}")
    cells = [(f"vit({patch}, {embed}, {depth}, {norm})", f"{grid},{norm}", (row[norm][0], 0.0))
             for norm in module.NORMS if not only or norm in only]
    return module, "ImageNet-1k top-1, best epoch", cells


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="spherical")
    parser.add_argument("--grid", default="cifar10,resnet20",
                        help="spherical: '<dataset>,<model>'; learnable_scaler_vit: "
                             "'<patch>,<embed>,<depth>'")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated optimizers/norms")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--metric", default=None, help="summary field to report "
                        "(default: learnable_scaler_vit best_test_accuracy; spherical "
                        "test_accuracy_at_best_valid, else final_test_accuracy)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "sing_jax_reproduce"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds}; expected >= 1")

    from sing_jax.train import train_and_evaluate

    module, column, cells = _cells(args.config, args.grid,
                                   [o for o in args.only.split(",") if o] or None)
    if not cells:
        parser.error(f"--only={args.only!r} selects no cell of the grid")
    rows, vit_rows = [], []
    for name, arg, published in cells:
        values, summaries = [], []
        for seed in range(args.seeds):
            config = module.get_config(arg + (",tiny" if args.tiny else ""))
            config.seed = seed
            workdir = os.path.join(args.workdir, args.config, arg.replace(",", "_"),
                                   f"seed{seed}" + ("_tiny" if args.tiny else ""))
            print(f"{name} seed {seed} -> {workdir}", file=sys.stderr, flush=True)
            summary = train_and_evaluate(config, workdir, quiet=True).as_dict()
            summaries.append(summary)
            default = ("best_test_accuracy" if args.config == "learnable_scaler_vit"
                       else "test_accuracy_at_best_valid"
                       if summary["test_accuracy_at_best_valid"] is not None
                       else "final_test_accuracy")
            values.append(summary[args.metric or default])
        rows.append((name, values, published))
        vit_rows.append((name, summaries, published, arg))
    suffix = " [tiny: digits, 1 epoch]" if args.tiny else ""
    table = format_table(column + suffix, rows)
    if args.config == "learnable_scaler_vit" and args.metric is None:
        # the seed table's second column, and the last epoch next to the best one
        final = [(n, [s["final_test_accuracy"] for s in ss], pub) for n, ss, pub, _ in vit_rows]
        v2 = []
        for n, ss, _, arg in vit_rows:
            values = [s["extra_test_accuracy_at_best"].get("imagenet_v2") for s in ss]
            patch, embed, depth, norm = arg.split(",")
            pub = module.TABLE[(int(patch), int(embed), int(depth))][norm][1]
            if all(v is not None for v in values):
                v2.append((n, values, None if pub is None else (pub, 0.0)))
        table += "\n\n" + format_table("ImageNet-1k top-1, last epoch" + suffix, final)
        if v2:
            table += "\n\n" + format_table("ImageNet-V2 top-1, best epoch" + suffix, v2)
    print(table)
    return table


if __name__ == "__main__":
    from experiments.xla_cpu import reuse_host_memory

    reuse_host_memory()  # XLA:CPU's per-step temporaries (see its docstring)
    main()
