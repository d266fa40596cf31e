"""``agent-attention sd-eval``: AgentSD against the unpatched model on a prompt list: seconds per
image, peak memory per image and image quality (FID against the unpatched model's images, CLIP score).

    agent-attention sd-eval --model ./stable-diffusion-v1-5 --prompts prompts.txt --clip ./clip-vit-large-patch14

Every prompt (one per line of ``--prompts``) is generated without and with AgentSD with the same
seed (``--seed`` + line index).  Peak memory per image is the official protocol: the change of a
generation's peak memory from 1 to 2 images per prompt.  FID compares the AgentSD images with the
unpatched model's (``--fid inception``: Inception-v3 via torch-fidelity, ``--fid-weights`` a local
copy of its weights; ``--fid clip``: the image tower of ``--clip``); the CLIP score needs a local
CLIP model directory (``--clip``).  Writes a JSON report (``--json``) and, with ``--save-images``,
every image as PNG.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from ._dispatch import UsageError, command, usage_errors
from ._sd_pipe import generate, load_pipeline, model_dir, pipeline_kwargs, resolve_device, save_image
from .sd import add_generation_options, call_options, schedule_from_args

__all__ = ["main", "build_parser", "read_prompts"]

PROG = "agent-attention sd-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i: seed + i)")
    add_generation_options(p, steps=50)
    p.add_argument("--clip", default=None, help="local CLIP model directory (transformers CLIPModel + CLIPProcessor) for the CLIP score")
    p.add_argument("--fid", choices=("inception", "clip", "none"), default=None,
                   help="FID features: inception (torch-fidelity), clip (the image tower of --clip), none "
                        "(default: clip with --clip, else none)")
    p.add_argument("--fid-weights", default=None, help="local Inception-v3 FID weights (torch-fidelity's .pth)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory per image (1 and 2 images per prompt; default on)")
    p.add_argument("--memory-steps", type=int, default=2, help="denoising steps of the memory generations (default 2)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--save-images", default=None, help="directory for every image (baseline_i.png, agentsd_i.png)")
    return p


def read_prompts(path: str, limit: Optional[int] = None) -> List[str]:
    """Prompts of a text file, one a line; blank lines and lines starting with # are skipped."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--prompts {file}: no such file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")][:limit]
    if not prompts:
        raise UsageError(f"--prompts {file} holds no prompt")
    return prompts


def _row(name: str, r: dict) -> List[str]:
    mem = r.get("memory")
    return [name, f"{r['s_per_image']:.3g}", f"{mem['per_image'] / 2**20:.1f}" if mem else "—",
            f"{r['clip_score']:.2f}" if "clip_score" in r else "—",
            f"{r['fid_vs_baseline']:.2f}" if "fid_vs_baseline" in r else "—"]


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model = model_dir(args.model)
    prompts = read_prompts(args.prompts, args.limit)
    schedule, switch = schedule_from_args(args)
    fid_kind = args.fid or ("clip" if args.clip else "none")
    if fid_kind == "clip" and not args.clip:
        raise UsageError("--fid clip needs --clip DIR (a local CLIP model)")
    if args.fid_weights and not Path(args.fid_weights).is_file():
        raise UsageError(f"--fid-weights {args.fid_weights}: no such file")
    if fid_kind != "none" and len(prompts) < 2:
        raise UsageError("FID needs at least 2 prompts (use --fid none for one)")

    import torch

    from ..bench import sd_quality
    from ..diffusion.patch import apply_agentsd, remove_agentsd

    with usage_errors():
        device, dtype, dtype_name = resolve_device(args.device, args.dtype, PROG)
        clip = sd_quality.load_clip(args.clip) if args.clip else None
    feature = None
    if fid_kind == "inception":
        feature = 2048
    elif fid_kind == "clip":
        feature = sd_quality.ClipImageFeatures(*clip)
    pipe = load_pipeline(model, device, dtype)
    options = call_options(args)

    def run(prompt, seed, callback=None, steps=args.steps):
        return generate(pipe, prompt, seed=seed, steps=steps, device=device, callback=callback, **options)

    def memory_run(batch: int):
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        kwargs = pipeline_kwargs(pipe, num_inference_steps=args.memory_steps, generator=g, num_images_per_prompt=batch,
                                 num_videos_per_prompt=batch, output_type="latent", **options)
        return pipe(prompts[0], **kwargs)

    def apply():
        with usage_errors():  # an unsupported denoiser is a one-line error naming the supported ones
            return apply_agentsd(pipe, schedule=schedule), schedule

    for _ in range(max(0, args.warmup)):
        run(prompts[0], args.seed, steps=1)
    report = sd_quality.evaluate(run, prompts, apply=apply, remove=lambda: remove_agentsd(pipe), seed=args.seed,
                                 memory_run=memory_run if args.memory else None, device=device, clip=clip,
                                 fid_feature=feature, fid_weights=args.fid_weights)
    images = report.pop("images")
    if args.save_images:
        out = Path(args.save_images)
        out.mkdir(parents=True, exist_ok=True)
        for name, ims in images.items():
            for i, im in enumerate(ims):
                save_image(im, out / f"{name}_{i}.png")

    from ..bench.common import text_table

    print(f"model: {model} ({type(pipe).__name__}, {device}, {dtype_name}), {len(prompts)} prompts, "
          f"{args.steps} steps, schedule switch at step {switch}, FID features: {fid_kind}")
    headers = ["", "s/image", "peak MiB/image (+1 batch)", "CLIP score", "FID vs baseline"]
    print(text_table(headers, [_row("baseline", report["baseline"]), _row("AgentSD", report["agentsd"])]))
    base, agent = report["baseline"]["s_per_image"], report["agentsd"]["s_per_image"]
    print(f"speed-up x{base / max(agent, 1e-9):.2f}; AgentSD attention calls: {report['calls']}")
    if not any(k.startswith(("agent", "tome", "todo")) for k in report["calls"]):
        print("warning: no attention call used AgentSD (every call went to the stock processor)")
    if fid_kind != "none":
        print(f"note: FID over {len(prompts)} image pairs; reliable FID needs thousands of images")
    if args.json:
        from .._atomic import atomic_path

        data = dict(model=str(model), pipeline=type(pipe).__name__, device=str(device), dtype=dtype_name,
                    prompts=prompts, steps=args.steps, switch_step=switch, fid_features=fid_kind, **report)
        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}")
    return 0
