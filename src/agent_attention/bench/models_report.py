"""Tables, plot and profiles of ``bench models`` (:mod:`agent_attention.bench.models`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import common

__all__ = ["GOAL_SPEEDUP", "goals", "label", "plot", "profile_table", "tables"]

VARIANT_ORDER = ("agent", "official", "math", "softmax", "compiled")
MODE_TITLES = {"infer": "Inference", "train": "Training step (forward + backward + AdamW)"}
GOAL_SPEEDUP = 1.15  # the goal: every T model >= 1.15x the official-style baseline at 224, batch 1 and 8


def label(variant: str, amp: str) -> str:
    """The column name of a variant at a precision: ``agent``, ``agent+bf16``."""
    return variant if amp == "none" else f"{variant}+{amp}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if not a or not b else a / b


def tables(records: List[dict]) -> List[Tuple[str, List[str], List[List[str]]]]:
    """One ``(title, headers, rows)`` per mode and precision; rows per model, size and batch."""
    out = []
    ok = [r for r in records if "mode" in r]
    for mode in [m for m in MODE_TITLES if any(r["mode"] == m for r in ok)]:
        amps = list(dict.fromkeys(r["amp"] for r in ok if r["mode"] == mode))
        for amp in amps:
            recs = [r for r in ok if r["mode"] == mode and r["amp"] == amp]
            variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in recs)]
            fp32 = {(r["model"], r["size"], r["batch"], r["variant"]): r for r in ok
                    if r["mode"] == mode and r["amp"] == "none"}
            speedup_col = amp != "none" and fp32
            headers = (["model", "size", "batch"] + [f"{v} img/s" for v in variants]
                       + (["agent/official"] if "official" in variants else [])
                       + (["agent/softmax"] if "softmax" in variants else [])
                       + ([f"agent {amp}/fp32"] if speedup_col else [])
                       + [f"{v} MB" for v in variants]
                       + (["mem official/agent"] if "official" in variants else []))
            rows = []
            groups = list(dict.fromkeys((r["model"], r["size"], r["batch"]) for r in recs))
            for model, size, batch in groups:
                by_v: Dict[str, dict] = {r["variant"]: r for r in recs
                                         if (r["model"], r["size"], r["batch"]) == (model, size, batch)}
                ips = {v: by_v.get(v, {}).get("images_per_s") for v in variants}
                mem = {v: by_v.get(v, {}).get("peak_bytes") for v in variants}
                row = [model, str(size), str(batch)]
                row += [f"{ips[v]:.3g}" if ips[v] else ("error" if by_v.get(v, {}).get("error") else "—")
                        for v in variants]
                if "official" in variants:
                    row.append(common.fmt_ratio(_ratio(ips.get("agent"), ips.get("official"))))
                if "softmax" in variants:
                    row.append(common.fmt_ratio(_ratio(ips.get("agent"), ips.get("softmax"))))
                if speedup_col:
                    base = fp32.get((model, size, batch, "agent"), {}).get("images_per_s")
                    row.append(common.fmt_ratio(_ratio(ips.get("agent"), base)))
                row += [common.fmt_mb(mem[v]) for v in variants]
                if "official" in variants:
                    row.append(common.fmt_ratio(_ratio(mem.get("official"), mem.get("agent"))))
                rows.append(row)
            prec = "fp32" if amp == "none" else f"{amp} autocast"
            out.append((f"{MODE_TITLES[mode]}, {prec}", headers, rows))
    return out


def goals(records: List[dict], size: int = 224) -> List[str]:
    """The model speed goals at ``size``, met or missed by a factor: per mode and precision, every
    model's ``agent/official`` speed-up ≥ :data:`GOAL_SPEEDUP` at every measured batch, and (training)
    peak memory no higher than the official-style baseline's."""
    ok = [r for r in records if "mode" in r and r.get("size") == size and r.get("images_per_s")]
    lines = []
    for mode in [m for m in MODE_TITLES if any(r["mode"] == m for r in ok)]:
        for amp in dict.fromkeys(r["amp"] for r in ok if r["mode"] == mode):
            by = {(r["model"], r["batch"], r["variant"]): r for r in ok if r["mode"] == mode and r["amp"] == amp}
            pairs = [(k[0], k[1], by[k], by.get((k[0], k[1], "official"))) for k in by if k[2] == "agent"]
            pairs = [p for p in pairs if p[3] is not None]
            if not pairs:
                continue
            prec = "fp32" if amp == "none" else amp
            speed = [(a["images_per_s"] / o["images_per_s"], m, b) for m, b, a, o in pairs]
            x, m, b = min(speed)
            verdict = "met" if x >= GOAL_SPEEDUP else f"missed by {GOAL_SPEEDUP / x:.2f}×"
            lines.append(f"* {mode} {prec} {size}², agent/official ≥ {GOAL_SPEEDUP}× for every model and batch: "
                         f"{verdict} (range {min(speed)[0]:.2f}-{max(speed)[0]:.2f}×, worst {m} batch {b})")
            if mode == "train":
                mem = [(o["peak_bytes"] / a["peak_bytes"], m, b) for m, b, a, o in pairs
                       if a.get("peak_bytes") and o.get("peak_bytes")]
                if mem:
                    x, m, b = min(mem)
                    verdict = "met" if x >= 1.0 else f"missed: ours needs {1 / x:.3f}× the baseline's"
                    lines.append(f"* train {prec} {size}², peak memory ≤ the baseline's: {verdict} "
                                 f"(official/agent {min(mem)[0]:.3f}-{max(mem)[0]:.3f}×, worst {m} batch {b})")
    return lines


