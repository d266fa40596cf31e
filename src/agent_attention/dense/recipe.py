"""Dense training recipes: yaml files under ``dense/recipes/{det,seg}``, read by the recipe code of
the classification trainer (:func:`agent_attention.train.config.load_recipe` with the fields below).

Resolution order: the field defaults <- the recipe yaml (``base: _coco`` first reads the shared
``_coco.yaml``) <- command-line flags. ``shapes`` (the embedded data set) is the default recipe.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..train.config import Config, Field, list_recipes, load_recipe

__all__ = ["DET_FIELDS", "SEG_FIELDS", "recipe_folder", "dense_recipes", "load_dense_recipe", "backbone_kwargs"]

_f = Field

COMMON_FIELDS: List[Field] = [
    _f("backbone", "agent_pvt_tiny", "str", "backbone: agent_pvt_*, agent_swin_*, agent_cswin_* (or another hierarchical "
       "timm model)"),
    _f("agent_shapes", "native", "str", "agent grids per stage: 'official' (PVT 12-16-28-28, Swin 9-12-14-7), 'native' "
       "(the classification grids) or e.g. '9x9,12x12,14x14,7x7'"),
    _f("model_kwargs", {}, "dict", "JSON/yaml mapping of keyword arguments for timm.create_model of the backbone"),
    _f("family_kwargs", {}, "dict", "backbone keyword arguments by family (pvt, swin, cswin), under model_kwargs"),
    _f("drop_path", None, "float", "backbone drop-path rate (default: the recipe's drop_path_rates entry)", True),
    _f("drop_path_rates", {}, "dict", "official drop-path rate by '<family>_<head>' and backbone size"),
    _f("batch_size", 2, "int", "training batch size (official: 16 in total)"),
    _f("lr", 1e-3, "float", "AdamW learning rate (after warm-up, before decay)"),
    _f("weight_decay", 1e-4, "float", "AdamW weight decay"),
    _f("no_decay", [], "strs", "comma-separated parameter-name parts without weight decay, e.g. norm,an_bias"),
    _f("model_no_decay", False, "bool", "also no weight decay for the backbone's no_weight_decay() names and "
       "no_weight_decay_keywords() keywords"),
    _f("warmup_iters", 0, "int", "linear warm-up iterations (mmcv rule: scales the decayed lr)"),
    _f("warmup_ratio", 1e-3, "float", "warm-up start factor of the lr"),
    _f("clip_grad", None, "float", "gradient norm clipping (default: off)", True),
    _f("num_train", None, "int", "embedded data: number of training images", True),
    _f("num_val", None, "int", "embedded data: number of validation images (real data: evaluate the first N)", True),
    _f("image_size", None, "int", "embedded data: image side in pixels", True),
]

DET_FIELDS: List[Field] = COMMON_FIELDS + [
    _f("detector", "mask_rcnn", "str", "detector (the official mmdet computation)",
       choices=("mask_rcnn", "cascade_mask_rcnn", "retinanet")),
    _f("detector_kwargs", {}, "dict", "JSON/yaml mapping for the detector: test_cfg / train_cfg by part (rpn, rcnn, "
       "head), e.g. {test_cfg: {rcnn: {score_thr: 0.05, max_per_img: 100}}}, with_mask ..."),
    _f("detector_defaults", {}, "dict", "detector keyword arguments by detector, under detector_kwargs"),
    _f("epochs", 12, "int", "training epochs"),
    _f("milestones", [], "floats", "comma-separated epochs (may be fractional) where the lr drops x0.1"),
    _f("min_size", 800, "int", "shorter image side of the detector's resize"),
    _f("max_size", 1333, "int", "longer image side limit of the detector's resize"),
    _f("anchor_scale", None, "float", "anchor size in strides (default: official, RPN 8, RetinaNet 4)", True),
    _f("fpn_channels", 256, "int", "FPN channels"),
    _f("fc_channels", 1024, "int", "box head FC width (Mask R-CNN, Cascade)"),
]

SEG_FIELDS: List[Field] = COMMON_FIELDS + [
    _f("head", "fpn", "str", "segmentation decoder: Semantic FPN or UperNet", choices=("fpn", "upernet")),
    _f("iters", 1000, "int", "training iterations"),
    _f("eval_interval", 250, "int", "evaluate (and write last.pth) every N iterations"),
    _f("poly_power", 0.9, "float", "power of the poly lr decay"),
    _f("crop_size", None, "int", "ADE20K training crop side (official: 512; 0: no crop)", True),
    _f("decoder_channels", None, "int", "FPN pyramid width (default 256) or UperNet width (default 512)", True),
    _f("segmentation_channels", 128, "int", "Semantic FPN branch width"),
    _f("aux_channels", 0, "int", "auxiliary FCN head width (0: none; official UperNet: 256)"),
    _f("aux_weight", 0.4, "float", "weight of the auxiliary head's loss"),
]

FIELDS_OF = {"det": DET_FIELDS, "seg": SEG_FIELDS}


def recipe_folder(task: str) -> Path:
    """The folder of the bundled ``task`` ('det' or 'seg') recipes."""
    if task not in FIELDS_OF:
        raise ValueError(f"dense task must be 'det' or 'seg', got {task!r}")
    return Path(str(resources.files("agent_attention.dense") / "recipes" / task))


def dense_recipes(task: str) -> List[str]:
    """Names of the bundled recipes of ``task``."""
    return list_recipes(recipe_folder(task))


def load_dense_recipe(task: str, name_or_path: str = "shapes", overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Field defaults <- recipe ``name_or_path`` (bundled name or yaml file) <- ``overrides``."""
    return load_recipe(name_or_path, overrides, fields=FIELDS_OF[task], folder=recipe_folder(task))


def _size_of(backbone: str) -> Optional[str]:
    from ..models.registry import ALIASES

    name = ALIASES.get(backbone, backbone)
    for size in ("tiny", "small", "medium", "large", "base"):
        if f"_{size}" in name:
            return size
    return None


def backbone_kwargs(cfg: Config, head: str) -> dict:
    """timm.create_model keyword arguments of the backbone: ``family_kwargs[family]`` <- ``model_kwargs``,
    and the drop-path rate (``drop_path`` or the recipe's official rate for ``<family>_<head>`` and size)."""
    from .backbone import family_of

    family = family_of(cfg.backbone)
    kw = dict(cfg.family_kwargs.get(family, {}) if family else {})
    kw.update(cfg.model_kwargs)
    dp = cfg.drop_path
    if dp is None:
        dp = cfg.drop_path_rates.get(f"{family}_{head}", {}).get(_size_of(cfg.backbone) or "")
    if dp is not None:
        kw["drop_path_rate"] = dp
    return kw
