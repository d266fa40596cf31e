"""A run folder is never replaced by accident: a second run into a folder that holds one needs
``--resume`` (continue it) or ``--overwrite`` (delete its files first, stale ``checkpoint-N.pth``
included). Shared by ``train``, ``train-det`` and ``train-seg``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence

from .checkpointing import RUN_FILES

__all__ = ["DENSE_RUN_FILES", "run_files", "check_run_dir"]

#: every file a ``train-det`` / ``train-seg`` run writes into its folder
DENSE_RUN_FILES = ("last.pth", "best.pth", "log.jsonl", "metrics.json")


def run_files(folder: Path, patterns: Iterable[str] = RUN_FILES) -> List[Path]:
    """The files of a run in ``folder`` (matches of ``patterns``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def check_run_dir(folder, resume: bool, overwrite: bool, patterns: Sequence[str] = RUN_FILES,
                  log=print) -> List[Path]:
    """Refuse (one-line ValueError) to start a fresh run where ``folder`` already holds one, unless
    ``resume`` (the run continues) or ``overwrite`` (its files are deleted now, on rank 0 only;
    returned). Other files of the folder are left alone."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    existing = run_files(Path(folder), patterns)
    if not existing or resume:
        return []
    names = ", ".join(p.name for p in existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
    if not overwrite:
        raise ValueError(f"--output {folder} already holds a run ({names}): add --resume auto to continue it or "
                         "--overwrite to replace it (or choose another --output)")
    if _is_main_rank():
        for p in existing:
            p.unlink(missing_ok=True)
        if log:
            log(f"--overwrite: removed {len(existing)} file(s) of the previous run in {folder} ({names})")
    return existing
