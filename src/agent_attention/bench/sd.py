"""``agent-attention bench sd``: seconds per UNet step and peak memory of Stable Diffusion with
AgentSD, against the stock UNet and ToMeSD (PyPI ``tomesd``) at the same merging ratios.

The UNet is the SD-1.5 architecture built from its config with random weights (timing and memory
do not depend on the weights), or a local diffusers UNet (``--unet PATH``).  One run measures,
for each image size (512² → 64² latent; ``--sizes 512 1024``):

* ``baseline``: the UNet with diffusers' default processor (fused SDPA; the paper's 1.84× was
  measured against a non-fused attention, so expect smaller ratios here);
* ``tomesd``: ``tomesd.apply_patch(unet, ratio=r)`` (its defaults: ``sx=sy=2``, self-attention
  merged at the highest resolution);
* ``agentsd``: ``apply_agentsd(unet, ratio=r)``: the paper's first phase (``sx=sy=4``,
  ``agent_ratio=0.95``) used for steps 0-19 of 50;
* with ``--schedule`` also ``agentsd-late`` (the second phase, ``sx=sy=2``, ``agent_ratio=0.5``:
  ToMe through our processor) and the schedule's mean step time ``0.4·early + 0.6·late``.

Times are medians over rounds that time every configuration once (shared machines load them alike);
memory is the peak extra memory of one step (activations; the weights are excluded).  Writes
``sd.md``, ``sd.json`` and ``sd.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
LABELS = {"baseline": "baseline (SDPA)", "tomesd": "ToMeSD", "todo": "ToDo (K/V kept as ToMe)", "agentsd": "AgentSD", "agentsd-late": "AgentSD 2nd phase (ToMe 2×2)",
          "schedule": "AgentSD schedule"}
EARLY_FRACTION = 0.4  # the paper: 20 of 50 steps with agents


def build_unet(args) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if args.unet:
        path = Path(args.unet)
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        return UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    torch.manual_seed(0)
    return UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET))


def configure(unet, method: str, ratio: float) -> None:
    """Put ``unet`` in the state of ``method`` (undoing any other patch first)."""
    from ..diffusion import apply_agentsd, remove_agentsd
    from ..diffusion.patch import PAPER_LATE

    remove_agentsd(unet)
    try:
        import tomesd

        tomesd.remove_patch(unet)
    except ImportError:
        pass
    if method == "tomesd":
        tomesd.apply_patch(unet, ratio=ratio)
    elif method == "todo":  # ToDo keeping as many keys/values as ToMe keeps tokens at this ratio
        from ..diffusion.todo import todo_factor_for_ratio

        apply_agentsd(unet, method="todo", todo_factor=todo_factor_for_ratio(ratio))
    elif method == "agentsd":
        apply_agentsd(unet, ratio=ratio)
    elif method == "agentsd-late":
        apply_agentsd(unet, **dict(PAPER_LATE, ratio=ratio))


def time_rounds(configs: Dict[tuple, Callable[[], None]], step: Callable[[], object], device, repeats: int):
    """``repeats`` rounds, each timing one step of every configuration (forward, then backward order:
    :func:`common.round_order`): ``{key: [(wall s, CPU s)]}``.

    The configuration switch is outside the timed region.  CPU time (``time.process_time``, all
    threads of this process) is reported next to wall time: it is much less sensitive to other
    processes on a shared machine."""
    samples: Dict[tuple, List[Tuple[float, float]]] = {key: [] for key in configs}
    for r in range(repeats):
        for key in common.round_order(list(configs), r):
            configs[key]()
            common.sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            common.sync(device)
            samples[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def run_size(unet, size: int, args, device, dtype) -> List[dict]:
    latent = size // 8
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(args.batch, 77, cross, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)

    @torch.no_grad()
    def step():
        return unet(x, t, context).sample

    keys = [("baseline", 0.0)] + [(m, r) for m in args.methods for r in args.ratios]
    configs = {key: (lambda key=key: configure(unet, *key)) for key in keys}
    print(f"  {size}² ({latent}² latent): {len(configs)} configurations; memory pass (also the warm-up):", flush=True)
    memory = {}
    for key, setup in configs.items():
        setup()
        start = time.perf_counter()
        if args.no_memory:
            step()
            memory[key] = 0
        else:
            memory[key] = common.peak_memory(step, device)
        print(f"    {key[0]:>12} r={key[1]:<4g} peak {common.fmt_mb(memory[key])} MiB "
              f"({time.perf_counter() - start:.1f} s with the profiler)", flush=True)
    print(f"  {size}²: timing {args.repeats} rounds ...", flush=True)
    samples = time_rounds(configs, step, device, args.repeats)
    configure(unet, "baseline", 0.0)
    records = []
    for key in keys:
        wall = [w for w, _ in samples[key]]
        cpu = [c for _, c in samples[key]]
        records.append(dict(size=size, latent=latent, method=key[0], ratio=key[1], seconds=statistics.median(wall),
                            cpu_seconds=statistics.median(cpu), min_seconds=min(wall), min_cpu_seconds=min(cpu),
                            samples=samples[key], peak_bytes=memory[key]))
    return records


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}"


def _metrics(rec: Dict[tuple, dict], method: str, ratio: float) -> Dict[str, float]:
    if method == "schedule":  # the paper's schedule: 40 % of the steps early, 60 % late
        early, late = rec[("agentsd", ratio)], rec[("agentsd-late", ratio)]
        out = {k: EARLY_FRACTION * early[k] + (1 - EARLY_FRACTION) * late[k] for k in ("seconds", "cpu_seconds")}
        return dict(out, peak_bytes=max(early["peak_bytes"], late["peak_bytes"]))
    r = rec[(method, ratio)]
    return {k: r[k] for k in ("seconds", "cpu_seconds", "peak_bytes")}


def summarize(records: List[dict], methods: Sequence[str], ratios: Sequence[float]):
    """``{size: (headers, rows)}``: per ratio and method, wall and CPU seconds per step with the
    speed-up over the baseline, peak MiB; and AgentSD's speed-up over ToMeSD."""
    tables = {}
    shown = [m for m in methods if m != "agentsd-late"] + (["schedule"] if "agentsd-late" in methods else [])
    versus = "tomesd" in methods and "agentsd" in methods
    for size in sorted({r["size"] for r in records}):
        rec = {(r["method"], r["ratio"]): r for r in records if r["size"] == size}
        base = _metrics(rec, "baseline", 0.0)
        headers = ["method", "ratio", "s/step (wall)", "speed-up", "CPU s/step", "speed-up (CPU)", "peak MiB"]
        if versus:
            headers += ["vs ToMeSD (wall)", "vs ToMeSD (CPU)"]
        rows = [[LABELS["baseline"], "0", _fmt_s(base["seconds"]), "1×", _fmt_s(base["cpu_seconds"]), "1×",
                 common.fmt_mb(base["peak_bytes"])] + (["", ""] if versus else [])]
        for m in shown:
            for r in ratios:
                x = _metrics(rec, m, r)
                row = [LABELS[m], f"{r:g}", _fmt_s(x["seconds"]), common.fmt_ratio(base["seconds"] / x["seconds"]),
                       _fmt_s(x["cpu_seconds"]), common.fmt_ratio(base["cpu_seconds"] / x["cpu_seconds"]),
                       common.fmt_mb(x["peak_bytes"])]
                if versus:
                    if m in ("agentsd", "schedule"):
                        t = _metrics(rec, "tomesd", r)
                        row += [common.fmt_ratio(t["seconds"] / x["seconds"]), common.fmt_ratio(t["cpu_seconds"] / x["cpu_seconds"])]
                    else:
                        row += ["", ""]
                rows.append(row)
        tables[size] = (headers, rows)
    return tables


