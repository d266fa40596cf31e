"""Recipes: bundled yamls match the official table (spec §4.2), CLI overrides, validation."""
from __future__ import annotations

import argparse

import pytest
import torch

from agent_attention.train.config import (
    FIELDS, add_config_args, config_from_args, defaults, list_recipes, load_recipe, lr_scale, recipe_path,
)
from reference_utils import FULL_VARIANTS, manifest

# Spec §4.2 per-config overrides, typed in from the table:
# name: (batch/GPU, drop path, epochs, warmup, cooldown, wd, base lr, warmup lr, min lr, clip, img, test crop, EMA)
OFFICIAL = {
    "agent_deit_tiny": (512, 0.0, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_deit_small": (128, 0.1, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_deit_small_448": (64, 0.1, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 448, True, None),
    "agent_deit_base": (128, 0.3, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_pvt_tiny": (128, 0.1, 300, 5, 10, 0.05, 5e-4, 1e-6, 1e-5, None, 224, True, None),
    "agent_pvt_small": (128, 0.1, 300, 5, 10, 0.05, 5e-4, 1e-6, 1e-5, None, 224, True, None),
    "agent_pvt_medium": (128, 0.3, 300, 5, 10, 0.05, 5e-4, 1e-6, 1e-5, 1.0, 224, True, None),
    "agent_pvt_medium_256": (64, 0.3, 300, 5, 10, 0.05, 5e-4, 1e-6, 1e-5, 1.0, 256, True, None),
    "agent_pvt_large": (64, 0.3, 300, 5, 10, 0.05, 5e-4, 1e-6, 1e-5, 1.0, 224, True, None),
    "agent_swin_tiny": (128, 0.2, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_swin_small": (128, 0.3, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_swin_small_288": (64, 0.3, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 288, False, None),
    "agent_swin_base": (64, 0.5, 300, 20, 0, 0.05, 5e-4, 5e-7, 5e-6, 5.0, 224, True, None),
    "agent_swin_base_384": (32, 0.5, 30, 5, 0, 1e-8, 2e-5, 2e-8, 2e-7, 5.0, 384, False, None),
    "agent_cswin_tiny": (128, 0.2, 300, 20, 10, 0.05, 5e-4, 1e-6, 1e-5, None, 224, True, 0.99984),
    "agent_cswin_small": (128, 0.4, 300, 20, 10, 0.05, 5e-4, 1e-6, 1e-5, None, 224, True, 0.99984),
    "agent_cswin_base": (64, 0.5, 300, 20, 10, 0.1, 5e-4, 1e-6, 1e-5, None, 224, True, 0.99992),
    "agent_cswin_base_384": (32, 0.7, 20, 0, 10, 1e-8, 5e-6, 5e-6, 5e-7, None, 384, True, 0.9998),
}


def test_one_recipe_per_official_variant_plus_digits():
    assert set(list_recipes()) == set(OFFICIAL) | {"digits", "generic"}
    assert set(OFFICIAL) == set(FULL_VARIANTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_values(name):
    cfg = load_recipe(name)
    bs, dp, ep, wu, cd, wd, lr, wlr, mlr, clip, img, crop, ema = OFFICIAL[name]
    got = (cfg.batch_size, cfg.drop_path, cfg.epochs, cfg.warmup_epochs, cfg.cooldown_epochs, cfg.weight_decay,
           cfg.base_lr, cfg.warmup_lr, cfg.min_lr, cfg.clip_grad, cfg.img_size, cfg.test_crop)
    assert got == (bs, dp, ep, wu, cd, wd, lr, wlr, mlr, clip, img, crop)
    assert cfg.model_ema == (ema is not None)
    if ema is not None:
        assert cfg.model_ema_decay == ema
    # shared official defaults
    assert (cfg.auto_augment, cfg.reprob, cfg.remode, cfg.mixup, cfg.cutmix, cfg.label_smoothing) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", 0.8, 1.0, 0.1)
    assert cfg.repeated_aug == 0 and cfg.lr_scale_batch == 512 and cfg.interpolation == "bicubic"
    assert cfg.crop_pct == 0.875 and cfg.eval_resize == "square" and cfg.amp == "none"
    # the recipe's model and geometry agree with the official manifest of the variant
    man = manifest(name)
    assert cfg.model == man["name"] and cfg.img_size == man["img_size"]
    assert cfg.drop_path == pytest.approx(man["constructor_kwargs"].get("drop_path_rate", cfg.drop_path))
    assert bool(cfg.finetune_from) == name.endswith("_384")


def test_recipe_models_are_registered():
    from agent_attention.models import list_models

    known = set(list_models())
    for name in list_recipes():
        assert load_recipe(name).model in known


@pytest.mark.parametrize("name", ["agent_deit_small_448", "agent_pvt_medium_256", "digits"])
def test_recipe_builds_model_with_official_param_count(name):
    from agent_attention.train.evaluation import build_model

    cfg = load_recipe(name)
    with torch.device("meta"):
        model = build_model(cfg.model, 1000, img_size=cfg.img_size, drop_path=cfg.drop_path,
                            model_kwargs=cfg.model_kwargs)
    n = sum(p.numel() for p in model.parameters())
    if name == "digits":
        assert n < 1_000_000
    else:
        assert n == manifest(name)["num_params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_recipe_builds_model_with_official_param_count(name):
    from agent_attention.train.evaluation import build_model

    cfg = load_recipe(name)
    with torch.device("meta"):
        model = build_model(cfg.model, 1000, img_size=cfg.img_size, drop_path=cfg.drop_path)
    assert sum(p.numel() for p in model.parameters()) == manifest(name)["num_params"]


def test_aliases_and_paths(tmp_path):
    assert recipe_path("agent_swin_t").stem == "agent_swin_tiny"
    p = tmp_path / "mine.yaml"
    p.write_text("model: agent_pvt_tiny\nepochs: 3\nwarmup_epochs: 1\n")
    cfg = load_recipe(str(p))
    assert cfg.model == "agent_pvt_tiny" and cfg.epochs == 3 and cfg.batch_size == 128  # default kept
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("agent_swin_tinyy")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p)
    return config_from_args(p.parse_args(argv))


def test_cli_flags_override_every_kind():
    cfg = _parse(["--recipe", "agent_swin_tiny", "--epochs", "7", "--warmup-epochs", "2", "--base-lr", "1e-3", "--no-test-crop",
                  "--model-ema", "--scale", "0.5", "1.0", "--clip-grad", "none", "--auto-augment", "none",
                  "--amp", "bf16", "--model-kwargs", "{attn_type: AAAA}", "--data-path", "/x"])
    assert (cfg.epochs, cfg.base_lr, cfg.test_crop, cfg.model_ema) == (7, 1e-3, False, True)
    assert cfg.scale == [0.5, 1.0] and cfg.clip_grad is None and cfg.auto_augment is None
    assert cfg.amp == "bf16" and cfg.model_kwargs == {"attn_type": "AAAA"} and cfg.data == "/x"
    assert cfg.drop_path == 0.2  # untouched recipe value


def test_every_field_has_a_flag():
    p = argparse.ArgumentParser()
    add_config_args(p)
    flags = {a.dest for a in p._actions}
    assert {f.name for f in FIELDS} <= flags


def test_set_items_and_precedence():
    cfg = _parse(["--set", "epochs=9", "--set", "model_kwargs.depth=2", "--set", "ratio=[0.9, 1.1]", "--epochs", "4"])
    assert cfg.epochs == 4  # explicit flag wins over --set
    assert cfg.model_kwargs["depth"] == 2 and cfg.model_kwargs["embed_dim"] == 64  # merged into the recipe's
    assert cfg.ratio == [0.9, 1.1]


@pytest.mark.parametrize("item, match", [
    ("epoch=3", "unknown recipe field 'epoch'.*epochs"),
    ("epochs=3.5", "expects int"),
    ("amp=fp8", "must be one of"),
    ("model_kwargs=[1]", "expects dict"),
])
def test_bad_values_are_clear_errors(item, match):
    with pytest.raises(ValueError, match=match):
        _parse(["--set", item])


def test_lr_scaling_rule():
    cfg = load_recipe("agent_swin_tiny")
    assert cfg.base_lr * lr_scale(cfg, 8) == pytest.approx(1e-3)  # 128 x 8 / 512 x 5e-4
    cfg = load_recipe("agent_cswin_base_384")
    assert cfg.base_lr * lr_scale(cfg, 8) == pytest.approx(2.5e-6)
    cfg.accum_steps = 2
    assert lr_scale(cfg, 8) == pytest.approx(1.0)
    cfg.lr_scale_batch = None
    assert lr_scale(cfg, 8) == 1.0


def test_defaults_are_the_official_ones():
    d = defaults()
    assert (d.batch_size, d.epochs, d.warmup_epochs, d.base_lr, d.warmup_lr, d.min_lr, d.weight_decay,
            d.clip_grad, d.drop_path, d.mixup_switch_prob, d.mixup_mode) == (
        128, 300, 20, 5e-4, 5e-7, 5e-6, 0.05, 5.0, 0.1, 0.5, "batch")
