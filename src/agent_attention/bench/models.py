"""``agent-attention bench models``: images/s and peak memory of the agent models.

Every T-size agent model is measured three ways at each input size, in the same process and in
interleaved rounds:

* ``agent``: the model as shipped (agent attention through fused SDPA kernels);
* ``math``: the same model and weights with the fused path switched off
  (``agent_attention.functional.fused(False)``: explicit attention maps) — what a straightforward
  implementation costs;
* ``softmax``: its softmax-attention counterpart from timm (random weights): DeiT-T →
  ``deit_tiny_patch16_224``; PVT-T → ``pvt_v2_b1`` (timm has no PVT v1; v2-b1 is the closest size,
  14.0 M parameters vs 13.2 M for PVT-v1-T and 11.6 M for Agent-PVT-T, and it uses
  spatial-reduction attention); Swin-T → ``swin_tiny_patch4_window7_224``; CSWin-T → none (timm
  has no CSWin).

Writes ``models.md``/``models.json``/``models.png``. ``--profile N`` also prints the N most
expensive operators of each agent model (torch.profiler), ``--compile`` adds a ``torch.compile``
variant, ``--channels-last`` feeds channels-last images.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..functional import fused
from . import common

#: agent model -> (timm softmax counterpart or None, note)
COUNTERPARTS = {
    "agent_deit_tiny": ("deit_tiny_patch16_224", ""),
    "agent_pvt_tiny": ("pvt_v2_b1", "PVT v1 is not in timm; pvt_v2_b1 is the closest size"),
    "agent_swin_tiny": ("swin_tiny_patch4_window7_224", ""),
    "agent_cswin_tiny": (None, "no CSWin in timm"),
}
DEFAULT_MODELS = tuple(COUNTERPARTS)
VARIANTS = ("agent", "math", "softmax")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _official(name: str) -> str:
    from ..models.registry import ALIASES

    return ALIASES.get(name, name)


def build(name: str, size: int, *, agent: bool) -> nn.Module:
    """An agent model (ours) or a timm model, random weights, eval mode, for ``size``² images."""
    if agent:
        from ..models import create_model

        model = create_model(name, img_size=size)
    else:
        import timm

        try:
            model = timm.create_model(name, pretrained=False, img_size=size)
        except TypeError:  # fully convolutional stems (pvt_v2) take no img_size
            model = timm.create_model(name, pretrained=False)
    return model.eval()


def _forward(model: nn.Module, x: torch.Tensor, context: Callable[[], contextlib.AbstractContextManager],
             dtype: torch.dtype = torch.float32):
    amp = dtype != torch.float32

    def run():
        with context(), torch.autocast(x.device.type, dtype=dtype, enabled=amp):
            return model(x)
    return run


def measure_size(names: Sequence[str], size: int, args, device: torch.device, log=print) -> List[dict]:
    """All variants of all models at one input size."""
    records: List[dict] = []
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch, 3, size, size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for name in names:
        official = _official(name)
        counterpart, note = COUNTERPARTS.get(official, (None, "no known softmax counterpart"))
        models: Dict[str, nn.Module] = {}
        errors: Dict[str, str] = {}
        try:
            models["agent"] = build(official, size, agent=True).to(device)
        except Exception as e:  # report, keep going with the other models
            errors["agent"] = f"{type(e).__name__}: {e}"
        if counterpart and "softmax" in args.variants:
            try:
                models["softmax"] = build(counterpart, size, agent=False).to(device)
            except Exception as e:
                errors["softmax"] = f"{type(e).__name__}: {e}"
        fns: Dict[str, Callable] = {}
        if "agent" in models:
            for v in args.variants:
                if v == "agent":
                    fns[v] = _forward(models["agent"], x, contextlib.nullcontext, dtype)
                elif v == "math":
                    fns[v] = _forward(models["agent"], x, lambda: fused(False), dtype)
            if args.compile:
                compiled = torch.compile(models["agent"])
                fns["compiled"] = _forward(compiled, x, contextlib.nullcontext, dtype)
        if "softmax" in models:
            fns["softmax"] = _forward(models["softmax"], x, contextlib.nullcontext, dtype)
        with torch.inference_mode():
            for fn in fns.values():  # warm-up: compilation, oneDNN primitives, the models' bias caches
                fn()
            memory = {v: common.peak_memory(fn, device) for v, fn in fns.items()}
            timings = common.time_round_robin(fns, device, repeats=args.repeats, max_s_per_fn=args.max_seconds,
                                              warmed=True)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        for v in list(fns) + [k for k in errors if k not in fns]:
            rec = {"model": official, "size": size, "variant": v, "batch": args.batch,
                   "timm_model": counterpart if v == "softmax" else official, "note": note if v == "softmax" else ""}
            if v in timings:
                sec = timings[v].stat(args.stat)
                rec.update(seconds=sec, seconds_median=timings[v].median, seconds_min=timings[v].best,
                           samples=timings[v].samples, images_per_s=args.batch / sec, peak_bytes=memory[v],
                           params=params["softmax" if v == "softmax" else "agent"])
            else:
                rec["error"] = errors.get(v, "")
            records.append(rec)
        log(f"  {official} @ {size}: " + ", ".join(
            f"{v} {args.batch / timings[v].stat(args.stat):.1f} img/s" for v in timings) +
            ("" if not errors else f" (errors: {errors})"))
        if args.profile and size == args.sizes[0] and "agent" in models:
            log(f"torch.profiler, one forward of {official} @ {size}:\n" + profile_table(fns["agent"], args.profile))
        del models, fns
    return records


def profile_table(forward: Callable[[], object], rows: int) -> str:
    """The ``rows`` operators with the most self CPU time in one call of ``forward`` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        forward()
        with common._quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                forward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _rec(records, model, size, variant):
    for r in records:
        if r["model"] == model and r["size"] == size and r["variant"] == variant:
            return r
    return None


