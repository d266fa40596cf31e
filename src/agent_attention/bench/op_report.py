"""Tables, goal lines and the plot of ``agent-attention bench op`` (records from :func:`bench.op.run`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from . import common

LABELS = {
    "agent": "agent_attention (auto)",
    "flex": "agent_attention (flex path)",
    "math": "agent_attention_math",
    "straightforward": "straightforward (official-style)",
    "sdpa": "SDPA softmax attention",
    "floor": "memory floor (copy of the operands)",
}
STYLES = {"agent": ("tab:green", "o"), "flex": ("tab:purple", "v"), "math": ("tab:blue", "D"), "straightforward": ("tab:orange", "s"),
          "sdpa": ("tab:red", "^"), "floor": ("gray", "x")}
# (numerator, denominator, column): op/math, sdpa/op, op/floor, straightforward/op
RATIOS = (("agent", "math", "op/math"), ("straightforward", "agent", "straightforward/op"),
          ("sdpa", "agent", "sdpa/op"), ("agent", "floor", "op/floor"), ("flex", "agent", "flex/op"))
GOAL_SIDE, GOAL_SDPA, GOAL_FLOOR = 128, 100.0, 3.0
GPU_GOAL_SDPA, GPU_GOAL_FLOOR = 10.0, 2.0  # on CUDA: ≥ 10× FlashAttention over all tokens, ≤ 2× the floor


def _get(records, side, method, key):
    for r in records:
        if r["side"] == side and r["method"] == method:
            return r.get(key)
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def table(records: List[dict], methods: Sequence[str]):
    """Headers and rows of one (pass, bias): times, peak memories and the ratios."""
    sides = sorted({r["side"] for r in records})
    mem_methods = [m for m in methods if m != "floor"]
    ratios = [(a, b, name) for a, b, name in RATIOS if a in methods and b in methods]
    headers = (["grid", "tokens N"] + [f"{m} ms" for m in methods] + [f"{m} MB" for m in mem_methods]
               + [name for _, _, name in ratios])
    rows = []
    for s in sides:
        sec = {m: _get(records, s, m, "seconds") for m in methods}
        row = [f"{s}×{s}", f"{s * s:,}"]
        row += [common.fmt_ms(sec[m]) if sec[m] is not None else (_get(records, s, m, "skipped") or "—") for m in methods]
        row += [common.fmt_mb(_get(records, s, m, "peak_bytes")) for m in mem_methods]
        row += [common.fmt_ratio(_ratio(sec[a], sec[b])) for a, b, _ in ratios]
        rows.append(row)
    return headers, rows


def goals(records: List[dict], cuda: bool = False) -> List[str]:
    """The goals, met or missed by a factor: the op never slower than the math path (every size, bias
    and pass) and, at 128² with the biases (forward), ≥ 100× SDPA softmax attention and within 3× of
    the memory floor on the CPU; ≥ 10× and within 2× on CUDA."""
    goal_sdpa, goal_floor = (GPU_GOAL_SDPA, GPU_GOAL_FLOOR) if cuda else (GOAL_SDPA, GOAL_FLOOR)
    lines = []
    for ps in sorted({r["pass"] for r in records}):
        worst = None
        for r in records:
            if r["pass"] != ps or r["method"] != "agent" or "seconds" not in r:
                continue
            m = [x for x in records if x["pass"] == ps and x["bias"] == r["bias"] and x["side"] == r["side"]
                 and x["method"] == "math" and "seconds" in x]
            if m:
                ratio = r["seconds"] / m[0]["seconds"]
                if worst is None or ratio > worst[0]:
                    worst = (ratio, r["side"], r["bias"])
        if worst:
            verdict = "met" if worst[0] <= 1.0 else f"missed by {worst[0]:.2f}×"
            lines.append(f"* never slower than math, {ps}: {verdict} (worst op/math {worst[0]:.2f}× at "
                         f"{worst[1]}², {'with' if worst[2] else 'without'} biases)")
    sub = [r for r in records if r["side"] == GOAL_SIDE and r["bias"] and r["pass"] == "fwd" and "seconds" in r]
    sec = {r["method"]: r["seconds"] for r in sub}
    if "agent" in sec:
        n = sub[0]["agents"]
        if "sdpa" in sec:
            x = sec["sdpa"] / sec["agent"]
            verdict = "met" if x >= goal_sdpa else f"missed by {goal_sdpa / x:.2f}×"
            lines.append(f"* {GOAL_SIDE}², {n} agents, biases, fwd: sdpa/op {x:.0f}× (goal ≥ {goal_sdpa:.0f}×): {verdict}")
        if "floor" in sec:
            x = sec["agent"] / sec["floor"]
            verdict = "met" if x <= goal_floor else f"missed by {x / goal_floor:.2f}×"
            lines.append(f"* {GOAL_SIDE}², {n} agents, biases, fwd: op/floor {x:.2f}× (goal ≤ {goal_floor:.0f}×): {verdict}")
    return lines


def plot(records: List[dict], methods: Sequence[str], path: Path, title: str) -> Path:
    """Log-log time against N per method: one panel per bias setting; forward solid, fwd+bwd dashed."""
    biases = sorted({r["bias"] for r in records}, reverse=True)
    fig, axes = common.new_figure(len(biases))
    for ax, b in zip(axes, biases):
        for ps, ls in (("fwd", "-"), ("fwdbwd", "--")):
            for m in methods:
                pts = sorted((r["tokens"], r["seconds"] * 1e3) for r in records
                             if r["method"] == m and r["bias"] == b and r["pass"] == ps and r.get("seconds"))
                if pts:
                    color, marker = STYLES[m]
                    ax.plot(*zip(*pts), ls, marker=marker, color=color, label=LABELS[m] if ps == "fwd" else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N = H·W")
        ax.set_ylabel("time per call (ms)")
        ax.set_title("with agent biases" if b else "without agent biases", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.plot([], [], "-", color="black", label="forward")
        ax.plot([], [], "--", color="black", label="forward + backward")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return common.save_figure(fig, path)
