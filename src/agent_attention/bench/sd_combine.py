"""One table, goal lines and plot from several ``bench sd`` runs (sizes × precisions × batches).

``python -m agent_attention.bench.sd_combine RUN_DIR [RUN_DIR ...] --out DIR`` reads each run's
``sd.json`` and writes ``DIR/sd.md``, ``DIR/sd.json`` (the runs, verbatim) and ``DIR/sd.png``.
Each run is one ``bench sd --sizes S --dtype D --batch B`` call: the ratios of one row were timed
in the same interleaved rounds; rows of different runs are separate processes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import common

__all__ = ["GOALS", "rows", "goals", "main"]

EARLY = 0.4  # the paper's schedule: agents for 40 % of the steps (20 of 50), ToMe 2x2 for the rest
# the goals: (size, dtype, method) -> minimum speed-up over the baseline (wall time)
GOALS = {(512, "fp32", "agentsd"): 1.3, (512, "bf16", "agentsd"): 1.7, (512, "fp32", "schedule"): 1.2,
         (512, "bf16", "schedule"): 1.5, (1024, "fp32", "agentsd"): 1.8}
COLUMNS = ("tomesd", "todo", "agentsd", "agentsd-late", "schedule")
NAMES = {"tomesd": "ToMeSD", "todo": "ToDo", "agentsd": "AgentSD 1st phase", "agentsd-late": "AgentSD 2nd phase",
         "schedule": "AgentSD schedule"}


def _dtype(run: dict) -> str:
    return run["args"].get("dtype") or "fp32"


def _seconds(run: dict, ratio: float) -> Dict[str, float]:
    """Median wall seconds per step of every method of a run at ``ratio`` (and the schedule's mean)."""
    out = {}
    for r in run["records"]:
        if r["method"] == "baseline" or abs(r["ratio"] - ratio) < 1e-9:
            out[r["method"]] = r["seconds"]
    if "agentsd" in out and "agentsd-late" in out:
        out["schedule"] = EARLY * out["agentsd"] + (1 - EARLY) * out["agentsd-late"]
    return out


def rows(runs: Sequence[dict], ratio: float = 0.4) -> List[dict]:
    """One row per run: size, dtype, batch, rounds, baseline seconds and each method's speed-up."""
    out = []
    for run in runs:
        sec = _seconds(run, ratio)
        out.append(dict(size=run["records"][0]["size"], dtype=_dtype(run), batch=run["args"]["batch"],
                        rounds=run["args"]["repeats"], baseline=sec["baseline"],
                        speedup={m: sec["baseline"] / sec[m] for m in COLUMNS if m in sec},
                        agentsd_vs={m: sec[m] / sec["agentsd"] for m in ("tomesd", "todo") if m in sec and "agentsd" in sec}))
    return sorted(out, key=lambda r: (r["size"], r["dtype"] != "fp32", r["batch"]))


def goals(table: Sequence[dict]) -> List[str]:
    """The AgentSD speed goals, met or missed by a factor (worst batch of each size and precision)."""
    lines = []
    for (size, dtype, method), goal in GOALS.items():
        got = [(r["speedup"][method], r["batch"]) for r in table
               if r["size"] == size and r["dtype"] == dtype and method in r["speedup"]]
        if got:
            x, b = min(got)
            verdict = "met" if x >= goal else f"missed by {goal / x:.2f}×"
            lines.append(f"* {size}² {dtype}, {NAMES[method]} ≥ {goal}× the baseline: {verdict} "
                         f"({', '.join(f'batch {bb}: {xx:.2f}×' for xx, bb in sorted(got, key=lambda t: t[1]))})")
    for m in ("tomesd", "todo"):
        got = [(r["agentsd_vs"][m], r["size"], r["dtype"], r["batch"]) for r in table if m in r["agentsd_vs"]]
        if got:
            x, size, dtype, b = min(got)
            verdict = "met" if x > 1.0 else f"missed by {1 / x:.2f}× ({size}² {dtype} batch {b})"
            lines.append(f"* AgentSD 1st phase faster than {NAMES[m]} at the same token reduction, every run: "
                         f"{verdict} (range {min(got)[0]:.2f}-{max(got)[0]:.2f}×)")
    return lines


def markdown(table: Sequence[dict]) -> str:
    headers = ["image", "dtype", "batch", "rounds", "baseline s/step"] + [NAMES[m] for m in COLUMNS] + [
        "AgentSD / ToMeSD", "AgentSD / ToDo"]
    body = []
    for r in table:
        body.append([f"{r['size']}²", r["dtype"], str(r["batch"]), str(r["rounds"]), f"{r['baseline']:.3g}"]
                    + [common.fmt_ratio(r["speedup"].get(m)) for m in COLUMNS]
                    + [common.fmt_ratio(r["agentsd_vs"].get(m)) for m in ("tomesd", "todo")])
    return common.markdown_table(headers, body)


def plot(table: Sequence[dict], path: Path, title: str) -> Path:
    fig, (ax,) = common.new_figure(1, width=9.0)
    labels = [f"{r['size']}² {r['dtype']} b{r['batch']}" for r in table]
    width = 0.8 / len(COLUMNS)
    for i, m in enumerate(COLUMNS):
        ax.bar([k + (i - (len(COLUMNS) - 1) / 2) * width for k in range(len(table))],
               [r["speedup"].get(m, 0.0) for r in table], width, label=NAMES[m])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(table)), labels, fontsize=8)
    ax.set_ylabel("speed-up over diffusers SDPA (wall time per UNet step)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=7, ncol=len(COLUMNS), frameon=False)  # below: hides no bar
    fig.suptitle(title, fontsize=8)
    return common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent_attention.bench.sd_combine", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="output folders of `bench sd` runs (each with sd.json)")
    p.add_argument("--ratio", type=float, default=0.4, help="merging ratio to tabulate (default 0.4)")
    p.add_argument("--out", type=Path, required=True, help="folder for sd.md, sd.json, sd.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    runs = []
    for d in args.runs:
        f = d / "sd.json" if d.is_dir() else d
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            p.error(f"cannot read a bench sd result from {f}: {e}")
    table = rows(runs, args.ratio)
    lines = goals(table)
    info = runs[0].get("machine") or {}
    machine = common.machine_line(info) if "cpu" in info else "machine not recorded"
    md = (f"Machine (first run): {machine}\n\nSpeed-ups over diffusers' fused SDPA UNet (wall time per UNet step, "
          f"median of the rounds; r = {args.ratio:g}; ToDo keeps as many keys/values as ToMe keeps tokens). "
          f"Each row is one `bench sd` process with interleaved rounds.\n\n" + markdown(table)
          + "\n\n### Goals\n\n" + "\n".join(lines) + "\n")
    print(md)
    written = common.write_outputs(args.out, "sd", md, {"runs": runs})
    if not args.no_plot:
        wrapped = common.machine_line(info, wrap=True) if "cpu" in info else machine
        written.append(plot(table, args.out / "sd.png", f"AgentSD vs ToMeSD vs ToDo, SD-1.5 UNet\n{wrapped}"))
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
