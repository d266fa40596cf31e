"""Running a sub-command: dispatch by name, and every failure as one line and an exit code.

``agent-attention <command> ...`` ends in one of three ways:

* success: exit code 0 (or what the command returns);
* a usage error (a bad flag or value, a file named on the command line that cannot be used as
  asked): ``<prog>: error: <one line>`` on stderr, exit code 2;
* a runtime error (disk full, permission denied, a checkpoint that does not fit the model, an
  unreadable image...): ``<prog>: error: <one line>`` on stderr, exit code 1.

Never a traceback, unless ``--debug`` is given (``agent-attention --debug <command> ...``, or
``AGENT_ATTENTION_DEBUG=1``): then errors propagate unchanged.  Commands mark their
argument-resolution phase with :func:`usage_errors`; argparse errors are usage errors too.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from importlib import import_module

from .._extras import MissingExtraError, missing_extra
from typing import Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["UsageError", "usage_errors", "command", "run", "dispatch", "one_line", "set_debug", "debug_enabled"]

#: name -> (module, function taking argv, one-line help)
CommandTable = Dict[str, Tuple[str, str, str]]

_MAX_CHARS = 500
_DEBUG = [os.environ.get("AGENT_ATTENTION_DEBUG", "") not in ("", "0")]


class UsageError(ValueError):
    """A bad command line (exit code 2)."""

    def __init__(self, message: str, prog: Optional[str] = None):
        super().__init__(message)
        self.prog = prog


def set_debug(on: bool) -> None:
    """``True``: let errors propagate with their traceback (``--debug``)."""
    _DEBUG[0] = bool(on)


def debug_enabled() -> bool:
    return _DEBUG[0]


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside the block, ``ValueError`` / ``TypeError`` / a YAML error / a missing file is a usage
    error: use it around reading and checking the command line, before any work starts."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(one_line(e)) from e
    except Exception as e:
        if type(e).__module__.split(".")[0] == "yaml":  # malformed YAML (recipe file, --set value)
            raise UsageError(f"malformed YAML: {one_line(e)}") from e
        raise


def _argparse_error(self: argparse.ArgumentParser, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


@contextlib.contextmanager
def _one_line_argparse() -> Iterator[None]:
    """argparse usage errors raise :class:`UsageError` (one line) instead of printing the usage."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------- one-line message
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


# --------------------------------------------------------------------------------------- running
def run(prog: str, func: Callable[[], Optional[int]]) -> int:
    """Call ``func()`` and turn its outcome into an exit code, printing one-line errors."""
    if debug_enabled():  # everything propagates, argparse prints its usage as usual
        return int(func() or 0)
    try:
        with _one_line_argparse():
            return int(func() or 0)
    except UsageError as e:
        print(f"{e.prog or prog}: error: {_flatten(str(e))}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or a command calling sys.exit itself
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"{prog}: error: {_flatten(str(e.code))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the point: no traceback for the user
        e = missing_extra(e) or e  # an optional package absent: name the extra that installs it
        if type(e).__module__.split(".")[0] == "yaml":  # a recipe file or a flag's value
            print(f"{prog}: error: malformed YAML: {one_line(e)}", file=sys.stderr)
            return 2
        known = (OSError, ValueError, TypeError, RuntimeError, MissingExtraError)
        hint = "" if isinstance(e, known) else " (run with --debug for the traceback)"
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 1


def command(prog: str) -> Callable:
    """Decorator for a command's ``main(argv) -> int``: errors become one line and an exit code,
    also when ``main`` is called directly (tests, ``python -m``)."""

    def wrap(main: Callable[[Optional[List[str]]], Optional[int]]) -> Callable[[Optional[List[str]]], int]:
        def wrapped(argv: Optional[List[str]] = None) -> int:
            return run(prog, lambda: main(argv))

        wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__ = main.__name__, main.__doc__, main  # type: ignore[attr-defined]
        return wrapped

    return wrap


def _usage(prog: str, commands: CommandTable, what: str) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} [--debug] <{what}> [options]", "", f"{what}s:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in commands.items()]
    lines += ["", f"Run '{prog} <{what}> --help' for the options of a {what}; --debug shows tracebacks."]
    return "\n".join(lines)


def dispatch(prog: str, commands: CommandTable, argv: List[str], what: str = "command") -> int:
    """Run ``argv[0]``'s entry of ``commands`` (name -> (module, function, help)) on ``argv[1:]``;
    the module is imported only now. Errors are reported by :func:`run`."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(prog, commands, what))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, commands, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(commands)}"
        print(f"{prog}: error: unknown {what} {name!r}{hint}", file=sys.stderr)
        return 2
    module, func, _ = commands[name]
    return run(f"{prog} {name}", lambda: getattr(import_module(module), func)(rest))
