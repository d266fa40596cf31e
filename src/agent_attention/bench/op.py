"""agent-attention bench op: how the agent attention op scales with the number of tokens.

Attention over an ``H × W`` grid of tokens with the heads of Agent-PVT stage 1 (C = 64, one head
of 64 channels, 49 agents, biases built for the 56 × 56 grid of a 224 image), with and without the
agent biases (``--bias``), forward and (``--backward``) forward + backward:

* ``agent``: :func:`agent_attention.functional.agent_attention` (its ``auto`` kernel choice);
* ``flex`` (opt-in, ``--methods``): the op on its FlexAttention path (biases in factored form,
  evaluated per logit; compiled, so its first call at each size compiles);
* ``math``: :func:`agent_attention.functional.agent_attention_math` (the reference);
* ``straightforward``: the same agent attention written as the official code does it (explicit
  maps, biases ``repeat``-ed per batch item) — a baseline of this benchmark only;
* ``sdpa``: ordinary softmax attention over all ``N`` tokens, ``F.scaled_dot_product_attention``;
* ``floor``: the memory floor, a copy of the operand bytes (q, k, v, agents and biases; in
  forward + backward also the output gradient) into a preallocated buffer, timed the same way.

All methods of one grid size and pass are timed in the same interleaved rounds. Prints tables with
ratios and the speed goals, writes ``op.md``/``op.json``/``op.png``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bias_factors import GridBias
from ..functional import agent_attention, agent_attention_math, path
from ..layers import AgentAttention, agent_bias_2d, pool_agents, query_bias_2d
from . import common
from .op_report import goals, plot, table

METHODS = ("agent", "flex", "math", "straightforward", "sdpa", "floor")
DEFAULT_METHODS = ("agent", "math", "straightforward", "sdpa", "floor")
BIAS_FREE = ("sdpa",)  # methods that do not take the agent biases: timed once per size and pass
BIAS_CHOICES = {"both": (True, False), "on": (True,), "off": (False,)}
DEFAULT_SIZES = (28, 56, 96, 128, 192)


def straightforward_agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Optional[Tensor],
                                    query_bias: Optional[Tensor], scale: float) -> Tensor:
    """Agent attention as the official code computes it: explicit maps, biases copied per batch item."""
    B = q.shape[0]
    attn = (agents * scale) @ k.transpose(-2, -1)
    if agent_bias is not None:
        attn = attn + agent_bias.repeat(B, 1, 1, 1)
    agent_v = attn.softmax(dim=-1) @ v
    attn = (q * scale) @ agents.transpose(-2, -1)
    if query_bias is not None:
        attn = attn + query_bias.repeat(B, 1, 1, 1)
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
    grid = {"agent_grid": GridBias("agent", *(module.get_parameter(n).detach().to(device, dtype) for n in
                                              ("an_bias", "ah_bias", "aw_bias")), hw, (p, p)),
            "query_grid": GridBias("query", *(module.get_parameter(n).detach().to(device, dtype) for n in
                                              ("na_bias", "ha_bias", "wa_bias")), hw, (p, p))}

    def split(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, d)).transpose(1, 2).contiguous().to(device, dtype)

    return {
        "q": split(q), "k": split(k), "v": split(v), "agents": split(pooled),
        "agent_bias": agent_bias.to(device, dtype), "query_bias": query_bias.to(device, dtype),
        "scale": d ** -0.5, **grid,
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


def _forward(method: str, x: Dict[str, Tensor], scale: float) -> Callable[[], Tensor]:
    ab, qb = x.get("agent_bias"), x.get("query_bias")
    q, k, v, a = x["q"], x["k"], x["v"], x["agents"]
    if method == "agent":
        return lambda: agent_attention(q, k, v, a, agent_bias=ab, query_bias=qb, scale=scale)
    if method == "flex":
        def flex():
            with path("flex"):
                return agent_attention(q, k, v, a, agent_bias=x.get("agent_grid", ab), query_bias=x.get("query_grid", qb),
                                       scale=scale)
        return flex
    if method == "math":
        return lambda: agent_attention_math(q, k, v, a, agent_bias=ab, query_bias=qb, scale=scale)
    if method == "straightforward":
        return lambda: straightforward_agent_attention(q, k, v, a, ab, qb, scale)
    if method == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown method {method!r}")


def _copy(tensors: Sequence[Tensor]) -> Callable[[], Tensor]:
    """A copy of the bytes of ``tensors`` into one preallocated buffer (reads and writes each once)."""
    flat = [t.detach().reshape(-1) for t in tensors]
    buf = torch.empty(sum(t.numel() for t in flat), dtype=flat[0].dtype, device=flat[0].device)
    return lambda: torch.cat(flat, out=buf)


def functions(t: Dict[str, Tensor], methods: Sequence[str], bias: bool, backward: bool) -> Dict[str, Callable]:
    """The timed callables of one (bias, pass): forward only, or forward + ``torch.autograd.grad``
    of every operand (no ``.grad`` accumulation); ``floor`` then copies the operands and, for the
    backward, the operands and the output gradient again (read grad_out, write the gradients)."""
    names = ["q", "k", "v", "agents"] + (["agent_bias", "query_bias"] if bias else [])
    operands = [t[n] for n in names]
    fns: Dict[str, Callable] = {}
    if not backward:
        for m in methods:
            grids = {n: t[n] for n in ("agent_grid", "query_grid")} if bias else {}
            fns[m] = _copy(operands) if m == "floor" else _forward(m, {**{n: t[n] for n in names}, **grids}, t["scale"])
        return fns
    leaves = {n: t[n].detach().clone().requires_grad_(True) for n in names}
    grad_out = torch.randn_like(t["q"])
    for m in methods:
        if m == "floor":
            fwd, bwd = _copy(operands), _copy(operands + [grad_out])
            fns[m] = lambda fwd=fwd, bwd=bwd: (fwd(), bwd())
            continue
        inputs = [leaves[n] for n in (("q", "k", "v") if m == "sdpa" else names)]
        f = _forward(m, leaves, t["scale"])  # flex: dense biases here (the factored ones are not leaves)
        fns[m] = lambda f=f, inputs=inputs: torch.autograd.grad(f(), inputs, grad_out)
    return fns


def run(sizes: Sequence[int], *, batch: int, dim: int, heads: int, agents: int, window: int,
        dtype: torch.dtype, device: torch.device, repeats: int, mem_budget: float, methods: Sequence[str],
        max_s: float, stat: str = "median", biases: Sequence[bool] = (True,), passes: Sequence[str] = ("fwd",),
        log=print) -> List[dict]:
    """Measure every method at every grid side, bias setting and pass; one record per combination.

    Per size and pass, all methods of all bias settings run in the same interleaved rounds; the
    bias-free ``sdpa`` is timed once and its record repeated for every bias setting."""
    records = []
    for side in sizes:
        t = make_inputs(side, batch=batch, dim=dim, heads=heads, agents=agents, window=window,
                        dtype=dtype, device=device)
        N = side * side
        skip = "sdpa" in methods and _sdpa_estimate(t) > mem_budget
        for ps in passes:
            backward = ps == "fwdbwd"
            fns: Dict[tuple, Callable] = {}
            no_flex = backward and device.type == "cpu"  # torch has no FlexAttention backward on the CPU
            for b in biases:
                timed = [m for m in methods if not (skip and m == "sdpa") and not (no_flex and m == "flex")]
                for m, fn in functions(t, timed, b, backward).items():
                    if m in BIAS_FREE and b != biases[0]:
                        continue
                    fns[(m, b)] = fn
            with torch.inference_mode(not backward):
                diffs = {}
                for b in biases:
                    for m in ("agent", "flex"):
                        if (m, b) in fns and ("math", b) in fns and not backward:
                            diffs[(m, b)] = (fns[(m, b)]().float() - fns[("math", b)]().float()).abs().max().item()
                memory = {key: common.peak_memory(fn, device) for key, fn in fns.items()}
                timings = common.time_round_robin(fns, device, repeats=repeats, max_s_per_fn=max_s, warmed=True)
            for b in biases:
                for m in methods:
                    key = (m, biases[0]) if m in BIAS_FREE else (m, b)
                    rec = {"side": side, "tokens": N, "method": m, "bias": b, "pass": ps, "batch": batch,
                           "heads": heads, "agents": agents, "dtype": str(dtype).replace("torch.", "")}
                    if key not in timings and m == "flex":
                        rec["skipped"] = "no CPU backward"
                    elif key not in timings:
                        rec["skipped"] = f"skipped (would need {_sdpa_estimate(t) / 2**30:.1f} GB)"
                    else:
                        tm = timings[key]
                        rec.update(seconds=tm.stat(stat), seconds_median=tm.median, seconds_min=tm.best,
                                   samples=tm.samples, peak_bytes=memory[key])
                    if m in ("agent", "flex") and (m, b) in diffs:
                        rec["max_abs_diff_vs_math"] = diffs[(m, b)]
                    records.append(rec)
            log(f"  {side}x{side} ({N} tokens) {ps}: " + ", ".join(
                f"{m}{'' if m in BIAS_FREE else ('+bias' if b else '')} {common.fmt_ms(tm.stat(stat))} ms"
                for (m, b), tm in timings.items()))
            del fns
        del t
    return records


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
    p = argparse.ArgumentParser(prog="agent-attention bench op", description=common.description(__doc__))
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="grid sides H=W, tokens N = side² (default 28 56 96 128 192)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dim", type=int, default=64, help="channels C (Agent-PVT stage 1: 64)")
    p.add_argument("--heads", type=int, default=1, help="heads (Agent-PVT stage 1: 1)")
    p.add_argument("--agents", type=int, default=49, help="agent tokens, a square (Agent-PVT: 49)")
    p.add_argument("--window", type=int, default=56, help="grid the biases are built for (stage 1 at 224: 56)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="methods to time, of " + ", ".join(METHODS) + " (default: all but flex)")
    p.add_argument("--bias", choices=tuple(BIAS_CHOICES), default="both",
                   help="with the agent biases (on), without (off) or both (default)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward (gradients of every operand)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", nargs="+", default=["auto"],
                   help="auto (fp32 on CPU; fp16 and bf16 on CUDA) or some of float32, float16, bfloat16")
    common.add_timing_options(p, repeats=5, max_seconds=40.0, unit="method")
    p.add_argument("--mem-budget-gb", type=float, default=4.0, help="skip configurations estimated to need more (GB)")
    common.add_output_options(p, "op")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    from .._dtypes import warn_slow_dtype

    device = common.resolve_device(args.device)
    for dtype in _dtypes(args.dtype, device):
        warn_slow_dtype(dtype, device, f"--dtype {str(dtype).replace('torch.', '')}", "agent-attention bench op")
    for name, value in (("--sizes", min(args.sizes)), ("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    if math.isqrt(args.agents) ** 2 != args.agents:
        raise ValueError(f"--agents must be a square number, got {args.agents}")
    common.set_threads(args.threads)
    info = common.machine_info(device)
    biases = BIAS_CHOICES[args.bias]
    passes = ("fwd", "fwdbwd") if args.backward else ("fwd",)
    print(f"bench op on {common.machine_line(info)}")
    print(f"C={args.dim}, heads={args.heads}, agents={args.agents}, batch={args.batch}, bias grid {args.window}², "
          f"bias {args.bias}, passes {' '.join(passes)}")
    records: List[dict] = []
    sections = []
    for dtype in _dtypes(args.dtype, device):
        name = str(dtype).replace("torch.", "")
        print(f"[{name} on {device}]")
        recs = run(args.sizes, batch=args.batch, dim=args.dim, heads=args.heads, agents=args.agents,
                   window=args.window, dtype=dtype, device=device, repeats=args.repeats,
                   mem_budget=args.mem_budget_gb * 2**30, methods=args.methods, max_s=args.max_seconds,
                   stat=args.stat, biases=biases, passes=passes)
        records += recs
        for ps in passes:
            for b in biases:
                sub = [r for r in recs if r["pass"] == ps and r["bias"] == b]
                headers, rows = table(sub, args.methods)
                title = f"{name} on {device}, {'forward' if ps == 'fwd' else 'forward + backward'}, " \
                        f"{'with' if b else 'without'} agent biases"
                diffs = [r["max_abs_diff_vs_math"] for r in sub if "max_abs_diff_vs_math" in r]
                note = f"Max |agent − math| = {max(diffs):.1e}." if diffs else ""
                print(f"{title}\n{common.text_table(headers, rows)}\n{note}")
                sections.append(f"### {title}\n\n{common.markdown_table(headers, rows)}\n\n{note}".rstrip())
        lines = goals(recs, cuda=device.type == "cuda")
        if lines:
            print(f"goals ({'GPU' if device.type == 'cuda' else 'CPU'}):\n" + "\n".join(lines))
            sections.append(f"### Goals, {name} on {device}\n\n" + "\n".join(lines))
        if not args.no_plot:
            png = plot(recs, args.methods, args.out / ("op.png" if dtype == _dtypes(args.dtype, device)[0] else f"op_{name}.png"),
                       f"agent attention — C={args.dim}, {args.heads} head(s), {args.agents} agents, "
                       f"batch {args.batch}, {name}\n{common.machine_line(info, wrap=True)}")
            print(f"wrote {png}")
    md = (
        f"Machine: {common.machine_line(info)}\n\nC={args.dim}, heads={args.heads}, agents={args.agents}, "
        f"batch={args.batch}, biases built for a {args.window}×{args.window} grid. Times: {args.stat} of up to "
        f"{args.repeats} interleaved rounds; memory: peak extra bytes allocated by one call (output and gradients "
        f"included). `op/math` = agent time / math time (< 1: the op is faster), `sdpa/op` = its speed-up over "
        f"softmax attention, `op/floor` = how far above a copy of the operand bytes it is.\n\n"
        + "\n\n".join(sections)
    )
    for path in common.write_outputs(args.out, "op", md, {"machine": info, "args": vars(args), "records": records}):
        print(f"wrote {path}")
    return 0
