"""``agent-attention sd``: generate with a local diffusers model, without and with AgentSD, and save
the two images side by side.

    agent-attention sd --model ./stable-diffusion-v1-5 --prompt "a photo of a corgi" --steps 50

The model directory is loaded with ``DiffusionPipeline.from_pretrained(path, local_files_only=True)``
(no hub access).  AgentSD runs with the paper's schedule: ``sx=sy=4, agent_ratio=0.95`` for the first
40 % of the steps (20 of 50), then ``sx=sy=2, agent_ratio=0.5``, ``ratio`` in both phases.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import List, Optional

from .._atomic import atomic_path
from ._dispatch import UsageError, command, usage_errors

__all__ = ["main", "build_parser", "side_by_side"]

PROG = "agent-attention sd"

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    p.add_argument("--model", required=True, help="local diffusers pipeline directory (model_index.json)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative text prompt (default: none)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--switch-step", type=int, default=None,
                   help="step where the schedule switches to its second phase (default: 40%% of --steps, 20 of 50)")
    p.add_argument("--no-schedule", action="store_true", help="keep the first-phase settings for every step")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same for both images)")
    p.add_argument("--ratio", type=float, default=0.4, help="token merging ratio (both phases)")
    p.add_argument("--agent-ratio", type=float, default=0.95, help="agent merging ratio of the first phase")
    p.add_argument("--late-agent-ratio", type=float, default=0.5, help="agent merging ratio of the second phase")
    p.add_argument("--max-downsample", type=int, default=None,
                   help="patch layers downsampled at most this much (default: the highest-resolution attention)")
    p.add_argument("--attn-precision", choices=("auto", "fp32", "native"), default="auto",
                   help="'fp32' for SD 2.x in half precision; 'auto' follows the model's upcast_attention")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed 1-step generations before timing (default 1)")
    p.add_argument("--out", default="agentsd.png",
                   help="output image, format from the extension: .png, .jpg, .webp (left: baseline, right: AgentSD)")
    return p


def side_by_side(images, labels: Optional[List[str]] = None):
    """Paste PIL images left to right (with optional captions) into one image."""
    from PIL import Image, ImageDraw

    caption = 14 if labels else 0
    width = sum(im.width for im in images)
    height = max(im.height for im in images) + caption
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB"), (x, caption))
        if labels:
            draw.text((x + 2, 1), labels[i], fill="black")
        x += im.width
    return canvas


def image_format(path) -> str:
    """The PIL format of ``path``'s extension (``.png`` -> PNG, ``.jpg`` -> JPEG, ...); a usage error
    for a name without a known image extension."""
    from PIL import Image

    ext = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats or formats[ext] not in _WRITABLE:
        raise UsageError(f"--out {path}: give an image file name ending in .png, .jpg or .webp")
    return formats[ext]


_WRITABLE = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def _save(image, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def resolve_device(spec: Optional[str]):
    """``--device`` as a torch device (default: cuda if available); a usage error for an unknown
    name or a device this machine does not have."""
    import torch

    try:
        device = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise UsageError(f"--device {spec}: this machine has {have}; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    return device


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .._dtypes import warn_slow_dtype

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    warn_slow_dtype(dtype_name, device, f"--dtype {dtype_name}", PROG)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise UsageError(f"--model {model} is not a local diffusers pipeline directory (no model_index.json)")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give an image file name (.png, .jpg, .webp)")
    fmt = image_format(args.out)
    if args.switch_step is not None and not args.no_schedule and args.switch_step >= args.steps:
        print(f"{PROG}: note: --switch-step {args.switch_step} >= --steps {args.steps}: the second phase never "
              "runs (every step keeps the first-phase settings, as with --no-schedule)")

    import torch
    from diffusers import DiffusionPipeline

    from ..diffusion.patch import PAPER_LATE, AgentSDSchedule, apply_agentsd, remove_agentsd

    dtype = getattr(torch, _DTYPES[dtype_name])
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones only know torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True, torch_dtype=dtype).to(device)
    if getattr(pipe, "unet", None) is None:
        raise UsageError(f"{type(pipe).__name__} has no UNet; AgentSD patches UNet self-attention")
    pipe.set_progress_bar_config(disable=True)

    precision = None if args.attn_precision == "auto" else args.attn_precision
    early = dict(ratio=args.ratio, agent_ratio=args.agent_ratio, max_downsample=args.max_downsample, attn_precision=precision)
    switch = args.switch_step if args.switch_step is not None else round(0.4 * args.steps)
    if args.no_schedule:
        switch = args.steps
    late = dict(PAPER_LATE, ratio=args.ratio, agent_ratio=args.late_agent_ratio)
    with usage_errors():
        schedule = AgentSDSchedule(switch_step=switch, early=early, late=late)

    def generate(steps: int, callback=None):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        kwargs = dict(num_inference_steps=steps, guidance_scale=args.guidance, generator=generator,
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width)
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        start = time.perf_counter()
        image = pipe(args.prompt, **kwargs).images[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return image, time.perf_counter() - start

    for _ in range(max(0, args.warmup)):
        generate(1)
    baseline, t_base = generate(args.steps)
    state = apply_agentsd(pipe, schedule=schedule)
    try:
        for _ in range(max(0, args.warmup)):
            generate(1, schedule)
        state.calls.clear()
        agentsd, t_agent = generate(args.steps, schedule)
    finally:
        remove_agentsd(pipe)

    out = Path(args.out)
    _save(side_by_side([baseline, agentsd], ["baseline", "AgentSD"]), out, fmt)
    print(f"model: {model} ({type(pipe).__name__}, {device}, {dtype_name}), {args.steps} steps, "
          f"schedule switch at step {switch}")
    print(f"baseline: {t_base:.2f} s   AgentSD: {t_agent:.2f} s   speed-up x{t_base / max(t_agent, 1e-9):.2f}")
    print(f"AgentSD attention calls: {dict(state.calls)}")
    print(f"saved {out}")
    return 0
