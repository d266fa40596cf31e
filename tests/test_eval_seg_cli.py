"""``agent-attention eval-seg``: mIoU of an official-layout segmenter on an ADE20K-layout folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent_attention.cli import main
from downstream_reference import filled_state


def _ade(root, n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("validation",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "images" / split / f"a{i}.jpg")
            Image.fromarray(rng.integers(0, 4, (40, 56), dtype=np.uint8)).save(root / "annotations" / split / f"a{i}.png")
    return root


def test_eval_seg_with_a_local_official_file(tmp_path, capsys, one_thread):
    data = _ade(tmp_path / "ade")
    ckpt = tmp_path / "fpn.pth"
    torch.save({"meta": {"CLASSES": ["wall"]}, "state_dict": filled_state("fpn_agent_pvt_t")}, ckpt)
    rc = main(["eval-seg", "--model", "fpn_agent_pvt_t_40k", "--checkpoint", str(ckpt), "--data", str(data),
               "--scale", "96,64", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fpn_agent_pvt_t_40k on 2 images" in out and "paper: mIoU 40.18" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 2 and 0 <= res["mIoU"] <= 1 and len(res["per_class_IoU"]) == 150


@pytest.mark.parametrize("argv, msg", [
    (["--model", "mask_rcnn_agent_swin_t_1x", "--pretrained", "--data", "x"], "unknown seg release"),
    (["--model", "fpn_agent_pvt_t_40k", "--data", "x"], "exactly one of --pretrained and --checkpoint"),
    (["--model", "fpn_agent_pvt_t_40k", "--pretrained"], "--data is required"),
    (["--model", "fpn_agent_pvt_t_40k", "--pretrained", "--data", "/nonexistent"], "ADE20K folder needs"),
])
def test_eval_seg_usage_errors(argv, msg, capsys):
    assert main(["eval-seg"] + argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_seg_list(capsys):
    assert main(["eval-seg", "--list"]) == 0
    out = capsys.readouterr().out
    assert "upernet_agent_swin_t_160k" in out and "mIoU 46.68" in out and "(no released file)" in out
