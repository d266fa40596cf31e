"""``agent-attention bench op``: how the agent attention op scales with the number of tokens.

Three ways to attend over an ``H × W`` grid of tokens with the heads of Agent-PVT stage 1
(C = 64, one head of 64 channels, 9 agents, biases built for the 56 × 56 grid of a 224 image):

* ``agent``: :func:`agent_attention.functional.agent_attention` (two fused SDPA calls, biases
  broadcast over the batch);
* ``straightforward``: the same agent attention written as explicit matmuls and softmaxes with the
  biases ``repeat``-ed per batch item (how the official code does it) — the baseline of this
  benchmark only, not used by the library;
* ``sdpa``: ordinary softmax attention over all ``N`` tokens,
  ``F.scaled_dot_product_attention(q, k, v)`` (cost ``O(N²)``).

All three receive the same ``q, k, v`` (and the agents pooled from ``q`` and the biases for this
grid, computed once outside the timed region). Prints a table with ratios and writes
``op.md``/``op.json``/``op.png`` (log-log time and peak memory against ``N``).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import agent_attention
from ..layers import AgentAttention, agent_bias_2d, pool_agents, query_bias_2d
from . import common

METHODS = ("agent", "straightforward", "sdpa")
LABELS = {
    "agent": "agent_attention (fused)",
    "straightforward": "straightforward agent attention",
    "sdpa": "SDPA softmax attention",
}
DEFAULT_SIZES = (28, 56, 96, 128, 192)


def straightforward_agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor,
                                    query_bias: Tensor, scale: float) -> Tensor:
    """Agent attention as the official code computes it: explicit maps, biases copied per batch item."""
    B = q.shape[0]
    attn = (agents * scale) @ k.transpose(-2, -1) + agent_bias.repeat(B, 1, 1, 1)
    agent_v = attn.softmax(dim=-1) @ v
    attn = (q * scale) @ agents.transpose(-2, -1) + query_bias.repeat(B, 1, 1, 1)
    return attn.softmax(dim=-1) @ agent_v


def make_inputs(side: int, *, batch: int, dim: int, heads: int, agents: int, window: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    """q, k, v ``(B, h, N, d)``, pooled agents ``(B, h, n, d)`` and the module's biases for this grid."""
    torch.manual_seed(seed)
    module = AgentAttention(dim, heads, agents, window=window, qkv_layout="split")
    p = math.isqrt(agents)
    hw = (side, side)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, side * side, dim, generator=g) for _ in range(3))
    with torch.no_grad():
        agent_bias = agent_bias_2d(module.an_bias, module.ah_bias, module.aw_bias, hw, (p, p))[None]
        query_bias = query_bias_2d(module.na_bias, module.ha_bias, module.wa_bias, hw, (p, p))[None]
        pooled = pool_agents(q, hw, (p, p))
    d = dim // heads

    def split(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, d)).transpose(1, 2).contiguous().to(device, dtype)

    return {
        "q": split(q), "k": split(k), "v": split(v), "agents": split(pooled),
        "agent_bias": agent_bias.to(device, dtype), "query_bias": query_bias.to(device, dtype),
        "scale": d ** -0.5,
    }


def _sdpa_estimate(t: Dict[str, Tensor]) -> int:
    """Bytes SDPA would need beyond its output: ~2·B·h·N² for the math backend, O(N·d) for fused ones."""
    q = t["q"]
    B, h, N, d = q.shape
    try:
        from torch.nn.attention import SDPBackend

        backend = SDPBackend(torch._fused_sdp_choice(q, t["k"], t["v"]))
        fused = backend != SDPBackend.MATH
    except Exception:  # private API moved: assume the worst
        fused = False
    return B * h * N * d * q.element_size() * 4 if fused else 2 * B * h * N * N * q.element_size()


def _functions(t: Dict[str, Tensor], methods: Sequence[str]):
    fns = {
        "agent": lambda: agent_attention(t["q"], t["k"], t["v"], t["agents"], agent_bias=t["agent_bias"],
                                         query_bias=t["query_bias"], scale=t["scale"]),
        "straightforward": lambda: straightforward_agent_attention(
            t["q"], t["k"], t["v"], t["agents"], t["agent_bias"], t["query_bias"], t["scale"]),
        "sdpa": lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
    }
    return {m: fns[m] for m in methods}


