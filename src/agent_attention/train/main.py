"""``agent-attention train`` and ``agent-attention eval``.

    agent-attention train                                   # main job: embedded digits, CPU, minutes
    agent-attention train --recipe agent_swin_tiny --data /imagenet --amp bf16
    torchrun --nproc_per_node=8 -m agent_attention.cli train --recipe agent_deit_small --data /imagenet
    agent-attention train --resume auto --output runs/digits  # continue a killed run exactly
    agent-attention eval --checkpoint runs/digits/best.pth   # top-1/top-5 + images/s
    agent-attention eval --model agent_swin_tiny --checkpoint agent_swin_t.pth --data /imagenet
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["train_main", "eval_main", "build_train_parser", "build_eval_parser"]

_EVAL_FIELDS = ("data", "val_split", "val_subset", "img_size", "interpolation", "test_crop", "crop_pct", "eval_resize",
                "mean", "std", "num_workers", "model_kwargs", "num_classes", "amp", "device", "seed", "threads")


def build_train_parser() -> argparse.ArgumentParser:
    from .config import add_config_args

    p = argparse.ArgumentParser(
        prog="agent-attention train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with a recipe (default: a small Agent-DeiT on the embedded digits set).\n"
                    "Every recipe field can be overridden by its flag or by --set FIELD=VALUE.",
        epilog=__doc__,
    )
    p.add_argument("--list-recipes", action="store_true", help="list the bundled recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe (yaml) and exit")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated kill
    add_config_args(p)
    return p


def train_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``agent-attention train``; returns the exit code."""
    import yaml

    from .config import config_from_args, list_recipes

    parser = build_train_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.print_config:
        print(yaml.safe_dump(dict(cfg), sort_keys=False), end="")
        return 0
    from .distributed import cleanup, init_distributed
    from .engine import SimulatedKill, Trainer

    dist = None
    try:
        dist = init_distributed(cfg.device)
        summary = Trainer(cfg, dist, stop_after_steps=args.stop_after_steps).fit()
    except SimulatedKill as e:
        print(f"agent-attention train: {e}", file=sys.stderr)
        return 137
    except (ValueError, FileNotFoundError) as e:
        print(f"agent-attention train: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if dist.is_main:
        top1 = summary["final_top1"]
        print(f"done: {summary['model']} val top-1 {top1 if top1 is None else round(top1, 2)} "
              f"(best {summary['max_top1']:.2f}) in {summary['wall_time_s']:.0f}s -> {summary['output']}")
    return 0


# ------------------------------------------------------------------------------------------- eval
def build_eval_parser() -> argparse.ArgumentParser:
    from .config import FIELDS, add_config_args

    p = argparse.ArgumentParser(
        prog="agent-attention eval",
        description="Top-1/top-5 accuracy and throughput (images/s: warm-up forwards, then timed forwards) of a "
                    "model on an ImageFolder val/ split or the embedded digits val split, from a checkpoint "
                    "(ours: .pth / .safetensors, or an official .pth).",
    )
    p.add_argument("--model", default=None, help="model name (default: read from our checkpoint)")
    p.add_argument("--checkpoint", default=None, help="weights file (omit: random weights, throughput only)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (model_ema / state_dict_ema)")
    p.add_argument("--batch-size", dest="eval_batch", type=int, default=None, help="evaluation batch size (default: the recipe's)")
    p.add_argument("--throughput-warmup", type=int, default=50, help="untimed forwards before timing (official 50)")
    p.add_argument("--throughput-iters", type=int, default=30, help="timed forwards (official 30)")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy pass")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    add_config_args(p, skip=[f.name for f in FIELDS if f.name not in _EVAL_FIELDS])
    p.set_defaults(recipe=None)
    return p


def _checkpoint_config(obj: Any, path: str) -> Dict[str, Any]:
    """Recipe fields stored by our training runs (``config`` of a .pth, metadata of a .safetensors)."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj["config"]:
        cfg = obj["config"]
        return cfg if isinstance(cfg.get("model"), str) else {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        out: Dict[str, Any] = {}
        if "model" in meta:
            out["model"] = meta["model"]
        if "model_kwargs" in meta:
            out["model_kwargs"] = json.loads(meta["model_kwargs"])
        for k in ("img_size", "num_classes"):
            if k in meta:
                out[k] = int(meta[k])
        if "recipe" in meta:
            out["recipe"] = meta["recipe"]
        return out
    return {}


def eval_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``agent-attention eval``; returns the exit code."""
    from ..models.checkpoints import load_checkpoint, load_official_checkpoint
    from .config import FIELDS, apply_override, coerce, list_recipes, load_recipe
    from .data import build_loaders
    from .distributed import cleanup, init_distributed
    from .evaluation import amp_dtype, build_model, evaluate, throughput

    parser = build_eval_parser()
    args = parser.parse_args(argv)
    try:
        ckpt, stored = None, {}
        if args.checkpoint:
            ckpt = load_checkpoint(args.checkpoint)
            stored = _checkpoint_config(ckpt, args.checkpoint)
        model_name = args.model or stored.get("model")
        if not model_name:
            raise ValueError("--model is required (the checkpoint does not say which model it holds)")
        recipe = args.recipe or stored.get("recipe")
        if recipe not in list_recipes() and not (recipe and Path(recipe).is_file()):
            from ..models.registry import ALIASES

            name = ALIASES.get(model_name, model_name)
            recipe = name if name in list_recipes() else "digits"
        cfg = load_recipe(recipe)
        for key, value in stored.items():
            if key in {f.name for f in FIELDS} and key not in ("data", "output", "resume", "device"):
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
        if args.eval_batch:
            cfg["eval_batch_size"] = args.eval_batch
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))

    import torch

    dist = init_distributed(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loaders = build_loaders(cfg, dist.rank, dist.world_size, dist.device, train=False)
        num_classes = cfg.num_classes or loaders.num_classes
        model = build_model(cfg.model, num_classes, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)
        if ckpt is not None:
            load_official_checkpoint(model, ckpt, strict=True, use_ema=args.ema)
        model = model.to(dist.device).eval()
        dtype = amp_dtype(cfg.amp, dist.device)
        result: Dict[str, Any] = {"model": cfg.model, "checkpoint": args.checkpoint, "data": loaders.description,
                                  "img_size": cfg.img_size, "params": sum(p.numel() for p in model.parameters())}
        if not args.no_accuracy:
            result.update(evaluate(model, loaders.val, dist.device, dtype))
        if not args.no_throughput:
            images = next(iter(loaders.val))[0]
            result["throughput"] = throughput(model, images, dist.device, args.throughput_warmup,
                                              args.throughput_iters, dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"agent-attention eval: error: {e}", file=sys.stderr)
        return 2
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
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
