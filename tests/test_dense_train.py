"""Dense training: a few optimiser steps reduce the loss; the CLI end to end with resume.

Recipes, parameter groups, schedules and the sampler against the former code: test_dense_recipes.py."""
from __future__ import annotations

import json

import pytest
import torch

from agent_attention.dense import build_detector, build_segmenter
from agent_attention.dense.data import ShapesDetection, ShapesSegmentation, detection_collate, segmentation_collate
from agent_attention.dense.engine import detection_loss, segmentation_loss
from agent_attention.train.optim import build_optimizer

PVT = dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
           agent_num=[4, 9, 4, 4])
MODEL_KWARGS = json.dumps(PVT)


pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(model, batch, loss_fn, n=6, lr=2e-3):
    opt = build_optimizer(model, lr, 1e-4, no_decay_1d=False, model_no_decay=False)
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


@pytest.mark.parametrize("kind", ["upernet", "fpn"])
def test_segmenter_steps_reduce_loss(kind):
    """The official heads (UperNet with its auxiliary FCN head, Semantic FPN) train with the engine's loss."""
    torch.manual_seed(0)
    model = build_segmenter(kind, "agent_pvt_tiny", 4, decoder_channels=32, segmentation_channels=16,
                            aux_channels=16 if kind == "upernet" else None, agent_shapes="native", backbone_kwargs=PVT)
    batch = segmentation_collate([ShapesSegmentation(4, (64, 80))[i] for i in range(4)])
    losses = _steps(model, batch, segmentation_loss)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn", "cascade_mask_rcnn"])
def test_detector_steps_reduce_loss(kind):
    """The official detectors (the modules that load the released files, here with a small backbone
    and narrow heads) fine-tune on the embedded shapes data: a few AdamW steps lower the loss."""
    torch.manual_seed(0)
    small = dict(train_cfg={"rpn": {"num": 64, "nms_pre": 300, "max_per_img": 100}, "rcnn": {"num": 64}})
    model = build_detector(kind, "agent_pvt_tiny", 3, fpn_channels=32, fc_channels=64, min_size=64, max_size=80,
                           anchor_scale=2, agent_shapes="native", backbone_kwargs=PVT, **small)
    ds = ShapesDetection(2, (64, 80))
    batch = detection_collate([ds[0], ds[1]])
    losses = _steps(model, batch, detection_loss, n=8, lr=1e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def _cli(main, out, *extra):
    return main(["--output", str(out), "--num-train", "4", "--num-val", "4", "--image-size", "64", "--batch-size", "2",
                 "--model-kwargs", MODEL_KWARGS, "--no-progress", *extra])


def _strict_json_lines(path):
    def no_constant(name):
        raise AssertionError(f"{path} holds a bare {name}")

    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]


def test_train_det_cli_resume_and_eval(tmp_path, capsys):
    from agent_attention.commands.train_det import main as train_det_main

    out = tmp_path / "det"
    assert _cli(train_det_main, out, "--epochs", "1", "--min-size", "64", "--max-size", "64") == 0
    assert "epoch 1/1, step 2/2: loss" in capsys.readouterr().out  # 1-based epochs
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["history"][-1]["step"] == 2 and "bbox_mAP" in summary["init"] and "segm_mAP" in summary["final"]
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    # resume: continues at step 2 up to 4 (2 epochs), keeping the history
    assert _cli(train_det_main, out, "--epochs", "2", "--min-size", "64", "--max-size", "64", "--resume", "auto") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]] == [2, 4]
    printed = capsys.readouterr().out
    assert "at step 2/4 (epoch 2, 0 of its 2 steps done)" in printed and "epoch 2/2, step 4/4" in printed
    lines = _strict_json_lines(out / "log.jsonl")
    assert len(lines) == 3 and lines[0]["init"]
    assert _cli(train_det_main, out, "--eval-only", "--checkpoint", str(out / "last.pth"), "--min-size", "64",
                "--max-size", "64") == 0


