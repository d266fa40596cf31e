"""``agent-attention eval-seg``: mIoU of a released segmenter on an ADE20K-layout folder.

    agent-attention eval-seg --model upernet_agent_swin_t_160k --pretrained --data /data/ADEChallengeData2016
    agent-attention eval-seg --model fpn_agent_pvt_s_40k --checkpoint fpn_agent_pvt_s.pth --data /ade --limit 100
    agent-attention eval-seg --list
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main"]

PROG = "agent-attention eval-seg"


def _scale(text: str):
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts = [parts[0] * 4, parts[0]]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected LONG,SHORT (e.g. 2048,512) or one side, got {text!r}")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="mIoU / mAcc / aAcc of an official segmenter (Semantic FPN or UperNet, released or "
                    "configured) on the validation split of an ADE20K-layout folder (images/<split>/*.jpg, "
                    "annotations/<split>/*.png), with the official single-scale test: keep-ratio resize to "
                    "fit 2048x512, ImageNet normalisation, whole-image inference, logits resized to the "
                    "original size. Weights: the released file (--pretrained, downloaded once and cached) "
                    "or a local official .pth / safetensors file (--checkpoint).",
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, metavar="NAME", help="release name (see --list)")
    p.add_argument("--pretrained", action="store_true", help="download (once) and use the released weights")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="official-layout weights (.pth / .safetensors)")
    p.add_argument("--data", default=None, metavar="DIR", help="ADE20K-layout folder (ADEChallengeData2016)")
    p.add_argument("--split", default="validation", help="sub-folder of images/ and annotations/ (default: validation)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="evaluate the first N images only (0: all)")
    p.add_argument("--scale", type=_scale, default=(2048, 512), metavar="LONG,SHORT",
                   help="test resize: fit inside LONG x SHORT keeping the ratio (official 2048,512)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results (per-class IoU too) as JSON")
    p.add_argument("--list", action="store_true", help="list the segmentation releases with the paper's mIoU and exit")
    return p


def _list() -> None:
    from ..dense.releases import CONFIGS

    for r in CONFIGS.values():
        if r.task == "seg":
            where = r.official_url or "(no released file)"
            print(f"{r.name:28s} {r.metrics():12s} mAcc {r.macc:.2f}  {where}")


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention eval-seg --model NAME (--pretrained | --checkpoint PATH) --data DIR``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        _list()
        return 0
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..dense import data as D
    from ..dense.releases import get_release

    with usage_errors():
        if args.model is None:
            raise ValueError("--model is required (see --list)")
        release = get_release(args.model, task="seg")
        if args.pretrained == (args.checkpoint is not None):
            raise ValueError("give exactly one of --pretrained and --checkpoint")
        if args.data is None:
            raise ValueError("--data is required: an ADE20K-layout folder")
        if args.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {args.limit}")
        dataset = D.ADE20KFolder(args.data, args.split, scale=args.scale)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..dense.engine import evaluate_segmentation
    from ..dense.pretrained import pretrained_segmenter

    model = pretrained_segmenter(release.name, checkpoint=args.checkpoint, progress=not args.no_progress).to(device)
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=1, collate_fn=D.segmentation_collate)
    t0 = time.perf_counter()
    scores = evaluate_segmentation(model, loader, release.num_classes, device, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(f"{release.name} on {len(dataset)} images of {args.data} ({args.split}): mIoU {100 * scores['mIoU']:.2f}  "
          f"mAcc {100 * scores['mAcc']:.2f}  aAcc {100 * scores['aAcc']:.2f}  ({seconds:.1f} s; paper: "
          f"mIoU {release.miou:.2f} on the full validation set)")
    if args.json:
        from .._atomic import write_json

        write_json(args.json, dict(model=release.name, data=str(args.data), split=args.split, images=len(dataset),
                                   seconds=seconds, paper_mIoU=release.miou, **scores), indent=1)
    return 0
