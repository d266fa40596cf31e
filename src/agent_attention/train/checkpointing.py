"""Training checkpoints: full state for exact resume, written atomically, read without pickled code.

A training checkpoint is a dict of tensors and plain containers only (``torch.load(...,
weights_only=True)`` reads it): ``model`` (no ``module.`` prefix), ``model_ema``, ``optimizer``,
``lr_scheduler``, ``scaler``, ``epoch`` (the epoch in progress, or the next one at a boundary),
``step_in_epoch`` (optimizer steps already done in that epoch), ``global_step``, ``rng`` (python /
numpy / torch / CUDA states of every rank), ``meters`` (running sums of the partial epoch),
``max_accuracy``, ``max_accuracy_ema``, ``config`` (the resolved recipe as a plain dict). The
official loaders find the weights under ``model`` as in official checkpoints.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .._atomic import remove_stale_temps as _remove_temps
from ..weights import load_checkpoint, save_checkpoint_atomic

__all__ = ["rng_state", "set_rng_state", "save_state", "load_state", "find_resume", "prune_checkpoints",
           "remove_stale_temps", "first_non_finite", "read_summary", "LAST", "BEST", "BEST_EMA", "RUN_FILES"]

LAST, BEST, BEST_EMA = "last.pth", "best.pth", "best_ema.pth"
#: every file a training run writes into its folder (``checkpoint-*.pth``: one per saved epoch)
RUN_FILES = (LAST, BEST, BEST_EMA, "checkpoint-*.pth", "model.safetensors", "summary.json", "log.jsonl", "log.csv",
             "curves.png")
_EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors / plain containers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_state(path: Path, state: Dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (temp file + fsync + ``os.replace``)."""
    return save_checkpoint_atomic(state, path)


def load_state(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint safely (no pickled code is executed)."""
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    return state


def find_resume(output: Path, resume: str) -> Optional[Path]:
    """``resume``: ``''`` (none), ``'auto'`` (``last.pth`` of ``output`` if present, else the newest
    ``checkpoint-N.pth``) or a path."""
    if not resume:
        return None
    if resume != "auto":
        p = Path(resume)
        if p.is_dir():
            return find_resume(p, "auto") or _missing(p)
        if not p.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return p
    if (output / LAST).is_file():
        return output / LAST
    numbered = _numbered(output)
    return numbered[-1] if numbered else None


def _missing(p: Path) -> Path:
    raise FileNotFoundError(f"--resume {p}: the folder has no {LAST} or checkpoint-N.pth")


def _numbered(output: Path) -> List[Path]:
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _EPOCH_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-N.pth`` files (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    for p in _numbered(output)[:-keep]:
        p.unlink(missing_ok=True)


def remove_stale_temps(output: Path) -> List[Path]:
    """Delete the temp files that killed writers left next to any of :data:`RUN_FILES` in ``output``
    (call on rank 0 before the run writes anything)."""
    removed: List[Path] = []
    for name in RUN_FILES:
        removed += _remove_temps(Path(output) / name)
    return removed


def first_non_finite(state: Dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` holding NaN/inf, else None."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_summary(output: Path) -> Dict[str, Any]:
    """``summary.json`` of a run folder ({} when missing or unreadable)."""
    try:
        data = json.loads((Path(output) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