def _x_axis(rows: List[dict]):
    """What a mode's panels plot against: the input size when it has several, else the batch size."""
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) > 1 or len({r["batch"] for r in rows}) == 1:
        return "size", sizes, "input size (pixels per side)"
    return "batch", sorted({r["batch"] for r in rows}), f"batch size (input {sizes[0]}²)"


def _log_axis(ax) -> None:
    """Log scale with plain numbers; minor ticks labelled only where a panel spans few decades."""
    from matplotlib.ticker import LogFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    ax.tick_params(axis="y", which="both", labelsize=6)


def plot(records: List[dict], path: Path, title: str) -> Path:
    """One column per model; rows: images/s and peak memory per mode, against the input size (or,
    for a mode measured at one size, the batch size); one legend for the figure."""
    from .._extras import require

    require("matplotlib", "the benchmark plots", "bench")
    from matplotlib.figure import Figure

    ok = [r for r in records if r.get("images_per_s")]
    models = list(dict.fromkeys(r["model"] for r in ok))
    modes = [m for m in MODE_TITLES if any(r["mode"] == m for r in ok)]
    panels = [(mode, key) for mode in modes for key in ("images_per_s", "peak_bytes")]
    fig = Figure(figsize=(3.3 * max(1, len(models)) + 0.6, 2.7 * len(panels) + 1.2), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), max(1, len(models)), squeeze=False)
    colors = {"agent": "tab:green", "official": "tab:purple", "math": "tab:orange", "softmax": "tab:red",
              "compiled": "tab:blue"}
    batches = sorted({r["batch"] for r in ok})
    markers = dict(zip(batches, "os^Dv<>"))
    legend: dict = {}
    for row, (mode, key) in enumerate(panels):
        in_mode = [r for r in ok if r["mode"] == mode]
        x_key, xs, x_label = _x_axis(in_mode)
        for col, m in enumerate(models):
            ax = axes[row, col]
            rows = [r for r in in_mode if r["model"] == m and r.get(key)]
            per_line = "batch" if x_key == "size" else "size"
            for v, amp, other in dict.fromkeys((r["variant"], r["amp"], r[per_line]) for r in rows):
                pts = sorted((r[x_key], r[key] * (1.0 if key == "images_per_s" else 2.0**-20)) for r in rows
                             if (r["variant"], r["amp"], r[per_line]) == (v, amp, other))
                name = label(v, amp) + (f", b{other}" if x_key == "size" and len(batches) > 1 else "")
                (line,) = ax.plot(*zip(*pts), ls="-" if amp == "none" else "--",
                                  marker=markers.get(other, "o") if x_key == "size" else "o",
                                  color=colors.get(v, "gray"), label=name, ms=4)
                legend.setdefault(name, line)
            _log_axis(ax)
            ax.set_xscale("log", base=2) if x_key == "batch" else None
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs], fontsize=7)
            ax.minorticks_off() if x_key == "batch" else None
            if x_key == "batch":
                _log_axis(ax)  # (minorticks_off cleared the y minor ticks too)
            ax.set_xlim(xs[0] / (1.25 if x_key == "batch" else 1.04), xs[-1] * (1.25 if x_key == "batch" else 1.04))
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{mode}: " + ("images / s" if key == "images_per_s" else "peak MB"), fontsize=8)
            if row == 0:
                ax.set_title(m, fontsize=9)
            ax.set_xlabel(x_label, fontsize=7)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(6, len(legend)),
                   fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    return common.save_figure(fig, path)


def profile_table(call: Callable[[], object], rows: int) -> str:
    """The ``rows`` operators with the most self CPU time in one call of ``call`` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with common._quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
