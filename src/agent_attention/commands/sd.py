"""``agent-attention sd``: generate with a local diffusers model, without and with AgentSD, and save
the images side by side (same seeds).

    agent-attention sd --model ./stable-diffusion-v1-5 --prompt "a photo of a corgi" --steps 50

The model directory is loaded with ``DiffusionPipeline.from_pretrained(path, local_files_only=True)``
(no hub access).  AgentSD runs with the paper's schedule: ``sx=sy=4, agent_ratio=0.95`` for the first
40 % of the steps (20 of 50), then ``sx=sy=2, agent_ratio=0.5``, ``ratio`` in both phases.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from ._dispatch import UsageError, command, usage_errors
from ._sd_pipe import DTYPES, generate, grid, image_format, load_pipeline, model_dir, resolve_device, save_image, side_by_side

__all__ = ["main", "build_parser", "side_by_side"]

PROG = "agent-attention sd"


def add_generation_options(p: argparse.ArgumentParser, *, steps: int = 50) -> None:
    """Options shared by ``sd`` and ``sd-eval``: the pipeline, how to call it, AgentSD's schedule."""
    p.add_argument("--model", required=True, help="local diffusers pipeline directory (model_index.json)")
    p.add_argument("--negative-prompt", default=None, help="negative text prompt (default: none)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--switch-step", type=int, default=None,
                   help="step where the schedule switches to its second phase (default: 40%% of --steps, 20 of 50)")
    p.add_argument("--no-schedule", action="store_true", help="keep the first-phase settings for every step")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="video pipelines: number of frames (default: the pipeline's)")
    p.add_argument("--ratio", type=float, default=0.4, help="token merging ratio (both phases)")
    p.add_argument("--agent-ratio", type=float, default=0.95, help="agent merging ratio of the first phase")
    p.add_argument("--late-agent-ratio", type=float, default=0.5, help="agent merging ratio of the second phase")
    p.add_argument("--max-downsample", type=int, default=None,
                   help="patch layers downsampled at most this much (default: the highest-resolution attention)")
    p.add_argument("--merge-crossattn", action="store_true",
                   help="run the blocks' cross-attention on the merged tokens too (UNet, PixArt, Wan)")
    p.add_argument("--merge-mlp", action="store_true", help="run the blocks' feed-forward on the merged tokens too")
    p.add_argument("--attn-precision", choices=("auto", "fp32", "native"), default="auto",
                   help="'fp32' for SD 2.x in half precision; 'auto' follows the model's upcast_attention")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed 1-step generations before timing (default 1)")


def schedule_from_args(args: argparse.Namespace):
    """``(AgentSDSchedule, switch step)`` of the command line (usage errors for bad settings)."""
    from ..diffusion.patch import PAPER_LATE, AgentSDSchedule

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    precision = None if args.attn_precision == "auto" else args.attn_precision
    early = dict(ratio=args.ratio, agent_ratio=args.agent_ratio, max_downsample=args.max_downsample, attn_precision=precision,
                 merge_crossattn=args.merge_crossattn, merge_mlp=args.merge_mlp)
    switch = args.switch_step if args.switch_step is not None else round(0.4 * args.steps)
    if args.no_schedule:
        switch = args.steps
    late = dict(PAPER_LATE, ratio=args.ratio, agent_ratio=args.late_agent_ratio)
    with usage_errors():
        return AgentSDSchedule(switch_step=switch, early=early, late=late), switch


def call_options(args: argparse.Namespace) -> dict:
    """Pipeline call arguments of the command line (those a pipeline does not take are dropped)."""
    return dict(guidance_scale=args.guidance, negative_prompt=args.negative_prompt, height=args.height,
                width=args.width, num_frames=args.frames)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same for both images)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: one row of images per seed")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also generate without AgentSD (same seeds) and save both side by side (default); "
                        "--no-compare saves the AgentSD images only")
    add_generation_options(p)
    p.add_argument("--out", default="agentsd.png",
                   help="output image, format from the extension: .png, .jpg, .webp (left: baseline, right: AgentSD; one row per seed; a video: first, middle, last frame)")
    return p


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with usage_errors():
        device, dtype, dtype_name = resolve_device(args.device, args.dtype, PROG)
    model = model_dir(args.model)
    schedule, switch = schedule_from_args(args)
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give an image file name (.png, .jpg, .webp)")
    image_format(args.out)
    if args.switch_step is not None and not args.no_schedule and args.switch_step >= args.steps:
        print(f"{PROG}: note: --switch-step {args.switch_step} >= --steps {args.steps}: the second phase never "
              "runs (every step keeps the first-phase settings, as with --no-schedule)")
    seeds = args.seeds if args.seeds else [args.seed]

    from ..diffusion.patch import agentsd_calls, apply_agentsd, remove_agentsd

    pipe = load_pipeline(model, device, dtype)

    options = call_options(args)

    def run(steps: int, seed: int, callback=None):
        return generate(pipe, args.prompt, seed=seed, steps=steps, device=device, callback=callback, **options)

    baselines, t_base = [], 0.0
    if args.compare:
        for _ in range(max(0, args.warmup)):
            run(1, seeds[0])
        for seed in seeds:
            images, seconds = run(args.steps, seed)
            baselines.append(images[0])
            t_base += seconds
    with usage_errors():  # an unsupported denoiser is a one-line error naming the supported ones
        apply_agentsd(pipe, schedule=schedule)
    agentsd, t_agent = [], 0.0
    try:
        for _ in range(max(0, args.warmup)):
            run(1, seeds[0], schedule)
        agentsd_calls(pipe, clear=True)
        for seed in seeds:
            images, seconds = run(args.steps, seed, schedule)
            agentsd.append(images[0])
            t_agent += seconds
        calls = agentsd_calls(pipe)  # every denoiser's (Wan 2.2 has two)
    finally:
        remove_agentsd(pipe)

    out = Path(args.out)
    if args.compare:
        save_image(grid([[b, a] for b, a in zip(baselines, agentsd)], ["baseline", "AgentSD"]), out)
    else:
        save_image(grid([[a] for a in agentsd]), out)
    print(f"model: {model} ({type(pipe).__name__}, {device}, {dtype_name}), {args.steps} steps, "
          f"schedule switch at step {switch}, seeds {seeds}")
    if args.compare:
        print(f"baseline: {t_base / len(seeds):.2f} s   AgentSD: {t_agent / len(seeds):.2f} s per image   "
              f"speed-up x{t_base / max(t_agent, 1e-9):.2f}")
    else:
        print(f"AgentSD: {t_agent / len(seeds):.2f} s per image")
    print(f"AgentSD attention calls: {calls}")
    if not any(k.startswith(("agent", "tome", "todo")) for k in calls):
        print("warning: no attention call used AgentSD (every call went to the stock processor)")
    print(f"saved {out}")
    return 0
