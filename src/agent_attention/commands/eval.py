"""``agent-attention eval``: top-1/top-5 and throughput of a checkpoint.

    agent-attention eval --checkpoint runs/digits/best.pth   # model, kwargs, classes from the checkpoint
    agent-attention eval --model agent_swin_tiny --checkpoint agent_swin_t.pth --data /imagenet
    agent-attention eval --model agent_swin_t --pretrained --data /imagenet --amp bf16
    agent-attention eval --checkpoint model.safetensors --data /folder --split test   # only /folder/test/ needed
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main", "check_amp"]

PROG = "agent-attention eval"
_EVAL_FIELDS = ("data", "val_split", "val_subset", "img_size", "interpolation", "test_crop", "crop_pct", "eval_resize",
                "mean", "std", "num_workers", "model_kwargs", "num_classes", "amp", "device", "seed", "threads",
                "progress", "skip_bad_images")


def build_parser() -> argparse.ArgumentParser:
    from ..train.config import FIELDS, add_config_args

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-1/top-5 accuracy and throughput (images/s: warm-up forwards, then timed forwards) of a "
                    "model on one ImageFolder split (default val/; no train/ needed) or the embedded digits val "
                    "split, from a checkpoint (ours: .pth / .safetensors, whose model name, kwargs, image size "
                    "and class count are used; or an official .pth) or the released weights (--pretrained).",
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--model", default=None, help="model name (default: read from our checkpoint)")
    p.add_argument("--checkpoint", default=None, help="weights file (omit: random weights, throughput only)")
    p.add_argument("--pretrained", action="store_true",
                   help="the released weights of --model (timm.create_model(name, pretrained=True))")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (model_ema / state_dict_ema)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="sub-folder of --data to evaluate (same as --val-split; default: val)")
    p.add_argument("--batch-size", dest="eval_batch", type=int, default=None,
                   help="evaluation batch size (default: the recipe's)")
    p.add_argument("--throughput-warmup", type=int, default=50, help="untimed forwards before timing (official 50)")
    p.add_argument("--throughput-iters", type=int, default=30, help="timed forwards (official 30)")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy pass")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    add_config_args(p, skip=[f.name for f in FIELDS if f.name not in _EVAL_FIELDS])
    p.set_defaults(recipe=None)
    return p


def check_amp(mode: str, device) -> Optional[Any]:
    """The autocast dtype of ``--amp mode`` on ``device``; ValueError when this machine cannot run it."""
    import torch

    from ..train.evaluation import amp_dtype

    dtype = amp_dtype(mode, device)
    if dtype is None:
        return None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp {mode}: this GPU does not support bfloat16; use --amp fp16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = torch.autocast(device.type, dtype=dtype)
    if any("not supported" in str(w.message) for w in caught) or not ctx._enabled:  # torch disables it, warns
        raise ValueError(f"--amp {mode}: autocast to {str(dtype).replace('torch.', '')} is not supported on "
                         f"{device.type} by this torch build")
    return dtype


def _resolve(args: argparse.Namespace):
    """The recipe of the evaluation, the checkpoint and the device (usage errors only)."""
    from ..train.config import FIELDS, apply_override, coerce, list_recipes, load_recipe
    from ..train.distributed import resolve_device
    from .train import check_device
    from ._weights import read_checkpoint

    if args.pretrained and args.checkpoint:
        raise ValueError("--pretrained and --checkpoint exclude each other")
    ckpt, stored = None, {}
    if args.checkpoint:
        ckpt, stored = read_checkpoint(args.checkpoint)
    model_name = args.model or stored.get("model")
    if not model_name:
        raise ValueError("--model is required (the checkpoint does not say which model it holds)")
    recipe = args.recipe or stored.get("recipe")
    if recipe not in list_recipes() and not (recipe and Path(recipe).is_file()):
        from ..models.registry import ALIASES

        name = ALIASES.get(model_name, model_name)
        recipe = name if name in list_recipes() else "digits"
    cfg = load_recipe(recipe)
    names = {f.name for f in FIELDS}
    for key, value in stored.items():
        if key in names and key not in ("data", "output", "resume", "device", "val_split", "val_subset", "pretrained"):
            cfg[key] = coerce(key, value)
    cfg["model"] = model_name
    for name in _EVAL_FIELDS:
        if hasattr(args, name):
            cfg[name] = coerce(name, getattr(args, name))
    for item in args.set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        apply_override(cfg, key.strip(), value)
    if args.split:
        cfg["val_split"] = args.split
    if args.eval_batch is not None:
        if args.eval_batch < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.eval_batch}")
        cfg["eval_batch_size"] = args.eval_batch
    if args.throughput_iters < 1 and not args.no_throughput:
        raise ValueError(f"--throughput-iters must be >= 1, got {args.throughput_iters}")
    if args.throughput_warmup < 0:
        raise ValueError(f"--throughput-warmup must be >= 0, got {args.throughput_warmup}")
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a directory; give a file name")
    check_device(cfg.device, resolve_device)
    from ._weights import check_model

    check_model(cfg.model, cfg.model_kwargs, cfg.img_size, cfg.num_classes)
    from .._dtypes import warn_slow_dtype
    from ..train.data import check_data

    device = resolve_device(cfg.device)
    dtype = check_amp(cfg.amp, device)
    warn_slow_dtype(dtype, device, f"--amp {cfg.amp}", PROG)
    check_data(cfg, train=False)
    return cfg, ckpt, dtype


def _num_classes(cfg, ckpt, args, data_classes: int) -> Optional[int]:
    from ._weights import num_classes_in

    if cfg.num_classes:
        return cfg.num_classes
    if ckpt is not None:
        n = num_classes_in(ckpt, cfg.model, cfg.model_kwargs, cfg.img_size, use_ema=args.ema)
        if n is not None:
            return n
    if args.pretrained:
        return None  # the released head
    return data_classes


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``agent-attention eval``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors():
        cfg, ckpt, dtype = _resolve(args)

    import torch

    from .._atomic import write_json
    from ..weights import load_official_checkpoint
    from ..train.data import build_loaders
    from ..train.distributed import cleanup, init_distributed
    from ..train.evaluation import build_model, evaluate, throughput

    dist = init_distributed(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loaders = build_loaders(cfg, dist.rank, dist.world_size, dist.device, train=False)
        num_classes = _num_classes(cfg, ckpt, args, loaders.num_classes)
        from ._weights import cli_weights_hint

        with cli_weights_hint():
            model = build_model(cfg.model, num_classes, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs,
                                pretrained=args.pretrained)
        if ckpt is not None:
            load_official_checkpoint(model, ckpt, strict=True, use_ema=args.ema)
        classes = getattr(model.get_classifier() if hasattr(model, "get_classifier") else None, "out_features", None)
        if classes and not args.no_accuracy and loaders.num_classes > classes:
            raise ValueError(f"{loaders.description} has {loaders.num_classes} classes but the model has {classes}")
        if classes and not args.no_accuracy and loaders.num_classes < classes and dist.is_main:
            print(f"note: {loaders.description} has {loaders.num_classes} class folders and the model {classes} "
                  "classes; folder i (sorted) is scored as class i", file=sys.stderr)
        model = model.to(dist.device).eval()
        result: Dict[str, Any] = {"model": cfg.model, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
                                  "data": loaders.description, "img_size": cfg.img_size, "amp": cfg.amp,
                                  "params": sum(p.numel() for p in model.parameters())}
        if not args.no_accuracy:
            result.update(evaluate(model, loaders.val, dist.device, dtype, progress=cfg.progress and dist.is_main,
                                   desc="eval"))
        if not args.no_throughput:
            images = next(iter(loaders.val))[0]
            result["throughput"] = throughput(model, images, dist.device, args.throughput_warmup,
                                              args.throughput_iters, dtype)
    finally:
        cleanup()
    if dist.is_main:
        lines = [f"{result['model']} ({result['params'] / 1e6:.2f}M params) on {result['data']}"]
        if "top1" in result:
            lines.append(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                         f"({result['samples']} images)")
        if "throughput" in result:
            t = result["throughput"]
            lines.append(f"throughput {t['images_per_s']:.1f} images/s (batch {t['batch_size']}, {t['warmup']} warm-up "
                         f"+ {t['iters']} timed forwards, {dist.device})")
        print("\n".join(lines))
        if args.json:
            write_json(args.json, result, indent=2)
    return 0
