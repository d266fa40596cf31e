"""``agent-attention train-det``: train / evaluate an official detector (Mask R-CNN, Cascade Mask R-CNN,
RetinaNet) with an agent backbone.

Without ``--data`` it trains on the embedded shapes data set (generated, deterministic) with a small
agent backbone, so it runs on a fresh CPU machine (about 15 minutes on 2 cores). ``--preset`` selects an official COCO
recipe (``agent_attention/dense/recipes/det/*.yaml``) or a yaml file; every field of a
recipe can be overridden by its flag or ``--set FIELD=VALUE``.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from . import _dense

PROG = "agent-attention train-det"


def build_parser():
    from ..dense.recipe import DET_FIELDS, dense_recipes

    p = _dense.build_parser(PROG, "Train or evaluate a detector (Mask R-CNN, Cascade Mask R-CNN, RetinaNet) with an agent backbone.",
                            "det", DET_FIELDS, dense_recipes("det"))
    p.add_argument("--train-split", default="train2017", help="COCO training split (annotations/instances_<split>.json)")
    p.add_argument("--val-split", default="val2017", help="COCO validation split")
    p.add_argument("--init", default=None, metavar="NAME_OR_PATH",
                   help="start from a released detector (a name of 'eval-det --list', downloaded once, or a local "
                        "official .pth / safetensors file) to fine-tune it; its class layers are re-initialised "
                        "when the data has another number of classes")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..dense import data as D
    from ..dense.detectors import build_detector
    from ..dense.engine import detection_loss, evaluate_detection
    from ..dense.metrics import coco_from_dict
    from ..dense.recipe import DET_FIELDS, backbone_kwargs

    args = _dense.parse(build_parser(), "det", DET_FIELDS, list(sys.argv[1:] if argv is None else argv))
    args.command = "train-det"
    if args.data is None:
        train_set = D.ShapesDetection(args.num_train, args.image_size, seed=args.seed, train=True)
        val_set = D.ShapesDetection(args.num_val, args.image_size, seed=args.seed + 1)
        coco_gt, label_to_cat, num_classes = coco_from_dict(D.shapes_coco_gt(val_set)), None, len(D.SHAPE_CLASSES)
    else:
        train_set = D.CocoFolder(args.data, args.train_split, train=True)
        val_set = D.CocoFolder(args.data, args.val_split)
        coco_gt, label_to_cat, num_classes = val_set.coco, val_set.label_to_cat, len(val_set.label_to_cat) - 1
        if args.num_val:
            val_set = Subset(val_set, range(min(args.num_val, len(val_set))))
    det_kwargs = dict(args.detector_defaults.get(args.detector, {}))
    det_kwargs.update(args.detector_kwargs)
    model = build_detector(args.detector, args.backbone, num_classes, pretrained_backbone=args.pretrained,
                           strict=not args.no_strict, agent_shapes=args.agent_shapes, fpn_channels=args.fpn_channels,
                           fc_channels=args.fc_channels, min_size=args.min_size, max_size=args.max_size,
                           anchor_scale=args.anchor_scale, backbone_kwargs=backbone_kwargs(args, args.detector), **det_kwargs)
    print(model.backbone.describe())
    if args.init:
        from ..dense.detectors.pretrained import init_from_official

        report = init_from_official(model, args.init, progress=not args.no_progress)
        fresh = f"; re-initialised for {num_classes} classes: {', '.join(report['fresh'])}" if report["fresh"] else ""
        print(f"initialised from {args.init}: {report['loaded']} tensors{fresh}")
    print(f"{args.detector}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train_set)} training / {len(val_set)} validation images")
    iou_types = ("bbox", "segm") if model.with_mask else ("bbox",)
    val_loader = DataLoader(val_set, batch_size=max(1, min(args.batch_size, 8)), collate_fn=D.detection_collate,
                            num_workers=args.workers)
    device = torch.device(args.device)  # checked by _dense.parse

    def evaluate(m):
        return evaluate_detection(m, val_loader, coco_gt, device, label_to_cat, iou_types, progress=not args.no_progress)

    per_epoch = max(1, len(train_set) // args.batch_size)
    steps = args.epochs * per_epoch
    milestones = [round(float(e) * per_epoch) for e in args.milestones]
    return _dense.run(args, model, train_set, D.detection_collate, detection_loss, evaluate, steps, per_epoch,
                      dict(kind="step", milestones=milestones), "bbox_mAP")
