"""``agent-attention bench sd --model pixart|sd3|flux|wan``: AgentSD on diffusion transformers at
the real widths of PixArt-Σ, SD3.5-medium, FLUX.1 and Wan 2.1-1.3B, with a reduced number of blocks.

Each denoiser is diffusers' own model class built from its released configuration (hidden size,
heads, head dim, MLP width, text width) with random weights and ``--blocks`` transformer blocks of
each kind instead of 24-57 (timing does not depend on the weights; per-block times extrapolate to
the full depth).  For each size (``--sizes`` 1024 2048: image side in pixels; Wan: ``--frames``
17 81 at ``--video-size`` 480 832) and each method:

* ``baseline``: diffusers' stock attention processors (SDPA);
* ``todo``: ToDo, keys/values average-pooled to as many as ToMe keeps tokens at ``--ratio``;
* ``agentsd``: AgentSD's first phase (tokens merged at ``--ratio``, agents), text tokens exact;
* ``agentsd+merge``: the same with the blocks' cross-attention and feed-forward on the merged rows
  too (``merge_crossattn=True, merge_mlp=True``);

one forward of the reduced model is timed per round (rounds alternate the order of the methods), and
forward hooks on each transformer block time the blocks inside it.  ``--profile`` adds
``torch.profiler``'s top operators of one forward of each method at the largest size.  Writes
``sd_<model>_<dtype>.json`` and ``.md`` under ``--out``; :mod:`.sd_dit_report` combines runs into
one table, the goal lines and a plot.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

__all__ = ["SPECS", "DiTSpec", "build_model", "make_inputs", "configure", "time_forward", "main"]


@dataclass(frozen=True)
class DiTSpec:
    """A denoiser family at its released widths: diffusers class, config (blocks set by ``depth``),
    the block lists to time, the text tokens of its pipeline, and its VAE/patch geometry."""

    title: str
    cls: str
    config: Dict[str, object]
    depth: Dict[str, str]                   # config key -> block list attribute
    full_depth: Dict[str, int]              # blocks of the released model, per list
    text_tokens: int
    latent_channels: int
    video: bool = False
    extra: Dict[str, object] = field(default_factory=dict)


SPECS: Dict[str, DiTSpec] = {
    "pixart": DiTSpec(  # PixArt-Σ: 1152 = 16 heads × 72; T5 captions of 300 tokens
        "PixArt-Σ", "PixArtTransformer2DModel",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, cross_attention_dim=1152,
             caption_channels=4096, sample_size=128, norm_type="ada_norm_single", use_additional_conditions=False,
             interpolation_scale=2),
        {"num_layers": "transformer_blocks"}, {"transformer_blocks": 28}, 300, 4),
    "sd3": DiTSpec(  # SD3.5-medium: 1536 = 24 × 64, 24 MMDiT-X blocks (0-12 with a second self-attention)
        "SD3.5-medium", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, num_attention_heads=24,
             joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
             qk_norm="rms_norm"),
        {"num_layers": "transformer_blocks"}, {"transformer_blocks": 24}, 333, 16,
        extra=dict(dual_fraction=13 / 24)),
    "flux": DiTSpec(  # FLUX.1-dev: 3072 = 24 × 128, 19 double-stream + 38 single-stream blocks, RoPE
        "FLUX.1", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"},
        {"transformer_blocks": 19, "single_transformer_blocks": 38}, 512, 16),
    "wan": DiTSpec(  # Wan 2.1 T2V-1.3B: 1536 = 12 × 128, FFN 8960, 30 blocks, 3-D RoPE, umT5 text of 512 tokens
        "Wan 2.1-1.3B", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
        {"num_layers": "blocks"}, {"blocks": 30}, 512, 16, video=True),
}

TINY = {  # smoke tests: the same classes at toy widths
    "pixart": dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=32, sample_size=8,
                   norm_num_groups=1),
    "sd3": dict(sample_size=8, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                pooled_projection_dim=16, pos_embed_max_size=16),
    "flux": dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                 axes_dims_rope=(2, 2, 4)),
    "wan": dict(num_attention_heads=2, attention_head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32),
}
METHODS = ("baseline", "todo", "agentsd", "agentsd+merge")


def build_model(name: str, blocks: int = 1, tiny: bool = False) -> torch.nn.Module:
    import diffusers

    spec = SPECS[name]
    config = dict(spec.config, **(TINY[name] if tiny else {}))
    for key in spec.depth:
        config[key] = blocks
    if name == "sd3":  # the first block of each pair with SD3.5's second self-attention (13 of 24 blocks)
        config["dual_attention_layers"] = tuple(range(0, blocks, 2))
    torch.manual_seed(0)
    return getattr(diffusers, spec.cls)(**config).eval()


_TEXT_WIDTH = {"pixart": "caption_channels", "sd3": "joint_attention_dim", "flux": "joint_attention_dim", "wan": "text_dim"}


def text_width(name: str, model) -> int:
    """Width of the text encoder's tokens that the denoiser takes."""
    return int(getattr(model.config, _TEXT_WIDTH[name]))


