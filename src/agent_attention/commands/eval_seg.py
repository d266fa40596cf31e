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
from ._eval_release import add_release_eval_options, check_release_args, first_n, scale_type, write_results

__all__ = ["build_parser", "main"]

PROG = "agent-attention eval-seg"


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
    add_release_eval_options(
        p, data="ADE20K-layout folder (ADEChallengeData2016)", split="validation",
        split_help="sub-folder of images/ and annotations/ (default: validation)", scale=(2048, 512),
        scale_parser=scale_type(one_side_ratio=4), json_help="also write the results (per-class IoU too) as JSON",
        list_help="list the segmentation releases with the paper's mIoU and exit")
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
    from torch.utils.data import DataLoader

    from ..dense import data as D

    with usage_errors():
        release, device = check_release_args(args, "seg", "an ADE20K-layout folder")
        dataset = D.ADE20KFolder(args.data, args.split, scale=args.scale)
    from ..dense.engine import evaluate_segmentation
    from ..dense.pretrained import pretrained_segmenter

    model = pretrained_segmenter(release.name, checkpoint=args.checkpoint, progress=not args.no_progress).to(device)
    dataset = first_n(dataset, args.limit)
    loader = DataLoader(dataset, batch_size=1, collate_fn=D.segmentation_collate)
    t0 = time.perf_counter()
    scores = evaluate_segmentation(model, loader, release.num_classes, device, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(f"{release.name} on {len(dataset)} images of {args.data} ({args.split}): mIoU {100 * scores['mIoU']:.2f}  "
          f"mAcc {100 * scores['mAcc']:.2f}  aAcc {100 * scores['aAcc']:.2f}  ({seconds:.1f} s; paper: "
          f"mIoU {release.miou:.2f} on the full validation set)")
    write_results(args, release, len(dataset), seconds, paper_mIoU=release.miou, **scores)
    return 0