def table(records: List[dict], variants: Sequence[str]):
    models = list(dict.fromkeys(r["model"] for r in records))
    sizes = sorted({r["size"] for r in records})
    soft_col = "softmax" in variants
    headers = ["model", "size"] + [f"{v} img/s" for v in variants] + ["agent/math"] + \
        (["agent/softmax"] if soft_col else []) + [f"{v} MB" for v in variants] + (["softmax model"] if soft_col else [])
    rows = []
    for m in models:
        for s in sizes:
            recs = {v: _rec(records, m, s, v) for v in variants}
            if not any(recs.values()):
                continue
            ips = {v: (r or {}).get("images_per_s") for v, r in recs.items()}
            ratio = lambda a, b: None if not a or not b else a / b  # noqa: E731
            soft = recs.get("softmax") or {}
            rows.append(
                [m, str(s)]
                + [f"{ips[v]:.1f}" if ips[v] else ("error" if (recs[v] or {}).get("error") else "—") for v in variants]
                + [common.fmt_ratio(ratio(ips.get("agent"), ips.get("math")))]
                + ([common.fmt_ratio(ratio(ips.get("agent"), ips.get("softmax")))] if soft_col else [])
                + [common.fmt_mb((recs[v] or {}).get("peak_bytes")) for v in variants]
                + ([soft.get("timm_model") or COUNTERPARTS.get(m, (None, "—"))[1] or "—"] if soft_col else [])
            )
    return headers, rows


def plot(records: List[dict], variants: Sequence[str], path: Path, title: str) -> Path:
    """One column per model: images/s (top) and peak memory (bottom) against the input size."""
    from .._extras import require

    require("matplotlib", "the benchmark plots", "bench")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    models = list(dict.fromkeys(r["model"] for r in records))
    sizes = sorted({r["size"] for r in records})
    fig = Figure(figsize=(3.3 * len(models) + 0.6, 6.4), layout="constrained")
    axes = fig.subplots(2, len(models), squeeze=False)
    styles = {"agent": ("tab:green", "-", "o"), "math": ("tab:orange", ":", "x"), "softmax": ("tab:red", "--", "s"),
              "compiled": ("tab:blue", "-.", "d")}
    for col, m in enumerate(models):
        for row, (key, scale, ylabel) in enumerate((("images_per_s", 1.0, "images / s"),
                                                    ("peak_bytes", 2.0**-20, "peak memory (MB)"))):
            ax = axes[row, col]
            for v in variants:
                pts = sorted((r["size"], r[key] * scale) for r in records
                             if r["model"] == m and r["variant"] == v and r.get(key))
                if not pts:
                    continue
                color, ls, marker = styles.get(v, ("gray", "-", "."))
                label = {"agent": "agent (fused)", "math": "agent, math path"}.get(v, v)
                if v == "softmax":
                    label = f"softmax: {_rec(records, m, pts[0][0], v)['timm_model']}"
                ax.plot(*zip(*pts), ls=ls, marker=marker, color=color, label=label)
            ax.set_yscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes], fontsize=8)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(m, fontsize=10)
                ax.legend(fontsize=7, loc="best")
            else:
                ax.set_xlabel("input size (pixels per side)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench models", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="agent model names (default: the four T)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="input sizes (default 224 384; also 512 768)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="float16/bfloat16: autocast (default float32)")
    common.add_timing_options(p, repeats=5, max_seconds=20.0, unit="variant")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(agent model)")
    p.add_argument("--channels-last", action="store_true", help="feed channels-last images")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators per agent model")
    common.add_output_options(p, "models")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.repeats < 1 or min(args.sizes) < 32:
        raise ValueError("--batch and --repeats must be positive and --sizes at least 32")
    from ..models import list_models

    known = set(list_models())
    unknown = [m for m in args.models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; see `agent-attention models`")
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    info = common.machine_info(device)
    print(f"bench models on {common.machine_line(info)}")
    print(f"batch {args.batch}, {args.dtype}, random weights, inference mode")
    variants = list(args.variants) + (["compiled"] if args.compile else [])
    records: List[dict] = []
    for size in args.sizes:
        records += measure_size(args.models, size, args, device)
    headers, rows = table(records, variants)
    print(common.text_table(headers, rows))
    paths = []
    if not args.no_plot:
        paths.append(plot(records, variants, args.out / "models.png",
                          f"agent models vs softmax (timm) and vs their math path — batch {args.batch}, {args.dtype}\n"
                          f"{common.machine_line(info, wrap=True)}"))
    md = (f"Machine: {common.machine_line(info)}\n\nBatch {args.batch}, {args.dtype}, random weights, inference mode. "
          f"img/s = batch / {args.stat} time of up to {args.repeats} interleaved rounds; memory = peak extra bytes "
          f"allocated by one forward. `agent/math`: speed-up of the fused path over the same model with "
          f"`fused(False)`; `agent/softmax`: speed of the agent model relative to its timm softmax counterpart.\n\n"
          + common.markdown_table(headers, rows))
    paths += common.write_outputs(args.out, "models", md, {"machine": info, "args": vars(args), "records": records})
    for p in paths:
        print(f"wrote {p}")
    return 0
