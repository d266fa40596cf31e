"""The official detectors against the official mmdet 2.25 outputs (``tests/data/reference/downstream``):
filled weights loaded through the official key map with ``strict=True``, the 320×416 input, every
stored tap — backbone, FPN, RPN per-level scores/deltas, proposals before and after NMS, RoI scores
and deltas per (Cascade) stage, NMS inputs/outputs, mask logits, final boxes/labels/masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dense_reference import assert_tap, case_input, case_manifest, case_outputs, filled_state, match_rows

CASES = {
    "mrcnn_agent_pvt_t": ("mask_rcnn", "agent_pvt_tiny"),
    "retinanet_agent_pvt_t": ("retinanet", "agent_pvt_tiny"),
    "mrcnn_agent_swin_t": ("mask_rcnn", "agent_swin_tiny"),
    "cmrcnn_agent_swin_t": ("cascade_mask_rcnn", "agent_swin_tiny"),
}

# max |ours - official| in units of the tap's standard deviation (float32 sums in another order,
# amplified along the chain); boxes in units of their spread (~100 pixels)
REL = {"backbone": 2e-5, "neck": 2e-5, "rpn_head": 1e-4, "bbox_head": 1e-4, "rpn": 2e-4, "roi": 3e-3, "rcnn": 3e-3,
       "mask": 3e-3, "det": 3e-3, "head": 2e-4}


def test_cfg_of(case: str) -> dict:
    """The manifest's ``test_cfg_used`` in this project's names."""
    tc = case_manifest(case)["test_cfg_used"]
    if "rcnn" not in tc:
        return {"head": dict(nms_pre=tc["nms_pre"], score_thr=tc["score_thr"], iou_threshold=tc["nms"]["iou_threshold"],
                             max_per_img=tc["max_per_img"])}
    r, p = tc["rcnn"], tc["rpn"]
    return {"rpn": dict(nms_pre=p["nms_pre"], max_per_img=p["max_per_img"], iou_threshold=p["nms"]["iou_threshold"],
                        min_bbox_size=p["min_bbox_size"]),
            "rcnn": dict(score_thr=r["score_thr"], iou_threshold=r["nms"]["iou_threshold"], max_per_img=r["max_per_img"],
                         mask_thr_binary=r["mask_thr_binary"])}


@pytest.fixture(scope="module", params=list(CASES))
def run(request):
    from agent_attention.dense.detectors import build_detector, recording

    case = request.param
    kind, backbone = CASES[case]
    torch.manual_seed(0)
    model = build_detector(kind, backbone, 80, test_cfg=test_cfg_of(case)).eval()
    state = filled_state(case, model.state_dict(), model.official_to_ours)
    model.load_official(state, strict=True)  # the official layout, every key
    with recording() as taps:
        out = model.predict(case_input(case))
    return case, taps, out[0], case_outputs(case)


def test_official_layout_loads_strictly(run):
    case, _, _, _ = run
    kind, backbone = CASES[case]
    from agent_attention.dense.detectors import build_detector

    model = build_detector(kind, backbone, 80)
    keys = [e["key"] for e in case_manifest(case)["state_dict"]]
    ours = set(model.state_dict())
    assert sorted(model.official_to_ours(k) for k in keys) == sorted(ours)


def test_every_tap(run):
    case, taps, _, outputs = run
    stored = case_manifest(case)["stored_outputs"]
    checked = 0
    for name, info in stored.items():
        if name == "input" or name.startswith("det.") or ".batched_nms." in name:
            continue
        assert name in taps, f"{case}: no tap {name}"
        group = name.split(".")[0]
        assert_tap(case, name, taps[name], outputs, REL[group])
        checked += 1
    assert checked >= 19


def test_nms_sets(run):
    """Boxes, scores and levels/classes entering NMS, and the kept detections, as sets."""
    case, taps, _, outputs = run
    for pre in ("rpn.batched_nms.0", "head.batched_nms.0"):
        if pre + ".in.boxes" not in outputs:
            continue
        rows = lambda src: torch.cat([src[pre + ".in.boxes"], 100 * src[pre + ".in.scores"][:, None],  # noqa: E731
                                      1000 * src[pre + ".in.idxs"][:, None].float()], dim=1)
        match_rows(rows(taps), rows(outputs), tol=0.05)
        match_rows(taps[pre + ".out.dets"], outputs[pre + ".out.dets"], tol=0.05)


def test_final_detections(run):
    """mmdet's ``simple_test`` result (grouped by class, as ``bbox2result``): boxes, scores, labels, masks."""
    case, _, out, outputs = run
    order = torch.sort(out["labels"], stable=True).indices
    assert torch.equal(out["labels"][order], outputs["det.labels"].long())
    dets = torch.cat([out["boxes"], out["scores"][:, None]], dim=1)[order]
    ref = outputs["det.bboxes"]
    box_err, score_err = (dets[:, :4] - ref[:, :4]).abs().max().item(), (dets[:, 4] - ref[:, 4]).abs().max().item()
    assert box_err <= 0.02 and score_err <= 1e-3, (box_err, score_err)
    info = case_manifest(case)["stored_outputs"]
    if "det.masks" not in info:
        return
    from pycocotools import mask as mask_utils

    gt = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(info["det.masks"]["rle"]))).permute(2, 0, 1).bool()
    ours = out["masks"][order][:, 0]
    assert ours.shape == gt.shape
    # pixels whose probability sits on the threshold may flip with float noise: at most 0.1 % of the mask pixels
    diff = (ours != gt).sum().item()
    assert diff <= max(3, 1e-3 * gt.sum().item()), f"{diff} mask pixels differ"
