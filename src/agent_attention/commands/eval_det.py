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
from ._eval_release import add_release_eval_options, check_release_args, first_n, scale_type, write_results

__all__ = ["build_parser", "main"]

PROG = "agent-attention eval-det"


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
    add_release_eval_options(
        p, data="COCO-format folder", split="val2017", split_help="annotation split (annotations/instances_<split>.json)",
        scale=(1333, 800), scale_parser=scale_type(), json_help="also write the results as JSON",
        list_help="list the detection releases with the paper's mAP and exit")
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
    from torch.utils.data import DataLoader

    from ..dense import data as D

    with usage_errors():
        release, device = check_release_args(args, "det", "a COCO-format folder")
        dataset = D.CocoFolder(args.data, args.split)
        if len(dataset.label_to_cat) - 1 != release.num_classes:
            raise ValueError(f"{args.data} has {len(dataset.label_to_cat) - 1} categories; {release.name} predicts "
                             f"the {release.num_classes} COCO classes")
    from ..dense.detectors.pretrained import pretrained_detector
    from ..dense.engine import evaluate_detection

    model = pretrained_detector(release.name, checkpoint=args.checkpoint, progress=not args.no_progress).to(device)
    model.max_size, model.min_size = args.scale
    coco_gt, label_to_cat = dataset.coco, dataset.label_to_cat
    dataset = first_n(dataset, args.limit)
    loader = DataLoader(dataset, batch_size=1, collate_fn=D.detection_collate)
    iou_types = ("bbox", "segm") if model.with_mask else ("bbox",)
    t0 = time.perf_counter()
    scores = evaluate_detection(model, loader, coco_gt, device, label_to_cat, iou_types, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    got = f"box mAP {100 * scores['bbox_mAP']:.1f}" + (f" / mask mAP {100 * scores['segm_mAP']:.1f}" if model.with_mask else "")
    print(f"{release.name} on {len(dataset)} images of {args.data} ({args.split}): {got}  ({seconds:.1f} s; paper: "
          f"{release.metrics()} on the full val2017)")
    write_results(args, release, len(dataset), seconds, paper_box_mAP=release.box_map,
                  paper_mask_mAP=release.mask_map, **scores)
    return 0
