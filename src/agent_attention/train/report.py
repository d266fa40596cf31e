"""Per-epoch logs (JSON lines + CSV), PNG curves and progress display.

Rows are numbered by 1-based epoch (``epoch: 1`` is the first); every file is written atomically
(:mod:`agent_attention._atomic`) and ``log.jsonl`` is strict JSON (a NaN/inf metric becomes ``null``).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._atomic import atomic_path, json_safe, write_text

__all__ = ["EpochLog", "read_log", "plot_curves", "progress_bar", "COLUMNS"]

COLUMNS = [
    "epoch", "lr", "train_loss", "grad_norm", "val_loss", "val_top1", "val_top5", "ema_val_loss", "ema_val_top1",
    "ema_val_top5", "max_top1", "epoch_time_s", "train_images_per_s", "elapsed_s",
]


def read_log(path: Path) -> List[Dict[str, Any]]:
    """Rows of a ``log.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class EpochLog:
    """``log.jsonl`` (one JSON object per epoch, the source of truth) and ``log.csv`` (regenerated)."""

    def __init__(self, output: Path, enabled: bool = True):
        self.jsonl, self.csv, self.enabled = Path(output) / "log.jsonl", Path(output) / "log.csv", enabled

    def truncate(self, done_epochs: int) -> None:
        """Keep only the rows of the first ``done_epochs`` epochs (a resumed run rewrites the later ones)."""
        if not self.enabled:
            return
        rows = [r for r in read_log(self.jsonl) if r.get("epoch", 0) <= done_epochs]
        self._write(rows)

    def append(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rows = read_log(self.jsonl) + [row]
        self._write(rows)

    def _write(self, rows: List[Dict[str, Any]]) -> None:
        rows = [json_safe(r) for r in rows]
        write_text(self.jsonl, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        extra = sorted({k for r in rows for k in r} - set(COLUMNS))
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv, buf.getvalue())


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> Path:
    """Loss, accuracy and learning-rate curves of a ``log.jsonl`` as one PNG (matplotlib, Agg)."""
    from .._extras import require

    require("matplotlib", "the training curves (curves.png; --set plot=false skips them)", "train")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        raise ValueError(f"{log_path}: no epochs logged yet")
    ep = [r["epoch"] for r in rows]

    def series(key):
        pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, marker=".", label=label)
    for key, label in (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1 (EMA)")):
        x, y = series(key)
        if x:
            axes[1].plot(x, y, marker=".", label=label)
    x, y = series("lr")
    axes[2].plot(x, y, marker=".")
    for ax, name in zip(axes, ("loss", "val accuracy (%)", "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png_path


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Optional[Any]:
    """A tqdm bar on interactive terminals when ``enabled`` (rank 0 and ``--progress``), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
