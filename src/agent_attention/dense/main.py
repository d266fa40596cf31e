"""``agent-attention train-det`` and ``agent-attention train-seg``.

Without ``--data`` both commands train on the embedded shapes data set (generated, deterministic)
with a small agent backbone, so they run on a fresh CPU machine in minutes. ``--preset`` selects
an official recipe (spec §6.2/§6.3) for COCO-format / ADE20K-format folders; every value of a
preset can be overridden by its flag.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from . import data as D
from .backbone import family_of
from .engine import SWIN_NO_DECAY, LoopConfig, Schedule, build_optimizer, detection_loss, evaluate_detection
from .engine import evaluate_segmentation, load_training_checkpoint, segmentation_loss, train

# Small backbones for the embedded data (≈0.5–1M parameters each), built for 96-pixel inputs.
SHAPES_BACKBONES: Dict[str, dict] = {
    "pvt": dict(img_size=96, embed_dims=[32, 64, 128, 192], num_heads=[1, 2, 4, 4], mlp_ratios=[4, 4, 4, 4],
                depths=[1, 1, 1, 1], agent_num=[16, 16, 9, 4], drop_path_rate=0.0),
    "swin": dict(img_size=96, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 4], agent_num=[16, 16, 9, 4],
                 attn_type="AAAB", drop_path_rate=0.0),
    "cswin": dict(img_size=96, embed_dim=32, depth=[1, 1, 1, 1], num_heads=[2, 2, 4, 4], agent_num=[16, 16, 9, 4],
                  drop_path_rate=0.0),
}

# Few objects per small image: far fewer proposals / RoIs / detections than COCO's defaults.
SHAPES_DETECTOR_KWARGS: Dict[str, dict] = {
    "mask_rcnn": dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                      rpn_post_nms_top_n_test=150, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
                      box_detections_per_img=20),
    "retinanet": dict(topk_candidates=300, detections_per_img=20),
    "fcos": dict(topk_candidates=300, detections_per_img=20),
}

# Official drop-path rates by (recipe, size) (spec §6.2, §6.3).
_DROP_PATH = {
    "pvt_mask_rcnn": dict(tiny=0.1, small=0.2, medium=0.1, large=0.2),
    "pvt_retinanet": dict(tiny=0.1, small=0.1, medium=0.2, large=0.3),
    "swin_mask_rcnn": dict(tiny=0.1, small=0.1, base=0.4),
    "pvt_fpn": dict(tiny=0.1, small=0.1, medium=0.2, large=0.1),
    "swin_upernet": dict(tiny=0.3, small=0.3, base=0.5),
}

_COCO = dict(min_size=800, max_size=1333, fpn_channels=256, agent_shapes="official", batch_size=16, epochs=12,
             milestones="8,11", warmup_iters=500, warmup_ratio=0.001, anchor_size=None, box_rep_size=1024,
             mask_channels=256)
DET_PRESETS: Dict[str, dict] = {
    "shapes": dict(detector="mask_rcnn", backbone="agent_pvt_tiny", epochs=12, milestones="9,11", batch_size=4,
                   lr=1e-3, weight_decay=1e-4, warmup_iters=50, warmup_ratio=0.001, min_size=96, max_size=96,
                   anchor_size=8, fpn_channels=64, box_rep_size=256, mask_channels=64, agent_shapes="native",
                   no_decay="", num_train=256, num_val=64, image_size=96),
    "pvt_mask_rcnn_1x": dict(_COCO, detector="mask_rcnn", backbone="agent_pvt_t", lr=2e-4, weight_decay=1e-4, no_decay=""),
    "pvt_retinanet_1x": dict(_COCO, detector="retinanet", backbone="agent_pvt_t", lr=1e-4, weight_decay=1e-4, no_decay=""),
    "swin_mask_rcnn_1x": dict(_COCO, detector="mask_rcnn", backbone="agent_swin_t", lr=1e-4, weight_decay=0.05,
                              no_decay=",".join(SWIN_NO_DECAY)),
    "swin_mask_rcnn_3x": dict(_COCO, detector="mask_rcnn", backbone="agent_swin_t", lr=1e-4, weight_decay=0.05,
                              no_decay=",".join(SWIN_NO_DECAY), epochs=36, milestones="27,33"),
}
_ADE = dict(agent_shapes="official", batch_size=16, crop_size=512, decoder_channels=None)
SEG_PRESETS: Dict[str, dict] = {
    "shapes": dict(head="fpn", backbone="agent_pvt_tiny", iters=1000, eval_interval=250, batch_size=8, lr=1e-3,
                   weight_decay=1e-4, poly_power=0.9, warmup_iters=0, warmup_ratio=1e-6, agent_shapes="native",
                   decoder_channels=64, segmentation_channels=64, aux_channels=0, no_decay="", num_train=1024,
                   num_val=64, image_size=96, crop_size=0),
    "pvt_fpn_40k": dict(_ADE, head="fpn", backbone="agent_pvt_t", iters=40000, eval_interval=4000, lr=2e-4,
                        weight_decay=1e-4, poly_power=0.9, warmup_iters=0, warmup_ratio=1e-6, no_decay="",
                        segmentation_channels=128, aux_channels=0),
    "swin_upernet_160k": dict(_ADE, head="upernet", backbone="agent_swin_t", iters=160000, eval_interval=16000,
                              lr=6e-5, weight_decay=0.01, poly_power=1.0, warmup_iters=1500, warmup_ratio=1e-6,
                              no_decay=",".join(SWIN_NO_DECAY), segmentation_channels=128, aux_channels=256),
}


def _size_of(backbone: str) -> Optional[str]:
    from ..models.registry import ALIASES

    name = ALIASES.get(backbone, backbone)
    for size in ("tiny", "small", "medium", "large", "base"):
        if f"_{size}" in name:
            return size
    return None


def _common(p: argparse.ArgumentParser, presets: Dict[str, dict]) -> None:
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="recipe (default: 'shapes' without --data; official recipes for real data)")
    p.add_argument("--data", default=None, help="dataset folder (default: the embedded shapes data set)")
    p.add_argument("--output", default="runs/dense", help="output folder (checkpoints, log.jsonl, metrics.json)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (<output>/last.pth)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint (or the untrained model)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint of this command for --eval-only")
    p.add_argument("--backbone", help="agent_pvt_* / agent_swin_* / agent_cswin_* (or another hierarchical timm model)")
    p.add_argument("--pretrained", default=None, help="classification checkpoint for the backbone (.pth/.safetensors)")
    p.add_argument("--no-strict", action="store_true", help="load the matching backbone weights only (warn on the rest)")
    p.add_argument("--agent-shapes", help="'official' (PVT 12-16-28-28, Swin 9-12-14-7), 'native', or e.g. '9x9,12x12,14x14,7x7'")
    p.add_argument("--model-kwargs", default=None, help="JSON dict for timm.create_model of the backbone")
    p.add_argument("--drop-path", type=float, default=None, help="backbone drop-path rate (default: the recipe's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--no-decay", help="comma-separated parameter-name parts without weight decay")
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--num-train", type=int, help="embedded data: training images")
    p.add_argument("--num-val", type=int, help="embedded data: validation images (real data: evaluate the first N)")
    p.add_argument("--image-size", type=int, help="embedded data: image side")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-eval-init", action="store_true", help="skip evaluating the untrained model first")
    p.add_argument("--no-progress", action="store_true")


def _parse(p: argparse.ArgumentParser, presets: Dict[str, dict], argv: List[str]) -> argparse.Namespace:
    first, _ = p.parse_known_args(argv)
    preset = first.preset or ("shapes" if first.data is None else None)
    if preset is None:
        p.error(f"--data needs a --preset (one of {', '.join(k for k in presets if k != 'shapes')})")
    p.set_defaults(**presets[preset])
    args = p.parse_args(argv)
    args.preset = preset
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def _json(text: Optional[str], flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag} must be a JSON object, got {text!r}")
    return value


def _backbone_kwargs(args, recipe: str) -> dict:
    fam = family_of(args.backbone)
    kw = dict(SHAPES_BACKBONES.get(fam, {})) if args.preset == "shapes" else {}
    kw.update(_json(args.model_kwargs, "--model-kwargs"))
    dp = args.drop_path
    if dp is None and args.preset != "shapes":
        dp = _DROP_PATH.get(recipe, {}).get(_size_of(args.backbone) or "")
    if dp is not None:
        kw["drop_path_rate"] = dp
    return kw


def _no_decay(args) -> tuple:
    return tuple(s for s in (args.no_decay or "").split(",") if s)


def _run(args, model, train_set, collate, loss_fn, evaluate, steps, eval_every, schedule, key) -> int:
    device = torch.device(args.device)
    model.to(device)
    if args.eval_only:
        if args.checkpoint:
            model.load_state_dict(load_training_checkpoint(args.checkpoint)["model"])
        t0 = time.time()
        metrics = evaluate(model)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
        print(f"evaluated in {time.time() - t0:.1f}s")
        return 0
    opt = build_optimizer(model, args.lr, args.weight_decay, _no_decay(args))
    cfg = LoopConfig(out_dir=args.output, total_steps=steps, batch_size=args.batch_size, eval_every=eval_every,
                     num_workers=args.workers, seed=args.seed, clip_grad=args.clip_grad, progress=not args.no_progress,
                     eval_init=not args.no_eval_init, key_metric=key, desc=args.command)
    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    summary = train(model, train_set, collate, loss_fn, evaluate, opt, schedule, cfg, device, resume=args.resume,
                    run_config=run_config)
    init, final = summary["init"] or {}, summary["final"] or {}
    base = f" (untrained {100 * init[key]:.2f})" if key in init else ""
    print(f"done in {summary['wall_time_s']:.1f}s: {key} {100 * final.get(key, float('nan')):.2f}{base}; "
          f"outputs in {args.output}")
    return 0


# --------------------------------------------------------------------------- detection
def train_det_main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention train-det``: train/evaluate a detector with an agent backbone."""
    from .detection import DETECTORS, build_detector
    from .metrics import coco_from_dict

    p = argparse.ArgumentParser(prog="agent-attention train-det", description=__doc__.split("\n\n")[0])
    _common(p, DET_PRESETS)
    p.add_argument("--detector", choices=DETECTORS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--milestones", help="comma-separated epochs (may be fractional) where the lr drops ×0.1")
    p.add_argument("--min-size", type=int)
    p.add_argument("--max-size", type=int)
    p.add_argument("--anchor-size", type=float, help="smallest anchor (default: torchvision's 32, FCOS 8)")
    p.add_argument("--fpn-channels", type=int)
    p.add_argument("--box-rep-size", type=int)
    p.add_argument("--mask-channels", type=int)
    p.add_argument("--detector-kwargs", help="JSON dict for the torchvision detector (rpn_batch_size_per_image, "
                   "box_detections_per_img / detections_per_img, score thresholds ...)")
    p.add_argument("--train-split", default="train2017")
    p.add_argument("--val-split", default="val2017")
    args = _parse(p, DET_PRESETS, list(sys.argv[1:] if argv is None else argv))
    args.command = "train-det"
    if args.data is None:
        train_set = D.ShapesDetection(args.num_train, args.image_size, seed=args.seed, train=True)
        val_set = D.ShapesDetection(args.num_val, args.image_size, seed=args.seed + 1)
        coco_gt, label_to_cat, num_classes = coco_from_dict(D.shapes_coco_gt(val_set)), None, 1 + len(D.SHAPE_CLASSES)
    else:
        train_set = D.CocoFolder(args.data, args.train_split, train=True)
        val_set = D.CocoFolder(args.data, args.val_split)
        coco_gt, label_to_cat, num_classes = val_set.coco, val_set.label_to_cat, len(val_set.label_to_cat)
        if args.num_val:
            val_set = Subset(val_set, range(min(args.num_val, len(val_set))))
    recipe = f"{family_of(args.backbone)}_{args.detector}"
    det_kwargs = dict(SHAPES_DETECTOR_KWARGS[args.detector]) if args.preset == "shapes" else {}
    det_kwargs.update(_json(args.detector_kwargs, "--detector-kwargs"))
    model = build_detector(args.detector, args.backbone, num_classes, pretrained_backbone=args.pretrained,
                           strict=not args.no_strict, agent_shapes=args.agent_shapes, fpn_channels=args.fpn_channels,
                           min_size=args.min_size, max_size=args.max_size, anchor_size=args.anchor_size,
                           box_rep_size=args.box_rep_size, mask_channels=args.mask_channels,
                           backbone_kwargs=_backbone_kwargs(args, recipe), **det_kwargs)
    print(model.backbone.body.describe())
    print(f"{args.detector}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train_set)} training / {len(val_set)} validation images")
    iou_types = ("bbox", "segm") if args.detector == "mask_rcnn" else ("bbox",)
    val_loader = DataLoader(val_set, batch_size=max(1, min(args.batch_size, 8)), collate_fn=D.detection_collate,
                            num_workers=args.workers)
    device = torch.device(args.device)

    def evaluate(m):
        return evaluate_detection(m, val_loader, coco_gt, device, label_to_cat, iou_types, progress=not args.no_progress)

    per_epoch = max(1, len(train_set) // args.batch_size)
    steps = args.epochs * per_epoch
    milestones = [round(float(e) * per_epoch) for e in (args.milestones or "").split(",") if e]
    sched = Schedule(steps, "step", args.warmup_iters, args.warmup_ratio, milestones)
    return _run(args, model, train_set, D.detection_collate, detection_loss, evaluate, steps, per_epoch, sched, "bbox_mAP")


# --------------------------------------------------------------------------- segmentation
def train_seg_main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention train-seg``: train/evaluate a segmenter with an agent backbone."""
    from .segmentation import SEGMENTERS, build_segmenter

    p = argparse.ArgumentParser(prog="agent-attention train-seg", description=__doc__.split("\n\n")[0])
    _common(p, SEG_PRESETS)
    p.add_argument("--head", choices=SEGMENTERS)
    p.add_argument("--iters", type=int)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--poly-power", type=float)
    p.add_argument("--crop-size", type=int, help="ADE20K training crop (512)")
    p.add_argument("--decoder-channels", type=int, help="FPN pyramid width (256) / UperNet width (512)")
    p.add_argument("--segmentation-channels", type=int, help="Semantic FPN branch width (128)")
    p.add_argument("--aux-channels", type=int, help="auxiliary FCN head width (0: none; UperNet official 256)")
    p.add_argument("--aux-weight", type=float, default=0.4)
    args = _parse(p, SEG_PRESETS, list(sys.argv[1:] if argv is None else argv))
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
    recipe = f"{family_of(args.backbone)}_{args.head}"
    model = build_segmenter(args.head, args.backbone, num_classes, pretrained_backbone=args.pretrained,
                            strict=not args.no_strict, agent_shapes=args.agent_shapes,
                            decoder_channels=args.decoder_channels, segmentation_channels=args.segmentation_channels,
                            aux_channels=args.aux_channels, backbone_kwargs=_backbone_kwargs(args, recipe))
    print(model.backbone.describe())
    print(f"{args.head}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(train_set)} training / {len(val_set)} validation images")
    val_loader = DataLoader(val_set, batch_size=args.batch_size if args.data is None else 1,
                            collate_fn=D.segmentation_collate, num_workers=args.workers)
    device = torch.device(args.device)

    def evaluate(m):
        return evaluate_segmentation(m, val_loader, num_classes, device, names, progress=not args.no_progress)

    def loss_fn(m, batch, dev):
        return segmentation_loss(m, batch, dev, args.aux_weight)

    sched = Schedule(args.iters, "poly", args.warmup_iters, args.warmup_ratio, power=args.poly_power)
    return _run(args, model, train_set, D.segmentation_collate, loss_fn, evaluate, args.iters, args.eval_interval,
                sched, "mIoU")
