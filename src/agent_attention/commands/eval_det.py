"""``agent-attention eval-det``: COCO box (and mask) mAP of a released detector on a COCO-format folder.

    agent-attention eval-det --model mask_rcnn_agent_swin_t_1x --pretrained --data /data/coco
    agent-attention eval-det --model retinanet_agent_pvt_t_1x --checkpoint retinanet_pvt_t.pth --data /coco --limit 100
    agent-attention eval-det --list
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main"]

PROG = "agent-attention eval-det"


def _scale(text: str):
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected LONG,SHORT (e.g. 1333,800), got {text!r}")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="COCO box / mask mAP (pycocotools) of an official detector (Mask R-CNN, Cascade Mask R-CNN "
                    "or RetinaNet, released) on a split of a COCO-format folder (annotations/instances_<split>.json "
                    "and the split's images), with the official single-scale test: keep-ratio resize to fit "
                    "1333x800, ImageNet normalisation, padding to a multiple of 32. Weights: the released file "
                    "(--pretrained, downloaded once and cached) or a local official .pth / safetensors file "
                    "(--checkpoint).",
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, metavar="NAME", help="release name (see --list)")
    p.add_argument("--pretrained", action="store_true", help="download (once) and use the released weights")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="official-layout weights (.pth / .safetensors)")
    p.add_argument("--data", default=None, metavar="DIR", help="COCO-format folder")
    p.add_argument("--split", default="val2017", help="annotation split (annotations/instances_<split>.json)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="evaluate the first N images only (0: all)")
    p.add_argument("--scale", type=_scale, default=(1333, 800), metavar="LONG,SHORT",
                   help="test resize: fit inside LONG x SHORT keeping the ratio (official 1333,800)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--list", action="store_true", help="list the detection releases with the paper's mAP and exit")
    return p


def _list() -> None:
    from ..dense.releases import CONFIGS

    for r in CONFIGS.values():
        if r.task == "det":
            print(f"{r.name:36s} {r.metrics():20s} {r.official_url or '(no released file)'}")


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention eval-det --model NAME (--pretrained | --checkpoint PATH) --data DIR``."""
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
        release = get_release(args.model, task="det")
        if args.pretrained == (args.checkpoint is not None):
            raise ValueError("give exactly one of --pretrained and --checkpoint")
        if args.data is None:
            raise ValueError("--data is required: a COCO-format folder")
        if args.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {args.limit}")
        dataset = D.CocoFolder(args.data, args.split)
        if len(dataset.label_to_cat) - 1 != release.num_classes:
            raise ValueError(f"{args.data} has {len(dataset.label_to_cat) - 1} categories; {release.name} predicts "
                             f"the {release.num_classes} COCO classes")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..dense.detectors.pretrained import pretrained_detector
    from ..dense.engine import evaluate_detection

    model = pretrained_detector(release.name, checkpoint=args.checkpoint, progress=not args.no_progress).to(device)
    model.max_size, model.min_size = args.scale
    coco_gt, label_to_cat = dataset.coco, dataset.label_to_cat
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=1, collate_fn=D.detection_collate)
    iou_types = ("bbox", "segm") if model.with_mask else ("bbox",)
    t0 = time.perf_counter()
    scores = evaluate_detection(model, loader, coco_gt, device, label_to_cat, iou_types, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    got = f"box mAP {100 * scores['bbox_mAP']:.1f}" + (f" / mask mAP {100 * scores['segm_mAP']:.1f}" if model.with_mask else "")
    print(f"{release.name} on {len(dataset)} images of {args.data} ({args.split}): {got}  ({seconds:.1f} s; paper: "
          f"{release.metrics()} on the full val2017)")
    if args.json:
        from .._atomic import write_json

        write_json(args.json, dict(model=release.name, data=str(args.data), split=args.split, images=len(dataset),
                                   seconds=seconds, paper_box_mAP=release.box_map, paper_mask_mAP=release.mask_map,
                                   **scores), indent=1, default=float)
    return 0
