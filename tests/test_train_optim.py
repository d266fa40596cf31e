"""AdamW parameter groups and the per-iteration cosine schedule (spec §4.3)."""
from __future__ import annotations

import math

import pytest
import torch

from agent_attention.models import create_model
from agent_attention.train.optim import build_optimizer, build_scheduler, param_groups


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_official_rule_deit():
    model = create_model("agent_deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         agent_num=4, num_classes=10)
    decay, no_decay = (_names(model, g) for g in param_groups(model, 0.05))
    assert decay.isdisjoint(no_decay) and decay | no_decay == {n for n, _ in model.named_parameters()}
    # agent biases are >= 2-D and end in '_bias': decayed, as in the official training
    agent_biases = {n for n in decay if n.rsplit(".", 1)[-1] in ("an_bias", "na_bias", "ah_bias", "aw_bias",
                                                                   "ha_bias", "wa_bias", "ac_bias", "ca_bias")}
    assert len(agent_biases) == 2 * 8
    assert {"pos_embed", "cls_token"} <= no_decay  # no_weight_decay()
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 or n in ("pos_embed", "cls_token")
               for n in no_decay)
    assert "blocks.0.norm1.weight" in no_decay and "blocks.0.attn.qkv.bias" in no_decay
    assert "blocks.0.attn.qkv.weight" in decay and "blocks.0.attn.dwc.weight" in decay
    assert "blocks.0.attn.dwc.bias" in no_decay


def test_param_groups_keywords_swin():
    model = create_model("agent_swin_tiny", img_size=64, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2],
                         window_size=2, num_classes=5, attn_type="AABB")
    decay, no_decay = (_names(model, g) for g in param_groups(model, 0.05))
    tables = {n for n, _ in model.named_parameters() if "relative_position_bias_table" in n}
    assert tables and tables <= no_decay  # no_weight_decay_keywords()
    opt = build_optimizer(model, 1e-3, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def _lrs(sched, opt, total):
    out = []
    for t in range(total):
        sched.step_update(t)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_cosine_schedule_per_iteration():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    base, warm, low, iters = 1e-3, 1e-6, 1e-5, 10
    opt = torch.optim.AdamW([p], lr=base)
    sched = build_scheduler(opt, epochs=5, warmup_epochs=1, updates_per_epoch=iters, min_lr=low, warmup_lr=warm)
    assert opt.param_groups[0]["lr"] == pytest.approx(warm)  # starts at the warm-up lr
    lrs = _lrs(sched, opt, 70)  # 5 epochs + 2 cool-down epochs
    # linear warm-up from warmup_lr on the absolute step
    for t in range(iters):
        assert lrs[t] == pytest.approx(warm + t * (base - warm) / iters)
    # cosine on the absolute step (no warm-up prefix), reaching min_lr at t_initial = 50
    for t in (10, 25, 40, 49):
        want = low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / 50))
        assert lrs[t] == pytest.approx(want)
    assert all(lr == pytest.approx(low) for lr in lrs[50:])  # cool-down stays at min_lr
