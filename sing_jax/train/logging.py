"""Run logs: a JSONL metrics file, TensorBoard events, progress output and PNG plots.

Every record is one JSON object per line in ``workdir/metrics.jsonl`` with a
``step`` and a ``kind`` (``'train'`` for per-step records, ``'epoch'`` for the
end-of-epoch summary with train/valid/test loss and accuracy). The same scalars go
to TensorBoard event files in ``workdir/tensorboard`` through ``tensorboardX``
(no TensorFlow needed; skipped with a note when it is not installed).

On resume, :meth:`MetricsLogger.truncate_after` drops the records written after the
restored checkpoint, so the file of a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (a workdir or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes metric records to JSONL and TensorBoard (process 0 only writes files).

    Args:
      workdir: the run directory.
      tensorboard: also write TensorBoard event files.
      enabled: False on processes other than 0 of a multi-host run.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    print("note: tensorboardX is not installed; no TensorBoard events "
                          "(pip install tensorboardX)", file=sys.stderr)
                else:
                    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                             flush_secs=10)

    def truncate_after(self, step: int) -> None:
        """Drops the records with ``step > step`` (written after the restored checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path)
                if r.get("step", 0) <= step and r.get("kind") != "summary"]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, kind: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Appends one record; returns it."""
        record = {"step": int(step), "kind": kind}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            if self._tb is not None:
                for key, value in record.items():
                    if key in ("step", "kind") or not isinstance(value, (int, float)):
                        continue
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A per-epoch progress bar (tqdm) on a terminal, plain lines otherwise.

    Args:
      total: steps in the epoch.
      description: shown before the bar / at the start of each line.
      every: in plain mode, print a line every ``every`` steps (and at the end).
      enabled: False prints nothing (other processes, quiet runs).
      stream: the output stream (default stderr).
    """

    def __init__(self, total: int, description: str = "", *, every: int = 50,
                 enabled: bool = True, stream: Any = None):
        self.total, self.description, self.every = total, description, max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.count = 0
        self._start = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=description, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.count += count
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(count)
            if text:
                self._bar.set_postfix_str(text, refresh=False)
        elif self.count % self.every == 0 or self.count == self.total:
            elapsed = time.perf_counter() - self._start
            print(f"{self.description} {self.count}/{self.total} {text} "
                  f"({elapsed:.1f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plot_curves(runs: Mapping[str, Iterable[Mapping[str, Any]]], path: str,
                keys: tuple[str, ...] = ("train_loss", "valid_accuracy", "test_accuracy"),
                title: str = "") -> str:
    """One PNG with a panel per metric key, one line per run, over epochs.

    Args:
      runs: ``{run name: records}`` (the ``'epoch'`` records of :func:`read_metrics`).
      path: where to write the PNG.
      keys: the epoch-record keys to plot (absent keys are skipped).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = {name: [r for r in recs if r.get("kind") == "epoch"] for name, recs in runs.items()}
    keys = tuple(k for k in keys if any(k in r for recs in records.values() for r in recs))
    if not keys:
        raise ValueError(f"plot_curves: no epoch record has any of the keys; runs: {list(runs)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, recs in records.items():
            pts = [(r["epoch"], r[key]) for r in recs if key in r and "epoch" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=2, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