def run(sizes: Sequence[int], *, batch: int, dim: int, heads: int, agents: int, window: int,
        dtype: torch.dtype, device: torch.device, repeats: int, mem_budget: float, methods: Sequence[str],
        max_s: float, stat: str = "median", log=print) -> List[dict]:
    """Measure every method at every grid side; returns one record per (side, method)."""
    records = []
    for side in sizes:
        t = make_inputs(side, batch=batch, dim=dim, heads=heads, agents=agents, window=window,
                        dtype=dtype, device=device)
        N = side * side
        fns = _functions(t, methods)
        skipped: Dict[str, str] = {}
        if "sdpa" in fns and _sdpa_estimate(t) > mem_budget:
            skipped["sdpa"] = f"skipped (would need {_sdpa_estimate(t) / 2**30:.1f} GB)"
            del fns["sdpa"]
        with torch.inference_mode():
            check = None
            if "agent" in fns and "straightforward" in fns:
                check = (fns["agent"]().float() - fns["straightforward"]().float()).abs().max().item()
            memory = {m: common.peak_memory(fn, device) for m, fn in fns.items()}
            timings = common.time_round_robin(fns, device, repeats=repeats, max_s_per_fn=max_s, warmed=True)
        for m in methods:
            rec = {"side": side, "tokens": N, "method": m, "batch": batch, "heads": heads, "dtype": str(dtype).replace("torch.", "")}
            if m in skipped:
                rec["skipped"] = skipped[m]
            else:
                rec.update(seconds=timings[m].stat(stat), seconds_median=timings[m].median, seconds_min=timings[m].best,
                           samples=timings[m].samples, peak_bytes=memory[m])
            if m == "agent" and check is not None:
                rec["max_abs_diff_vs_straightforward"] = check
            records.append(rec)
        log(f"  {side}x{side} ({N} tokens): " + ", ".join(
            f"{m} {common.fmt_ms(timings[m].stat(stat))} ms" if m in timings else f"{m} {skipped[m]}" for m in methods))
        del t, fns
    return records


def _get(records, side, method, key):
    for r in records:
        if r["side"] == side and r["method"] == method:
            return r.get(key)
    return None


def table(records: List[dict], methods: Sequence[str]):
    """Headers and rows: times, peak memories and the ratios against ``agent``."""
    sides = sorted({r["side"] for r in records})
    headers = ["grid", "tokens N"] + [f"{m} ms" for m in methods] + [f"{m} MB" for m in methods]
    others = [m for m in methods if m != "agent"]
    if "agent" in methods:
        headers += [f"time {m}/agent" for m in others] + [f"mem {m}/agent" for m in others]
    rows = []
    for s in sides:
        sec = {m: _get(records, s, m, "seconds") for m in methods}
        mem = {m: _get(records, s, m, "peak_bytes") for m in methods}
        row = [f"{s}×{s}", f"{s * s:,}"]
        row += [common.fmt_ms(sec[m]) if sec[m] is not None else (_get(records, s, m, "skipped") or "—") for m in methods]
        row += [common.fmt_mb(mem[m]) for m in methods]
        if "agent" in methods:
            ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
            row += [common.fmt_ratio(ratio(sec[m], sec["agent"])) for m in others]
            row += [common.fmt_ratio(ratio(mem[m], mem["agent"])) for m in others]
        rows.append(row)
    return headers, rows