def make_inputs(name: str, model, hw: Tuple[int, int], *, frames: int = 1, batch: int = 1, text_tokens: Optional[int] = None,
                dtype=torch.float32, device="cpu") -> dict:
    """Keyword arguments of one denoiser call for an image of ``hw`` pixels (Wan: ``frames`` frames;
    VAE ÷8 in space, Wan's ÷4 in time)."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    h, w = hw[0] // 8, hw[1] // 8
    n_text = text_tokens or spec.text_tokens
    text = torch.randn(batch, n_text, text_width(name, model), generator=g)
    t = torch.full((batch,), 500.0)
    if name == "pixart":
        kw = dict(hidden_states=torch.randn(batch, 4, h, w, generator=g), encoder_hidden_states=text, timestep=t,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif name == "sd3":
        kw = dict(hidden_states=torch.randn(batch, 16, h, w, generator=g), encoder_hidden_states=text, timestep=t,
                  pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g))
    elif name == "flux":  # 2×2 latent patches packed into 64-channel tokens
        ph, pw = h // 2, w // 2
        img_ids = torch.zeros(ph, pw, 3)
        img_ids[..., 1] = torch.arange(ph)[:, None]
        img_ids[..., 2] = torch.arange(pw)[None, :]
        kw = dict(hidden_states=torch.randn(batch, ph * pw, model.config.in_channels, generator=g), encoder_hidden_states=text,
                  pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g),
                  timestep=t / 1000, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(n_text, 3),
                  guidance=torch.full((batch,), 3.5) if model.config.guidance_embeds else None)
    else:
        latent_frames = (frames - 1) // 4 + 1
        kw = dict(hidden_states=torch.randn(batch, 16, latent_frames, h, w, generator=g), encoder_hidden_states=text, timestep=t)
    return {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("img_ids", "txt_ids", "timestep")
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def image_tokens(name: str, hw: Tuple[int, int], frames: int = 1) -> int:
    h, w = hw[0] // 16, hw[1] // 16  # VAE ÷8, patch 2 (Flux: packed 2×2)
    return h * w * (((frames - 1) // 4 + 1) if SPECS[name].video else 1)


def configure(model, method: str, ratio: float) -> None:
    """Put ``model`` in the state of ``method`` (undoing any other first)."""
    from ..diffusion import apply_agentsd, remove_agentsd

    remove_agentsd(model)
    if method == "todo":  # ToDo keeping as many keys/values as ToMe keeps tokens at this ratio
        from ..diffusion.todo import todo_factor_for_ratio

        apply_agentsd(model, method="todo", todo_factor=todo_factor_for_ratio(ratio))
    elif method == "agentsd":
        apply_agentsd(model, ratio=ratio)
    elif method == "agentsd+merge":
        import warnings

        with warnings.catch_warnings():  # SD3 and FLUX have no cross-attention to the text: nothing to say
            warnings.filterwarnings("ignore", message=".*merge_crossattn=True does nothing")
            apply_agentsd(model, ratio=ratio, merge_crossattn=True, merge_mlp=True)
    elif method != "baseline":
        raise ValueError(f"unknown method {method!r}")


class BlockTimer:
    """Forward hooks timing every block of the given lists (wall and process CPU seconds)."""

    def __init__(self, model, lists: Sequence[str]):
        self.times: Dict[str, List[Tuple[float, float]]] = {kind: [] for kind in lists}
        self.handles = []
        for kind in lists:
            for block in getattr(model, kind):
                self.handles.append(block.register_forward_pre_hook(self._start))
                self.handles.append(block.register_forward_hook(lambda m, a, o, kind=kind: self._stop(kind)))
        self._t = (0.0, 0.0)

    def _start(self, module, args) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def _stop(self, kind: str) -> None:
        self.times[kind].append((time.perf_counter() - self._t[0], time.process_time() - self._t[1]))

    def take(self) -> Dict[str, Tuple[float, float]]:
        out = {k: (statistics.mean(w for w, _ in v), statistics.mean(c for _, c in v)) for k, v in self.times.items() if v}
        for v in self.times.values():
            v.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def time_forward(model, inputs: dict, methods: Sequence[str], ratio: float, repeats: int, device,
                 warmup: bool = True, memory: bool = False, log: Callable[[str], None] = print) -> Dict[str, dict]:
    """``{method: {"forward": [(wall, cpu)], "blocks": {list: [(wall, cpu)]}, "calls": {...}}}`` over
    ``repeats`` rounds (forward, then backward order); ``memory``: the untimed first round measures
    each method's peak memory above the weights and inputs (``"peak_bytes"``)."""
    from ..diffusion import get_agentsd_state

    spec_lists = [a for a in ("transformer_blocks", "single_transformer_blocks", "blocks") if hasattr(model, a)]
    timer = BlockTimer(model, spec_lists)
    out = {m: {"forward": [], "blocks": {k: [] for k in spec_lists}, "calls": {}} for m in methods}

    @torch.no_grad()
    def forward():
        return model(**inputs, return_dict=False)[0]

    try:
        for r in range(-1 if warmup or memory else 0, repeats):
            for m in common.round_order(list(methods), max(r, 0)):
                configure(model, m, ratio)
                state = get_agentsd_state(model)
                if state is not None:
                    state.calls.clear()
                if r < 0 and memory:
                    out[m]["peak_bytes"] = common.peak_memory(forward, device)
                    timer.take()
                    log(f"    memory {m}: peak {common.fmt_mb(out[m]['peak_bytes'])} MiB")
                    continue
                common.sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                forward()
                common.sync(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                blocks = timer.take()
                if state is not None:
                    out[m]["calls"] = dict(state.calls)
                if r < 0:
                    log(f"    warm-up {m}: {wall:.2f} s")
                    continue
                out[m]["forward"].append((wall, cpu))
                for k, v in blocks.items():
                    out[m]["blocks"][k].append(v)
                log(f"    round {r} {m:>8}: forward {wall:.2f} s (CPU {cpu:.2f} s); "
                    + ", ".join(f"{k} {v[0]:.2f} s" for k, v in blocks.items()))
    finally:
        timer.remove()
        configure(model, "baseline", ratio)
    return out


def profile_top(model, inputs: dict, method: str, ratio: float, rows: int = 12) -> str:
    """``torch.profiler`` table (top operators by self CPU time) of one forward under ``method``."""
    from torch.profiler import ProfilerActivity, profile

    configure(model, method, ratio)
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs, return_dict=False)
    finally:
        configure(model, "baseline", ratio)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def _median(pairs: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    return statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs)


