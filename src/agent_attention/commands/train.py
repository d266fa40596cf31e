"""``agent-attention train``: train a classifier with a recipe.

    agent-attention train                                   # main job: embedded digits, CPU, minutes
    agent-attention train --recipe agent_swin_tiny --data /imagenet --amp bf16
    torchrun --nproc_per_node=8 -m agent_attention.cli train --recipe agent_deit_small --data /imagenet
    agent-attention train --resume auto --output runs/digits  # continue a killed run exactly
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main"]

PROG = "agent-attention train"


def build_parser() -> argparse.ArgumentParser:
    from ..train.config import add_config_args

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with a recipe (default: a small Agent-DeiT on the embedded digits set).\n"
                    "Every recipe field can be overridden by its flag or by --set FIELD=VALUE.",
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--list-recipes", action="store_true", help="list the bundled recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe (yaml) and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --output folder that holds one (its checkpoints and logs are deleted)")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated kill
    add_config_args(p)
    return p


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``agent-attention train``; returns the exit code."""
    import yaml

    from ..train.config import config_from_args, list_recipes
    from ..train.distributed import resolve_device

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    with usage_errors():
        to_stderr = (lambda text: print(text, file=sys.stderr)) if args.print_config else None  # (stdout: the yaml)
        cfg = config_from_args(args, note=to_stderr)
        if cfg.epochs < 1:  # (the recipe's range checks say it too; the schedule asserts otherwise)
            raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
        check_device(cfg.device, resolve_device)
        if not args.print_config:
            from .._dtypes import warn_slow_dtype
            from ..train.data import check_data
            from ..train.evaluation import amp_dtype
            from ..train.run_dir import check_run_dir
            from ._weights import check_model

            device = resolve_device(cfg.device)
            warn_slow_dtype(amp_dtype(cfg.amp, device), device, f"--amp {cfg.amp}", PROG)
            check_model(cfg.model, cfg.model_kwargs, cfg.img_size, cfg.num_classes)
            check_data(cfg, train=True)
            check_run_dir(cfg.output or f"runs/{cfg.recipe}", bool(cfg.resume), args.overwrite)
    if args.recipe is None and cfg.recipe != "digits":
        print(f"note: --model {cfg.model} without --recipe: using the recipe {cfg.recipe!r} "
              "(see --list-recipes; --print-config shows every value)", file=sys.stderr if args.print_config else sys.stdout)
    if args.print_config:
        print(yaml.safe_dump(dict(cfg), sort_keys=False), end="")
        return 0
    from ..train.distributed import cleanup, init_distributed
    from ..train.engine import SimulatedKill, Trainer

    try:
        dist = init_distributed(cfg.device)
        summary = Trainer(cfg, dist, stop_after_steps=args.stop_after_steps).fit()
    except SimulatedKill as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 137
    finally:
        cleanup()
    if dist.is_main:
        top1 = summary["final_top1"]
        print(f"done: {summary['model']} val top-1 {top1 if top1 is None else round(top1, 2)} "
              f"(best {summary['max_top1']:.2f}) in {summary['wall_time_s']:.0f}s -> {summary['output']}")
    return 0


def check_device(spec: str, resolve) -> None:
    """A usage error for a device string torch does not know (``--device gpu``)."""
    try:
        resolve(spec)
    except RuntimeError as e:  # torch.device("gpu"): "Expected one of cpu, cuda, ... device type"
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda, cuda:N, mps or auto") from e
