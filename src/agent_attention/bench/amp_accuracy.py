"""The accuracy cost of bf16 autocast: one trained checkpoint evaluated in fp32 and under bf16.

    agent-attention train --output runs/digits             # the package's default job
    python -m agent_attention.bench.amp_accuracy --checkpoint runs/digits/best.pth --out docs/bench

Top-1/top-5/loss come from the library's evaluation (:func:`agent_attention.train.evaluation.evaluate`),
called once plainly and once inside ``torch.autocast(device, torch.bfloat16)``, on the same weights
and validation images (the recipe stored in the checkpoint: the embedded digits split by default).
Also reported: how many predictions change, the largest logit difference, and the speed of a
validation batch in both precisions (interleaved rounds). Writes ``amp_accuracy.md``/``.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import common

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _config(stored: dict):
    from ..train.config import FIELDS, coerce, list_recipes, load_recipe

    recipe = stored.get("recipe")
    cfg = load_recipe(recipe if recipe in list_recipes() else "digits")
    names = {f.name for f in FIELDS}
    for key, value in stored.items():
        if key in names and key not in ("data", "output", "resume", "device", "recipe"):
            cfg[key] = coerce(key, value)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent_attention.bench.amp_accuracy", description=common.description(__doc__))
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pth written by agent-attention train")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="bf16", help="low precision to compare with fp32 (default bf16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    common.add_timing_options(p, repeats=7, max_seconds=20.0, unit="precision")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for amp_accuracy.md/.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args) -> int:
    from ..weights import load_checkpoint, load_official_checkpoint
    from ..train.data import build_loaders
    from ..train.evaluation import build_model, evaluate

    if not args.checkpoint.is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} is not a file")
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = AMP_DTYPES[args.amp]
    ckpt = load_checkpoint(str(args.checkpoint))
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict) or "model" not in stored:
        raise ValueError(f"{args.checkpoint} holds no training config (write it with `agent-attention train`)")
    cfg = _config(stored)
    loaders = build_loaders(cfg, 0, 1, device, train=False)
    model = build_model(cfg.model, cfg.num_classes or loaders.num_classes, img_size=cfg.img_size,
                        model_kwargs=cfg.model_kwargs)
    load_official_checkpoint(model, ckpt, strict=True)
    model = model.to(device).eval()
    info = common.machine_info(device)

    fp32 = evaluate(model, loaders.val, device)
    with torch.autocast(device.type, dtype=dtype):
        low = evaluate(model, loaders.val, device)
    changed = total = 0
    max_diff = 0.0
    with torch.inference_mode():
        for images, _ in loaders.val:
            images = images.to(device)
            a = model(images)
            with torch.autocast(device.type, dtype=dtype):
                b = model(images).float()
            changed += int((a.argmax(1) != b.argmax(1)).sum())
            total += images.shape[0]
            max_diff = max(max_diff, (a - b).abs().max().item())
    batch = next(iter(loaders.val))[0].to(device)

    def forward(amp: bool):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return model(batch)
        return run

    timings = common.time_round_robin({"fp32": forward(False), args.amp: forward(True)}, device,
                                      repeats=args.repeats, max_s_per_fn=args.max_seconds)
    ips = {k: batch.shape[0] / t.stat(args.stat) for k, t in timings.items()}
    result = {"checkpoint": str(args.checkpoint), "model": cfg.model, "model_kwargs": cfg.model_kwargs,
              "img_size": cfg.img_size, "data": loaders.description, "amp": args.amp, "fp32": fp32, args.amp: low,
              "predictions_changed": changed, "images": total, "max_abs_logit_diff": max_diff,
              "eval_batch": batch.shape[0], "images_per_s": ips,
              "timing_samples": {k: t.samples for k, t in timings.items()}}
    headers = ["precision", "top-1 %", "top-5 %", "loss", f"img/s (batch {batch.shape[0]})"]
    rows = [["fp32", f"{fp32['top1']:.2f}", f"{fp32['top5']:.2f}", f"{fp32['loss']:.5f}", f"{ips['fp32']:.0f}"],
            [f"{args.amp} autocast", f"{low['top1']:.2f}", f"{low['top5']:.2f}", f"{low['loss']:.5f}",
             f"{ips[args.amp]:.0f}"]]
    md = (f"Machine: {common.machine_line(info)}\n\n{cfg.model} {cfg.model_kwargs} at {cfg.img_size}², "
          f"checkpoint `{args.checkpoint.name}`, {loaders.description}, {total} validation images. "
          f"{changed} predictions change under {args.amp}; largest logit difference {max_diff:.3g}.\n\n"
          + common.markdown_table(headers, rows))
    print(common.text_table(headers, rows))
    print(f"{changed}/{total} predictions change; max |logit difference| {max_diff:.3g}")
    for p in common.write_outputs(args.out, "amp_accuracy", md, {"machine": info, "result": result}):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
