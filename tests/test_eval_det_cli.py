"""``agent-attention eval-det``: COCO mAP of an official-layout detector on a COCO-format folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent_attention.cli import main
from downstream_reference import filled_state


def _coco(root, n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "val2017" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 48, "width": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 3 * (i + 1), "bbox": [8, 6, 30, 20], "area": 600,
                     "iscrowd": 0, "segmentation": [[8, 6, 38, 6, 38, 26, 8, 26]]})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 91) if c % 9]  # 80 ids with gaps, as COCO's
    assert len(cats) == 80
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.mark.parametrize("name, case", [("mask_rcnn_agent_pvt_t_1x", "mrcnn_agent_pvt_t"),
                                        ("retinanet_agent_pvt_t_1x", "retinanet_agent_pvt_t")])
def test_eval_det_with_a_local_official_file(name, case, tmp_path, capsys):
    data = _coco(tmp_path / "coco")
    ckpt = tmp_path / "det.pth"
    torch.save({"meta": {"CLASSES": ["person"], "epoch": 12}, "state_dict": filled_state(case)}, ckpt)
    rc = main(["eval-det", "--model", name, "--checkpoint", str(ckpt), "--data", str(data), "--scale", "96,64",
               "--no-progress", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{name} on 2 images" in out and "paper: box" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 2 and 0 <= res["bbox_mAP"] <= 1 and ("segm_mAP" in res) == name.startswith("mask")


@pytest.mark.parametrize("argv, msg", [
    (["--model", "upernet_agent_swin_t_160k", "--pretrained", "--data", "x"], "unknown det release"),
    (["--model", "mask_rcnn_agent_pvt_t_1x", "--data", "x"], "exactly one of --pretrained and --checkpoint"),
    (["--model", "mask_rcnn_agent_pvt_t_1x", "--pretrained"], "--data is required"),
    (["--model", "mask_rcnn_agent_pvt_t_1x", "--pretrained", "--data", "/nonexistent"], "COCO annotation file not found"),
])
def test_eval_det_usage_errors(argv, msg, capsys):
    assert main(["eval-det"] + argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_det_list(capsys):
    assert main(["eval-det", "--list"]) == 0
    out = capsys.readouterr().out
    assert "cascade_mask_rcnn_agent_swin_b_3x" in out and "box 44.6 / mask 40.7" in out and "retinanet_agent_pvt_l_1x" in out
