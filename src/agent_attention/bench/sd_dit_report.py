"""Tables, goal lines and a plot from ``bench sd --model pixart|sd3|flux|wan`` runs.

    python -m agent_attention.bench.sd_dit_report docs/bench/sd_dit_runs/*.json --out docs/bench

A case measured by several runs is taken from the run named last.

Goals (wall time, one process, all threads): each transformer block ≥ 3× faster with AgentSD than
with the stock SDPA attention at 2048², ≥ 5× on the 81-frame video block, the reduced model's whole
forward ≥ 2× at 2048²; at 1024² the ratios are reported.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import common

__all__ = ["rows", "goal_lines", "markdown", "plot", "main"]

LABELS = {"baseline": "baseline (SDPA)", "todo": "ToDo (same K/V count)", "agentsd": "AgentSD",
          "agentsd+merge": "AgentSD + merged cross-attn/MLP"}
AGENTSD = ("agentsd", "agentsd+merge")
BLOCK_NAMES = {"transformer_blocks": "block", "single_transformer_blocks": "single block", "blocks": "block"}
GOALS = [  # (what, size predicate, per-block?, target)
    ("per transformer block ≥ 3× at 2048²", lambda r: r["size"] == "2048²", True, 3.0),
    ("per transformer block ≥ 5× on the 81-frame video", lambda r: r["size"].endswith("×81"), True, 5.0),
    ("reduced model's whole forward ≥ 2× at 2048²", lambda r: r["size"] == "2048²", False, 2.0),
]


def _records(runs: Sequence[dict]) -> List[dict]:
    """Every record, a later run replacing an earlier one's record of the same case (model, size,
    dtype, method): a re-measured case is passed after the run it corrects."""
    latest: Dict[tuple, dict] = {}
    for run in runs:
        for r in run["records"]:
            latest[(r["model"], r["size"], r["dtype"], r["method"])] = dict(r, machine=run.get("machine", {}))
    return list(latest.values())


def _base(records: List[dict], r: dict) -> Optional[dict]:
    return next((b for b in records if b["method"] == "baseline" and (b["model"], b["size"], b["dtype"]) ==
                 (r["model"], r["size"], r["dtype"])), None)


def rows(runs: Sequence[dict]):
    """``(headers, rows)``: one row per model, size, dtype and method."""
    records = _records(runs)
    headers = ["model", "size", "image tokens", "dtype", "method", "forward s (wall)", "speed-up", "CPU s", "speed-up (CPU)",
               "block s (wall)", "block speed-up", "block speed-up (CPU)", "peak MiB", "agent calls"]
    out = []
    for r in records:
        b = _base(records, r) or r
        for kind, t in r["blocks"].items():
            bt = b["blocks"].get(kind, t)
            calls = r.get("calls") or {}
            out.append([r["title"], r["size"], str(r["tokens"]), r["dtype"], LABELS.get(r["method"], r["method"]),
                        f"{r['seconds']:.3g}", common.fmt_ratio(b["seconds"] / r["seconds"]), f"{r['cpu_seconds']:.3g}",
                        common.fmt_ratio(b["cpu_seconds"] / r["cpu_seconds"]),
                        f"{BLOCK_NAMES.get(kind, kind)} {t['seconds']:.3g}", common.fmt_ratio(bt["seconds"] / t["seconds"]),
                        common.fmt_ratio(bt["cpu_seconds"] / t["cpu_seconds"]), common.fmt_mb(r.get("peak_bytes")),
                        ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) or "—"])
    return headers, out


def goal_lines(runs: Sequence[dict]) -> List[str]:
    """One line per goal and measured case: the ratio, met or missed by how much."""
    records = _records(runs)
    lines = []
    for what, applies, per_block, target in GOALS:
        for r in records:
            if r["method"] not in AGENTSD or not applies(r):
                continue
            b = _base(records, r)
            if b is None:
                continue
            cases = ([(BLOCK_NAMES.get(k, k), b["blocks"][k]["seconds"] / t["seconds"]) for k, t in r["blocks"].items()]
                     if per_block else [("forward", b["seconds"] / r["seconds"])])
            for part, ratio in cases:
                verdict = "met" if ratio >= target else f"MISSED by {target / ratio:.2f}×"
                lines.append(f"goal: {what}: {r['title']} {r['size']} {r['dtype']} {LABELS[r['method']]} {part}: "
                             f"{ratio:.2f}× — {verdict}")
    for r in records:
        if r["method"] in AGENTSD and r["size"] == "1024²" and (b := _base(records, r)) is not None:
            parts = ", ".join(f"{BLOCK_NAMES.get(k, k)} {b['blocks'][k]['seconds'] / t['seconds']:.2f}×" for k, t in r["blocks"].items())
            lines.append(f"report: 1024² {r['title']} {r['dtype']} {LABELS[r['method']]}: forward "
                         f"{b['seconds'] / r['seconds']:.2f}×, {parts}")
    return lines


def markdown(runs: Sequence[dict]) -> str:
    machines = sorted({common.machine_line(run["machine"]) for run in runs if run.get("machine")})
    headers, table = rows(runs)
    text = ["Machines: " + "; ".join(machines) if machines else "",
            "Reduced models (random weights, released widths): seconds of one denoiser forward and of each transformer "
            "block inside it (forward hooks), medians over rounds that alternate the methods; speed-ups over the stock "
            "SDPA attention.", common.markdown_table(headers, table), "Goals:", "\n".join(f"- {g}" for g in goal_lines(runs))]
    for run in runs:
        profiles = run.get("profile") or []
        for prof in [profiles] if isinstance(profiles, dict) else profiles:  # one dict in older runs
            text.append(f"Profile, {run['records'][0]['title']} {prof['size']}, {LABELS.get(prof['method'], prof['method'])} "
                        f"(torch.profiler, top operators by self CPU time):\n\n```\n{prof['table']}\n```")
    return "\n\n".join(t for t in text if t)


def plot(runs: Sequence[dict], path: Path) -> Path:
    """Per model and size: block and forward speed-ups of ToDo and AgentSD, with the goals."""
    records = _records(runs)
    tokens = {(r["title"], r["size"], r["dtype"]): r["tokens"] for r in records}
    cases = sorted(tokens, key=lambda c: (c[0], tokens[c], c[2]))
    fig, (ax,) = common.new_figure(1, width=max(9.0, 1.05 * len(cases)), height=5.2)
    xs = range(len(cases))
    present = [m for m in ("todo",) + AGENTSD if any(r["method"] == m for r in records)]
    bars = [(m, w) for m in present for w in ("block", "forward")]
    width = 0.8 / max(len(bars), 1)
    for j, (method, what) in enumerate(bars):
        ys = []
        for title, size, dtype in cases:
            r = next((x for x in records if (x["title"], x["size"], x["dtype"], x["method"]) == (title, size, dtype, method)), None)
            b = r and _base(records, r)
            if not b:
                ys.append(0.0)
            elif what == "forward":
                ys.append(b["seconds"] / r["seconds"])
            else:
                ys.append(min(b["blocks"][k]["seconds"] / t["seconds"] for k, t in r["blocks"].items()))
        ax.bar([x + (j - (len(bars) - 1) / 2) * width for x in xs], ys, width, label=f"{LABELS[method]}, {what}")
    for target in (2, 3, 5):
        ax.axhline(target, color="grey", ls=":", lw=0.8)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{t}\n{s}\n{d}" for t, s, d in cases], fontsize=7)
    ax.set_ylabel("speed-up over SDPA (wall; block: the slowest kind)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)  # below: hides no bar
    ax.grid(alpha=0.3, axis="y")
    infos = [run["machine"] for run in runs if run.get("machine")]
    cpus = sorted({common.machine_line(i).split(";")[0] for i in infos})
    loads = [i["load_avg_1min"] for i in infos if "load_avg_1min" in i]
    load = f"; load average {min(loads):g}-{max(loads):g} at the starts" if loads else ""
    fig.suptitle("AgentSD on DiTs (reduced models, released widths); dotted: goals 2×, 3×, 5×\n" + "; ".join(cpus) + load,
                 fontsize=8)
    return common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent_attention.bench.sd_dit_report", description=common.description(__doc__))
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench sd --model ...")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for sd_dit.md, sd_dit.json, sd_dit.png")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    args = p.parse_args(argv)
    runs = [json.loads(f.read_text()) for f in args.runs]
    md = markdown(runs)
    print(md)
    for path in common.write_outputs(args.out, "sd_dit", md, {"runs": runs}):
        print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(runs, args.out / 'sd_dit.png')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