def records_of(name: str, label: str, tokens: int, dtype: str, timings: Dict[str, dict]) -> List[dict]:
    recs = []
    for m, t in timings.items():
        fw, fc = _median(t["forward"])
        blocks = {k: dict(zip(("seconds", "cpu_seconds"), _median(v))) for k, v in t["blocks"].items() if v}
        recs.append(dict(model=name, title=SPECS[name].title, size=label, tokens=tokens, dtype=dtype, method=m,
                         seconds=fw, cpu_seconds=fc, blocks=blocks, samples=t["forward"], calls=t["calls"],
                         peak_bytes=t.get("peak_bytes")))
    return recs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench sd --model pixart|sd3|flux|wan",
                                description=common.description(__doc__))
    p.add_argument("--model", choices=sorted(SPECS), required=True, help="denoiser family at its released widths")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sides in pixels (image models)")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 81], help="video frames (Wan)")
    p.add_argument("--video-size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"), help="video frame size (Wan)")
    p.add_argument("--methods", nargs="+", choices=METHODS[1:], default=["todo", "agentsd", "agentsd+merge"],
                   help="methods beside the baseline")
    p.add_argument("--ratio", type=float, default=0.4, help="AgentSD merging ratio; ToDo keeps as many keys/values")
    p.add_argument("--blocks", type=int, default=1, help="transformer blocks of each kind (default 1)")
    p.add_argument("--batch", type=int, default=1, help="denoiser batch")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median)")
    p.add_argument("--no-warmup", action="store_true", help="no untimed first round")
    p.add_argument("--memory", action="store_true",
                   help="the untimed first round measures each method's peak memory of one forward (activations)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top operators of one forward of each method at the largest size")
    p.add_argument("--tiny", action="store_true", help="toy widths (smoke test)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import sd_dit_report as report

    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.blocks < 1 or not 0 < args.ratio < 1:
        print("agent-attention bench sd: --repeats, --batch, --blocks must be >= 1 and 0 < --ratio < 1")
        return 2
    if args.threads:
        common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    info = common.machine_info(device)
    spec = SPECS[args.model]
    print(f"bench sd --model {args.model} on {common.machine_line(info)}")
    model = build_model(args.model, args.blocks, args.tiny).to(device, dtype)
    params = sum(p.numel() for p in model.parameters())
    lists = {k: len(getattr(model, k)) for k in spec.depth.values()}
    print(f"{spec.title} ({spec.cls}{', toy widths' if args.tiny else ''}): {params / 1e6:.0f}M parameters with blocks {lists} "
          f"(released: {spec.full_depth}), {dtype_name}, batch {args.batch}")
    if spec.video:
        cases = [((args.video_size[0], args.video_size[1]), f, f"{args.video_size[0]}×{args.video_size[1]}×{f}") for f in args.frames]
    else:
        cases = [((s, s), 1, f"{s}²") for s in args.sizes]
    methods = ["baseline"] + [m for m in args.methods if m != "baseline"]
    records: List[dict] = []
    profile = None
    for i, (hw, frames, label) in enumerate(cases):
        tokens = image_tokens(args.model, hw, frames)
        print(f"  {label}: {tokens} image tokens + {spec.text_tokens} text tokens; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        inputs = make_inputs(args.model, model, hw, frames=frames, batch=args.batch, dtype=dtype, device=device)
        timings = time_forward(model, inputs, methods, args.ratio, args.repeats, device, warmup=not args.no_warmup,
                               memory=args.memory)
        records += records_of(args.model, label, tokens, dtype_name, timings)
        if args.profile and i == len(cases) - 1:
            profile = [dict(size=label, method=m, table=profile_top(model, inputs, m, args.ratio)) for m in methods]
    data = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "params": params, "blocks": lists, "full_depth": spec.full_depth, "records": records, "profile": profile}
    md = report.markdown([data])
    print(md)
    for path in common.write_outputs(args.out, f"sd_{args.model}_{dtype_name}", md, data):
        print(f"wrote {path}")
    return 0
