"""Shared pieces of the benchmarks: machine description, timing, peak memory, tables and plots.

Timing is a median over repeats measured *round-robin* across the compared functions (each repeat
times every function once), so that load from other processes on a shared machine hits all of
them alike and the ratios stay meaningful. Peak memory is the extra memory a call allocates
(inputs excluded, output included): ``torch.cuda.max_memory_allocated`` on CUDA, the allocation
events of ``torch.profiler(profile_memory=True)`` replayed in time order on CPU.
"""
from __future__ import annotations

import argparse

import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .._atomic import atomic_path, write_text
from .._device import resolve_device
from .._errors import UsageError, usage_errors

__all__ = [
    "Timing", "machine_info", "machine_line", "set_threads", "resolve_device", "sync",
    "time_round_robin", "peak_memory", "markdown_table", "text_table", "fmt_ms", "fmt_mb",
    "fmt_ratio", "loglog_slope", "write_outputs", "new_figure", "save_figure",
]


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on (written next to every table)."""
    info: Dict[str, object] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": str(device),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    try:
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover (not on every OS)
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def machine_line(info: Dict[str, object], wrap: bool = False) -> str:
    """One line describing the machine (two with ``wrap=True``, for plot titles)."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads){gpu};"
        + ("\n" if wrap else " ")
        + f"torch {info['torch']}" + (f", timm {info['timm']}" if "timm" in info else "")
        + f"; Python {info['python']}; {info['os']}; {info['date']}"
        + (f"; load average {info['load_avg_1min']} at start" if "load_avg_1min" in info else "")
    )


def set_threads(n: int) -> None:
    """Pin the number of intra-op CPU threads (the benchmarks' ``--threads``)."""
    if n <= 0:
        raise ValueError(f"--threads must be positive, got {n}")
    torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call: ``median`` over ``samples`` (each the mean of ``number`` calls)."""

    median: float
    samples: List[float] = field(default_factory=list)
    number: int = 1

    @property
    def best(self) -> float:
        """Fastest sample: the least disturbed by other processes on a shared machine."""
        return min(self.samples) if self.samples else self.median

    def stat(self, name: str) -> float:
        """``"median"`` or ``"min"`` (see :attr:`best`)."""
        if name not in ("median", "min"):
            raise ValueError(f"--stat must be median or min, got {name!r}")
        return self.median if name == "median" else self.best

    @property
    def spread(self) -> float:
        """Relative half-range of the samples (a quick noise indicator)."""
        if len(self.samples) < 2 or self.median <= 0:
            return 0.0
        return (max(self.samples) - min(self.samples)) / (2 * self.median)


def round_order(keys: List, r: int) -> List:
    """The order of round ``r``: forward in even rounds, backward in odd ones (A B C, C B A, ...), so
    that every configuration has the same mean position and a drift in machine speed during a
    round (other jobs starting, clocks changing) does not favour the ones timed first."""
    return list(keys) if r % 2 == 0 else list(reversed(keys))


def time_round_robin(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int = 5,
    min_repeat_s: float = 0.05,
    max_s_per_fn: float = 60.0,
    warmed: bool = False,
) -> Dict[str, Timing]:
    """Median seconds per call of each function, measured in interleaved rounds.

    Each function is first called once (warm-up, and an estimate of its cost that fixes how many
    calls ``number`` make one sample: enough for ``min_repeat_s``). Then ``repeats`` rounds time
    every function once each; in alternating order (see :func:`round_order`); a function whose samples would exceed ``max_s_per_fn`` in total gets
    fewer rounds (at least one). ``warmed=True`` says every function was already called once (e.g.
    by :func:`peak_memory`): the estimate call of a slow function (one call per sample) then
    counts as its first sample.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    numbers: Dict[str, int] = {}
    rounds: Dict[str, int] = {}
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        single = max(time.perf_counter() - t0, 1e-7)
        numbers[name] = max(1, int(min_repeat_s / single))
        rounds[name] = max(1, min(repeats, int(max_s_per_fn / (single * numbers[name]))))
        if warmed and numbers[name] == 1:
            samples[name].append(single)
            rounds[name] -= 1
    for r in range(repeats):
        for name in round_order(list(fns), r):
            if r >= rounds[name]:
                continue
            fn, number = fns[name], numbers[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / number)
    return {k: Timing(statistics.median(v), v, numbers[k]) for k, v in samples.items()}


# --------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler back end's start/stop chatter on file descriptor 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. some notebook setups)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of ``fn`` at its peak, above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        del out
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak(fn)


# --------------------------------------------------------------------------- formatting
def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fmt_mb(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "—"
    mb = nbytes / 2**20
    return f"{mb:.3g}" if mb < 100 else f"{mb:,.0f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return "—"
    return f"{r:.3g}×" if r < 100 else f"{r:,.0f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cols = [list(map(str, col)) for col in zip(headers, *rows)]
    widths = [max(len(c) for c in col) for col in cols]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ``log y`` against ``log x`` (growth exponent); None if < 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return None if den == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / den


# --------------------------------------------------------------------------- outputs
def new_figure(ncols: int, width: float = 5.2, height: float = 4.2):
    """A matplotlib Figure with ``ncols`` axes, drawn with the Agg canvas (no pyplot, no GUI)."""
    from .._extras import require

    require("matplotlib", "the benchmark plots", "bench")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def write_outputs(out_dir: Path, stem: str, markdown: str, data: dict) -> List[Path]:
    """Write ``<stem>.md`` (the table) and ``<stem>.json`` (raw numbers) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", markdown), (".json", json.dumps(data, indent=2, default=str))):
        written.append(write_text(out_dir / f"{stem}{suffix}", text + "\n"))
    return written


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv`` and call ``run(args)``; a ``ValueError`` (a bad combination of options) becomes a
    usage error that names the problem (exit status 2) instead of a traceback (see
    :func:`agent_attention._errors.usage_errors`)."""
    args = parser.parse_args(argv)
    try:
        with usage_errors():
            return run(args)
    except UsageError as e:
        parser.error(str(e))


def add_timing_options(p: argparse.ArgumentParser, *, repeats: int, max_seconds: float, unit: str) -> None:
    """``--threads --repeats --stat --max-seconds`` shared by ``bench op`` and ``bench models``."""
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per {unit} (see --stat)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="time statistic over the rounds (min: least disturbed by other processes)")
    p.add_argument("--max-seconds", type=float, default=max_seconds, help=f"cap on the timed seconds per {unit} and size")


def add_output_options(p: argparse.ArgumentParser, name: str) -> None:
    """``--out`` (folder for ``<name>.md/.json/.png``) and ``--no-plot``."""
    p.add_argument("--out", type=Path, default=Path("bench-results"), help=f"folder for {name}.md, {name}.json, {name}.png")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")


def description(doc: Optional[str]) -> str:
    """The first paragraph of a module docstring as plain text for ``--help`` (argparse prints
    RST markup raw): ````x```` → x, ``:func:`x``` → x, a leading ``"prog: "`` removed."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "").replace("`", "")
    return text.split(": ", 1)[1] if text.startswith("agent-attention ") and ": " in text else text
