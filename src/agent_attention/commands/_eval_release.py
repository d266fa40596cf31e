"""What ``eval-det`` and ``eval-seg`` share: the options of evaluating a released dense model on a
folder, their checks (one usage error each), the device, the ``--limit`` subset and the JSON file."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional, Tuple

__all__ = ["scale_type", "add_release_eval_options", "check_release_args", "first_n", "write_results"]


def scale_type(one_side_ratio: Optional[int] = None) -> Callable[[str], Tuple[int, int]]:
    """``--scale LONG,SHORT`` (or ``LONGxSHORT``); with ``one_side_ratio``, one number ``S`` means
    ``(ratio * S, S)`` (mmseg's 2048,512 from 512)."""
    example = "2048,512" if one_side_ratio else "1333,800"

    def parse(text: str) -> Tuple[int, int]:
        try:
            parts = [int(v) for v in text.replace("x", ",").split(",")]
        except ValueError:
            parts = []
        if one_side_ratio and len(parts) == 1:
            parts = [parts[0] * one_side_ratio, parts[0]]
        if len(parts) != 2 or min(parts) < 1:
            one = " or one side" if one_side_ratio else ""
            raise argparse.ArgumentTypeError(f"expected LONG,SHORT (e.g. {example}){one}, got {text!r}")
        return parts[0], parts[1]

    return parse


def add_release_eval_options(p: argparse.ArgumentParser, *, data: str, split: str, split_help: str,
                             scale: Tuple[int, int], scale_parser: Callable, json_help: str, list_help: str) -> None:
    p.add_argument("--model", default=None, metavar="NAME", help="release name (see --list)")
    p.add_argument("--pretrained", action="store_true", help="download (once) and use the released weights")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="official-layout weights (.pth / .safetensors)")
    p.add_argument("--data", default=None, metavar="DIR", help=data)
    p.add_argument("--split", default=split, help=split_help)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="evaluate the first N images only (0: all)")
    p.add_argument("--scale", type=scale_parser, default=scale, metavar="LONG,SHORT",
                   help=f"test resize: fit inside LONG x SHORT keeping the ratio (official {scale[0]},{scale[1]})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help=json_help)
    p.add_argument("--list", action="store_true", help=list_help)


def check_release_args(args: argparse.Namespace, task: str, data_what: str):
    """``(release, torch.device)`` of the command line; a ``ValueError`` (a usage error inside
    ``usage_errors``) for each missing or contradictory option. Sets ``--threads``."""
    import torch

    from .._device import resolve_device
    from ..dense.releases import get_release

    if args.model is None:
        raise ValueError("--model is required (see --list)")
    release = get_release(args.model, task=task)
    if args.pretrained == (args.checkpoint is not None):
        raise ValueError("give exactly one of --pretrained and --checkpoint")
    if args.data is None:
        raise ValueError(f"--data is required: {data_what}")
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    device = resolve_device(args.device or "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    return release, device


def first_n(dataset, limit: int):
    """The first ``limit`` items of ``dataset`` (all of them for 0)."""
    from torch.utils.data import Subset

    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def write_results(args: argparse.Namespace, release, images: int, seconds: float, **results: Any) -> None:
    """``--json``: the run and its results, written atomically."""
    if args.json:
        from .._atomic import write_json

        write_json(args.json, dict(model=release.name, data=str(args.data), split=args.split, images=images,
                                   seconds=seconds, **results), indent=1, default=float)