def slopes(records: List[dict], methods: Sequence[str], key: str, last: int = 3) -> Dict[str, Optional[float]]:
    """Growth exponent of ``key`` against N over the ``last`` largest measured sizes."""
    out = {}
    for m in methods:
        pts = sorted((r["tokens"], r[key]) for r in records if r["method"] == m and r.get(key))
        pts = pts[-last:]
        out[m] = common.loglog_slope([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot(records: List[dict], methods: Sequence[str], path: Path, title: str) -> Path:
    """Log-log time and peak memory against N, with ∝N / ∝N² guides through the largest points."""
    fig, (ax_t, ax_m) = common.new_figure(2)
    styles = {"agent": ("tab:green", "o"), "straightforward": ("tab:orange", "s"), "sdpa": ("tab:red", "^")}
    all_n = sorted({r["tokens"] for r in records})
    panels = ((ax_t, "seconds", "time per call (ms)", 1e3), (ax_m, "peak_bytes", "peak extra memory (MB)", 2.0**-20))

    def series(m, key, scale):
        return sorted((r["tokens"], r[key] * scale) for r in records if r["method"] == m and r.get(key))

    for ax, key, ylabel, scale in panels:
        for m in methods:
            pts = series(m, key, scale)
            if pts:
                color, marker = styles[m]
                ax.plot(*zip(*pts), marker=marker, color=color, label=LABELS[m])
        guides = [(1, "agent", ":")] + ([(2, "sdpa", "--")] if key == "seconds" else [])
        for slope, anchor, ls in guides:
            pts = series(anchor, key, scale)
            if pts and len(all_n) > 1:
                n0, y0 = pts[-1]
                xs = [all_n[0], all_n[-1]]
                ax.plot(xs, [y0 * (x / n0) ** slope for x in xs], ls, color="gray", lw=1,
                        label="∝ N² guide" if slope == 2 else "∝ N guide")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N = H·W")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    # What softmax attention needs when the N×N map is materialised (math backend, official code).
    r0 = records[0]
    elem = torch.empty((), dtype=getattr(torch, r0["dtype"])).element_size()
    ax_m.plot(all_n, [r0["batch"] * r0.get("heads", 1) * n * n * elem / 2**20 for n in all_n], "--", color="tab:red",
              alpha=0.5, lw=1, label="N×N score matrix, if materialised")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return common.save_figure(fig, path)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtypes(names: Sequence[str], device: torch.device) -> List[torch.dtype]:
    if list(names) == ["auto"]:
        return [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"--dtype must be auto or some of float32, float16, bfloat16; got {bad}")
    return list(dict.fromkeys(DTYPES[n] for n in names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench op", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="grid sides H=W (tokens N = side²)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=64, help="channels C (Agent-PVT stage 1: 64)")
    p.add_argument("--heads", type=int, default=1, help="heads (Agent-PVT stage 1: 1)")
    p.add_argument("--agents", type=int, default=9, help="agent tokens, a square (Agent-PVT stage 1: 9)")
    p.add_argument("--window", type=int, default=56, help="grid the biases are built for (stage 1 at 224: 56)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", nargs="+", default=["auto"],
                   help="auto (fp32 on CPU; fp16 and bf16 on CUDA) or some of float32, float16, bfloat16")
    common.add_timing_options(p, repeats=5, max_seconds=40.0, unit="method")
    p.add_argument("--mem-budget-gb", type=float, default=4.0, help="skip configurations estimated to need more")
    common.add_output_options(p, "op")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    for name, value in (("--sizes", min(args.sizes)), ("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    info = common.machine_info(device)
    print(f"bench op on {common.machine_line(info)}")
    print(f"C={args.dim}, heads={args.heads}, agents={args.agents}, batch={args.batch}, bias grid {args.window}²")
    records: List[dict] = []
    sections = []
    for dtype in _dtypes(args.dtype, device):
        name = str(dtype).replace("torch.", "")
        print(f"[{name} on {device}]")
        recs = run(args.sizes, batch=args.batch, dim=args.dim, heads=args.heads, agents=args.agents,
                   window=args.window, dtype=dtype, device=device, repeats=args.repeats,
                   mem_budget=args.mem_budget_gb * 2**30, methods=args.methods, max_s=args.max_seconds,
                   stat=args.stat)
        records += recs
        headers, rows = table(recs, args.methods)
        ts, ms = slopes(recs, args.methods, "seconds"), slopes(recs, args.methods, "peak_bytes")
        growth = "; ".join(
            f"{m}: time ∝ N^{ts[m]:.2f}, memory ∝ N^{ms[m]:.2f}" for m in args.methods
            if ts.get(m) is not None and ms.get(m) is not None)
        diffs = [r["max_abs_diff_vs_straightforward"] for r in recs if "max_abs_diff_vs_straightforward" in r]
        print(common.text_table(headers, rows))
        print(f"growth over the largest sizes: {growth}")
        if diffs:
            print(f"max |agent - straightforward| = {max(diffs):.2e}")
        sections.append(
            f"### {name} on {device}\n\n" + common.markdown_table(headers, rows)
            + f"\n\nGrowth over the largest sizes: {growth}." + (f" Max |agent − straightforward| = {max(diffs):.1e}." if diffs else "")
        )
        if not args.no_plot:
            png = plot(recs, args.methods, args.out / ("op.png" if len(sections) == 1 else f"op_{name}.png"),
                       f"agent attention vs softmax attention — C={args.dim}, {args.heads} head(s), "
                       f"{args.agents} agents, batch {args.batch}, {name}\n{common.machine_line(info, wrap=True)}")
            print(f"wrote {png}")
    md = (
        f"Machine: {common.machine_line(info)}\n\nC={args.dim}, heads={args.heads}, agents={args.agents}, "
        f"batch={args.batch}, biases built for a {args.window}×{args.window} grid. Times: {args.stat} of up to "
        f"{args.repeats} rounds; memory: peak extra bytes allocated by one call (output included). "
        f"`time X/agent` (`mem X/agent`) = how many times longer (more memory) X takes than `agent_attention`.\n\n"
        + "\n\n".join(sections)
    )
    for path in common.write_outputs(args.out, "op", md, {"machine": info, "args": vars(args), "records": records}):
        print(f"wrote {path}")
    return 0
