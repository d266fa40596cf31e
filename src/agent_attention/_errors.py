"""Errors for the user: one line each, and which of them are usage errors (the one copy).

:func:`one_line` turns any exception into one line (no traceback; disk-full and other storage errnos
named, a DataLoader worker's error unwrapped). :func:`as_usage_error` / :func:`usage_errors` decide
which errors are a bad command line (exit code 2): a ``ValueError`` / ``TypeError`` / missing file
while the command line is read and checked, and a malformed YAML anywhere. The commands
(:mod:`agent_attention.commands._dispatch`), the benchmarks and the weights code all use these.
"""
from __future__ import annotations

import contextlib
import errno
import re
from typing import Iterator, Optional, Tuple

from ._extras import MissingExtraError

__all__ = ["UsageError", "one_line", "as_usage_error", "usage_errors", "USAGE_ERROR_TYPES"]

_MAX_CHARS = 500
#: the exceptions that are usage errors while the command line is read and checked
USAGE_ERROR_TYPES = (ValueError, TypeError, FileNotFoundError)


class UsageError(ValueError):
    """A bad command line (exit code 2); a ``ValueError``, so a command's ``main`` called from
    Python raises what it raised before."""

    def __init__(self, message: str, prog: Optional[str] = None):
        super().__init__(message)
        self.prog = prog


_STORAGE_ERRNOS = {
    errno.ENOSPC: "disk full (ENOSPC: no space left on device)",
    errno.EFBIG: "file-size limit reached (EFBIG: file too large)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
}
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how Rust-backed libraries (safetensors) report errno


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _errno_of(exc: BaseException) -> Tuple[Optional[int], Optional[str]]:
    """The first errno (and file name) along the exception chain, also from '(os error N)' texts."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno, e.filename
        m = _OS_ERROR_RE.search(str(e))
        if m:
            return int(m.group(1)), None
    return None, None


def _flatten(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and any("Original Traceback" in ln for ln in lines):
        last = lines[-1]  # a DataLoader worker's error: keep the original exception's message
        head, sep, tail = last.partition(": ")
        lines = [tail if sep and " " not in head else last]
    text = " ".join(lines)
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 3] + "..."


def one_line(exc: BaseException) -> str:
    """A one-line description of ``exc`` for the user (no traceback)."""
    code, filename = _errno_of(exc)
    if code in _STORAGE_ERRNOS:
        where = f" while writing {filename}" if filename else ""
        return f"{_STORAGE_ERRNOS[code]}{where}"
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        target = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            target = f"{target} -> {exc.filename2}"
        return _flatten(f"{exc.strerror or exc} ({name}){': ' + str(target) if target != '' else ''}")
    text = _flatten(str(exc)) if str(exc) else ""
    if isinstance(exc, (ValueError, TypeError, RuntimeError, OSError, UsageError, MissingExtraError)) and text:
        return text
    if isinstance(exc, KeyError):
        return f"missing key {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_yaml_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "yaml"


def as_usage_error(exc: BaseException, kinds: Tuple[type, ...] = USAGE_ERROR_TYPES) -> Optional[UsageError]:
    """``exc`` as a :class:`UsageError` (one line) if it is one of ``kinds`` or a malformed YAML
    (a recipe file, a ``--set`` value), else ``None``; a UsageError is returned as it is."""
    if isinstance(exc, UsageError):
        return exc
    if _is_yaml_error(exc):
        return UsageError(f"malformed YAML: {one_line(exc)}")
    if kinds and isinstance(exc, kinds):
        return UsageError(one_line(exc))
    return None


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside the block, ``ValueError`` / ``TypeError`` / a YAML error / a missing file is a usage
    error: use it around reading and checking the command line, before any work starts."""
    try:
        yield
    except Exception as e:
        usage = as_usage_error(e)
        if usage is None or usage is e:
            raise
        raise usage from e
