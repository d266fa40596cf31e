"""Dense training: a few optimiser steps reduce the loss; schedules; the CLI end to end with resume."""
from __future__ import annotations

import json

import pytest
import torch

from agent_attention.dense import build_detector, build_segmenter
from agent_attention.dense.data import ShapesDetection, ShapesSegmentation, detection_collate, segmentation_collate
from agent_attention.dense.engine import SWIN_NO_DECAY, Schedule, build_optimizer, detection_loss, segmentation_loss

PVT = dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
           agent_num=[4, 9, 4, 4])
MODEL_KWARGS = json.dumps(PVT)


pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(model, batch, loss_fn, n=6, lr=2e-3):
    opt = build_optimizer(model, lr, 1e-4)
    model.train()
    losses = []
    for _ in range(n):
        torch.manual_seed(0)  # same proposal sampling / dropout each step: the loss curve is comparable
        loss = sum(loss_fn(model, batch, "cpu").values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_segmenter_steps_reduce_loss():
    torch.manual_seed(0)
    model = build_segmenter("upernet", "agent_pvt_tiny", 4, decoder_channels=32, aux_channels=16, agent_shapes="native",
                            backbone_kwargs=PVT)
    batch = segmentation_collate([ShapesSegmentation(4, (64, 80))[i] for i in range(4)])
    losses = _steps(model, batch, segmentation_loss)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_detector_steps_reduce_loss(kind):
    torch.manual_seed(0)
    extra = dict(box_rep_size=64, mask_channels=16) if kind == "mask_rcnn" else {}
    model = build_detector(kind, "agent_pvt_tiny", 4, fpn_channels=32, min_size=64, max_size=80, anchor_size=8,
                           agent_shapes="native", backbone_kwargs=PVT, **extra)
    ds = ShapesDetection(2, (64, 80))
    batch = detection_collate([ds[0], ds[1]])
    losses = _steps(model, batch, detection_loss, n=8, lr=1e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def test_schedules():
    s = Schedule(100, "step", warmup_steps=10, warmup_ratio=0.001, milestones=[60, 90])
    assert s.factor(0) == pytest.approx(0.001) and s.factor(5) == pytest.approx(0.001 + 0.5 * 0.999)
    assert s.factor(10) == 1.0 and s.factor(60) == pytest.approx(0.1) and s.factor(95) == pytest.approx(0.01)
    p = Schedule(100, "poly", power=1.0)
    assert p.factor(0) == 1.0 and p.factor(50) == pytest.approx(0.5) and p.factor(100) == 0.0
    with pytest.raises(ValueError, match="kind"):
        Schedule(10, "cosine")


def test_no_decay_groups():
    model = build_segmenter("fpn", "agent_swin_tiny", 3, decoder_channels=32, segmentation_channels=32,
                            backbone_kwargs=dict(img_size=64, embed_dim=16, depths=[1, 1, 1, 2], num_heads=[1, 2, 2, 4],
                                                 agent_num=4))
    opt = build_optimizer(model, 1e-4, 0.05, SWIN_NO_DECAY)
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert any("an_bias" in n for n in names) and any("relative_position_bias_table" in n for n in names)
    assert any(n.startswith("backbone.norm0") for n in names)
    assert not any(n.endswith("qkv.weight") for n in names) and opt.param_groups[1]["weight_decay"] == 0.0


def _cli(main, out, *extra):
    return main(["--output", str(out), "--num-train", "4", "--num-val", "4", "--image-size", "64", "--batch-size", "2",
                 "--model-kwargs", MODEL_KWARGS, "--no-progress", *extra])


def test_train_det_cli_resume_and_eval(tmp_path):
    from agent_attention.dense.main import train_det_main

    out = tmp_path / "det"
    assert _cli(train_det_main, out, "--epochs", "1", "--min-size", "64", "--max-size", "64") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["history"][-1]["step"] == 2 and "bbox_mAP" in summary["init"] and "segm_mAP" in summary["final"]
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    # resume: continues at step 2 up to 4 (2 epochs), keeping the history
    assert _cli(train_det_main, out, "--epochs", "2", "--min-size", "64", "--max-size", "64", "--resume", "auto") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]] == [2, 4]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["init"]
    assert _cli(train_det_main, out, "--eval-only", "--checkpoint", str(out / "last.pth"), "--min-size", "64",
                "--max-size", "64") == 0


def test_train_seg_cli(tmp_path, capsys):
    from agent_attention.dense.main import train_seg_main

    out = tmp_path / "seg"
    assert _cli(train_seg_main, out, "--iters", "3", "--eval-interval", "2", "--head", "upernet",
                "--aux-channels", "16", "--decoder-channels", "32") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]] == [2, 3]
    assert 0 <= summary["final"]["mIoU"] <= 1 and "loss_aux" in summary["final"]
    assert "mIoU" in capsys.readouterr().out


def test_cli_requires_preset_for_real_data(tmp_path):
    from agent_attention.dense.main import train_seg_main

    with pytest.raises(SystemExit):
        train_seg_main(["--data", str(tmp_path)])