def plot(records: List[dict], methods: Sequence[str], path: Path, title: str) -> Path:
    """Per image size: s/step against the merging ratio, and peak memory when it was measured (not
    under ``--no-memory``); the legend below the panels, so no curve hides behind it."""
    sizes = sorted({r["size"] for r in records})
    memory = any(r.get("peak_bytes") for r in records)
    keys = [("seconds", 1.0, "s / UNet step (wall; dotted: CPU)")] + ([("peak_bytes", 2**-20, "peak MiB")] if memory else [])
    fig, axes = common.new_figure(len(keys) * len(sizes), width=4.6, height=4.6)
    ratios = sorted({r["ratio"] for r in records if r["method"] != "baseline" and r.get("ratio") is not None})
    for i, size in enumerate(sizes):
        rec = [r for r in records if r["size"] == size]
        base = next(r for r in rec if r["method"] == "baseline")
        for j, (key, scale, unit) in enumerate(keys):
            ax = axes[len(keys) * i + j]
            ax.axhline(base[key] * scale, color="k", ls="--", label=LABELS["baseline"])
            if key == "seconds":
                ax.axhline(base["cpu_seconds"], color="k", ls=":", label="baseline, CPU time")
            for m in methods:
                pts = sorted((r["ratio"], r[key] * scale, r["cpu_seconds"]) for r in rec if r["method"] == m)
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[m])
                if key == "seconds":
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", marker=".", color=line.get_color(),
                            label=f"{LABELS[m]}, CPU time")
            if ratios:
                ax.set_xticks(ratios)
                pad = 0.1 if len(ratios) == 1 else 0.05 * (ratios[-1] - ratios[0])
                ax.set_xlim(ratios[0] - pad, ratios[-1] + pad)
            ax.set_xlabel("merging ratio r")
            ax.set_ylabel(unit)
            ax.set_title(f"{size}² image ({size // 8}² latent)", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 2 * len(axes)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    return common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench sd", description=common.description(__doc__))
    p.add_argument("--model", choices=("unet", "pixart", "sd3", "flux", "wan"), default="unet",
                   help="unet: SD-1.5 (this page's options); pixart, sd3, flux, wan: diffusion transformers at their "
                        "released widths (see bench sd --model flux --help)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes (latent = size/8); e.g. 512 1024")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="token merging ratios (default 0.1 0.2 0.3 0.4 0.5)")
    p.add_argument("--methods", nargs="+", choices=("tomesd", "todo", "agentsd", "agentsd-late"), default=["tomesd", "agentsd"],
                   help="methods beside the stock UNet (default: tomesd agentsd)")
    p.add_argument("--schedule", action="store_true", help="also time the second phase and report the schedule mean")
    p.add_argument("--batch", type=int, default=1, help="UNet batch (2 = one CFG step of one image)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median); the memory pass is the warm-up")
    p.add_argument("--unet", default=None, help="local diffusers UNet or pipeline directory (default: SD-1.5 config, random weights)")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet (smoke test)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--no-memory", action="store_true", help="plain warm-up step instead of the memory pass (peak MiB = 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    common.add_output_options(p, "sd")
    return p


def _dit_model(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--model`` if it names a diffusion transformer (``bench.sd_dit``)."""
    from .sd_dit import SPECS

    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--model" and i + 1 < len(argv) else a[len("--model="):] if a.startswith("--model=") else None
        if value in SPECS:
            return value
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if _dit_model(argv):  # PixArt, SD3, Flux, Wan: reduced transformers at the released widths
        from .sd_dit import main as dit_main

        return dit_main(argv)
    args = build_parser().parse_args(argv)
    if args.schedule and "agentsd-late" not in args.methods:
        args.methods.append("agentsd-late")
    if args.schedule and "agentsd" not in args.methods:
        args.methods.append("agentsd")
    bad = [s for s in args.sizes if s < 8 or s % 8] + [r for r in args.ratios if not 0 < r <= 1]
    if bad or args.batch < 1 or args.repeats < 1:
        print(f"agent-attention bench sd: invalid sizes/ratios/batch/repeats: {bad or (args.batch, args.repeats)}")
        return 2
    if "tomesd" in args.methods:
        try:
            import tomesd  # noqa: F401
        except ImportError:
            print("agent-attention bench sd: `tomesd` is not installed (pip install tomesd); skipping ToMeSD")
            args.methods.remove("tomesd")
    if args.threads:
        common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    from .._dtypes import warn_slow_dtype

    warn_slow_dtype(dtype, device, f"--dtype {args.dtype}", "agent-attention bench sd")
    info = common.machine_info(device)
    print(f"bench sd on {common.machine_line(info)}")
    unet = build_unet(args).to(device, dtype).eval()
    params = sum(p.numel() for p in unet.parameters())
    what = args.unet or ("tiny UNet" if args.tiny else "SD-1.5 UNet (random weights)")
    print(f"{what}: {params / 1e6:.0f}M parameters, {dtype}, batch {args.batch}")

    records: List[dict] = []
    for size in args.sizes:
        records += run_size(unet, size, args, device, dtype)
    tables = summarize(records, args.methods, args.ratios)
    md = [f"Machine: {common.machine_line(info)}\n\n{what}, {params / 1e6:.0f}M parameters, {dtype}, batch {args.batch}; "
          "seconds per UNet step (median of the rounds; wall clock and process CPU time), speed-ups over the "
          "baseline and over ToMeSD at the same ratio, and the peak extra memory of a step (weights excluded)."]
    for size, (headers, rows) in tables.items():
        print(f"\n{size}² image ({size // 8}² latent), seconds per UNet step, speed-ups, peak MiB:")
        print(common.text_table(headers, rows))
        md.append(f"### {size}² ({size // 8}² latent)\n\n" + common.markdown_table(headers, rows))
    data = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "params": params, "records": records}
    for path in common.write_outputs(args.out, "sd", "\n\n".join(md), data):
        print(f"wrote {path}")
    if not args.no_plot:
        title = f"{what}, {dtype}, batch {args.batch}\n{common.machine_line(info)}"
        print(f"wrote {plot(records, args.methods, args.out / 'sd.png', title)}")
    return 0