def test_train_seg_cli(tmp_path, capsys):
    from agent_attention.commands.train_seg import main as train_seg_main

    out = tmp_path / "seg"
    assert _cli(train_seg_main, out, "--iters", "3", "--eval-interval", "2", "--head", "upernet",
                "--aux-channels", "16", "--decoder-channels", "32") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]] == [2, 3]
    assert 0 <= summary["final"]["mIoU"] <= 1 and "loss_aux" in summary["final"]
    assert "mIoU" in capsys.readouterr().out


def test_cli_requires_preset_for_real_data(tmp_path, capsys):
    from agent_attention.commands.train_seg import main as train_seg_main

    with pytest.raises(SystemExit) as e:
        train_seg_main(["--data", str(tmp_path)])
    assert e.value.code == 2 and "--data needs a --preset" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train_det", "train_seg"])
def test_cli_help_for_every_option(command):
    import importlib

    parser = importlib.import_module(f"agent_attention.commands.{command}").build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    text = parser.format_help()
    assert "`" not in text and ("--milestones" if command == "train_det" else "--iters") in text


@pytest.mark.parametrize("argv, message", [
    (["--model-kwargs", "{not json"], "argument --model-kwargs: not valid JSON"),
    (["--model-kwargs", "[1]"], "must be a JSON object"),
    (["--detector", "yolo"], "invalid choice"),
])
def test_cli_usage_errors(argv, message, capsys):
    from agent_attention.commands.train_det import main as train_det_main

    with pytest.raises(SystemExit) as e:
        train_det_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_bad_recipe_values_are_one_line_errors(tmp_path):
    from agent_attention.commands.train_det import main as train_det_main

    with pytest.raises(ValueError, match="unknown recipe field 'epoch'; did you mean epochs"):
        train_det_main(["--set", "epoch=3"])
    with pytest.raises(ValueError, match="unknown recipe 'coco_1x'"):
        train_det_main(["--preset", "coco_1x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        train_det_main(["--preset", str(bad)])
    with pytest.raises(ValueError, match="'epochs' must be >= 1, got 0"):
        _cli(train_det_main, tmp_path / "x", "--epochs", "0", "--no-eval-init")
    with pytest.raises(ValueError, match="'clip_grad' must be > 0"):
        _cli(train_det_main, tmp_path / "x", "--epochs", "1", "--clip-grad", "-1", "--no-eval-init")


def test_training_is_reproducible_whatever_the_python_rng(tmp_path):
    """The data sets' random flips are drawn from RNGs seeded by (seed, epoch, index), not from the
    process's global Python RNG (unseeded with --workers 0)."""
    import random

    from agent_attention.commands.train_seg import main as train_seg_main
    from agent_attention.weights import load_checkpoint

    states = []
    for run, py_seed in enumerate((1, 2)):
        random.seed(py_seed)
        out = tmp_path / f"run{run}"
        assert _cli(train_seg_main, out, "--iters", "4", "--eval-interval", "4", "--no-eval-init",
                    "--num-train", "8") == 0
        states.append(load_checkpoint(str(out / "last.pth"))["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_released_layout_detector_fine_tunes(tmp_path):
    """The released Mask R-CNN + Agent-PVT-T at its full widths (80 classes, the official layout),
    started from an official-layout file through ``init_from_official`` exactly as a released
    checkpoint is, fine-tunes on the embedded shapes data: a few steps lower its loss."""
    from downstream_reference import filled_state
    from safetensors.torch import save_file

    from agent_attention.dense.detectors.pretrained import build_released_detector, init_from_official

    torch.manual_seed(0)
    weights = tmp_path / "mask_rcnn_agent_pvt_t_1x.safetensors"
    save_file({k: v.contiguous() for k, v in filled_state("mrcnn_agent_pvt_t").items()}, str(weights))
    model = build_released_detector("mask_rcnn_agent_pvt_t_1x")
    report = init_from_official(model, str(weights), progress=False)
    assert report["loaded"] > 0 and not report["fresh"]  # 80 classes: every entry loads
    model.min_size, model.max_size = 128, 160
    ds = ShapesDetection(2, (128, 160))
    losses = _steps(model, detection_collate([ds[0], ds[1]]), detection_loss, n=4, lr=1e-4)
    assert losses[-1] < losses[0], losses
