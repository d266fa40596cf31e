"""Atomic file writes: the one way the package writes a file.

Every writer puts its bytes in a temp file in the target's folder, fsyncs it, ``os.replace``-s it onto
the target and fsyncs the folder; on any error (or a kill) the previous file at the target is intact
and the temp file is removed (a ``kill -9`` can leave one behind: :func:`remove_stale_temps` clears
them, and they never shadow a real file because their names start with ``.`` and end in ``.tmp``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "json_safe", "remove_stale_temps", "temp_prefix"]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode a normally created file would get (or the existing file's mode)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def temp_prefix(path: PathLike) -> str:
    """The name prefix of the temp files written for ``path`` (``.<name>.``)."""
    return f".{Path(path).name}."


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` to write to; on success fsync it and ``os.replace`` it
    onto ``path``. The folder is created if needed; on error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _file_mode(path))  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, so that ``json.dumps``
    writes strict JSON (``null``) instead of the bare ``NaN`` that other readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: PathLike, obj: Any, **kwargs: Any) -> Path:
    """``json.dumps(obj, **kwargs)`` written atomically as strict JSON (non-finite floats → ``null``)."""
    default = kwargs.pop("default", None)
    if default is not None:  # apply it first, so what it returns is made JSON-safe too
        obj = json.loads(json.dumps(obj, default=default))
    return write_text(path, json.dumps(json_safe(obj), allow_nan=False, **kwargs) + "\n")


def remove_stale_temps(path: PathLike) -> List[Path]:
    """Delete temp files left next to ``path`` by killed writers; returns what was removed.

    Call it only where no other process is writing ``path`` at the same time (e.g. rank 0 at start-up).
    """
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for p in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
