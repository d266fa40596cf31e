"""``agent-attention train-seg``: train / evaluate a segmenter (official Semantic FPN / UperNet) with an agent backbone.

Without ``--data`` it trains on the embedded shapes data set (generated, deterministic) with a small
agent backbone, so it runs on a fresh CPU machine in minutes. ``--preset`` selects an official
ADE20K recipe (``agent_attention/dense/recipes/seg/*.yaml``) or a yaml file; every field
of a recipe can be overridden by its flag or ``--set FIELD=VALUE``.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from . import _dense

PROG = "agent-attention train-seg"


def build_parser():
    from ..dense.recipe import SEG_FIELDS, dense_recipes

    return _dense.build_parser(PROG, "Train or evaluate a segmenter (Semantic FPN, UperNet) with an agent backbone.",
                               "seg", SEG_FIELDS, dense_recipes("seg"))


def main(argv: Optional[List[str]] = None) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..dense import data as D
    from ..dense.engine import evaluate_segmentation, segmentation_loss
    from ..dense.recipe import SEG_FIELDS, backbone_kwargs
    from ..dense.segmentation import build_segmenter

    args = _dense.parse(build_parser(), "seg", SEG_FIELDS, list(sys.argv[1:] if argv is None else argv))
    args.command = "train-seg"
    if args.data is None:
        train_set = D.ShapesSegmentation(args.num_train, args.image_size, seed=args.seed, train=True)
        val_set = D.ShapesSegmentation(args.num_val, args.image_size, seed=args.seed + 1)
        num_classes, names = D.ShapesSegmentation.num_classes, ("background",) + D.SHAPE_CLASSES
    else:
        train_set = D.ADE20KFolder(args.data, "training", train=True, crop_size=args.crop_size)
        val_set = D.ADE20KFolder(args.data, "validation")
        num_classes, names = D.ADE20KFolder.num_classes, None
        if args.num_val:
            val_set = Subset(val_set, range(min(args.num_val, len(val_set))))
    model = build_segmenter(args.head, args.backbone, num_classes, pretrained_backbone=args.pretrained,
                            strict=not args.no_strict, agent_shapes=args.agent_shapes,
                            decoder_channels=args.decoder_channels, segmentation_channels=args.segmentation_channels,
                            aux_channels=args.aux_channels, backbone_kwargs=backbone_kwargs(args, args.head))
    print(model.backbone.describe())
    print(f"{args.head}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train_set)} training / {len(val_set)} validation images")
    val_loader = DataLoader(val_set, batch_size=args.batch_size if args.data is None else 1,
                            collate_fn=D.segmentation_collate, num_workers=args.workers)
    device = torch.device(args.device)  # checked by _dense.parse

    def evaluate(m):
        return evaluate_segmentation(m, val_loader, num_classes, device, names, progress=not args.no_progress)

    def loss_fn(m, batch, dev):
        return segmentation_loss(m, batch, dev, args.aux_weight)

    return _dense.run(args, model, train_set, D.segmentation_collate, loss_fn, evaluate, args.iters, args.eval_interval,
                      dict(kind="poly", power=args.poly_power), "mIoU")
