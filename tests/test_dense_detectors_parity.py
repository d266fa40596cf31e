"""The official detectors against the official mmdet 2.25 outputs (``tests/data/reference/downstream``):
filled weights loaded through the official key map with ``strict=True``, the 320×416 input, every
stored tap — backbone, FPN, RPN per-level scores/deltas, proposals before and after NMS, RoI scores
and deltas per (Cascade) stage, NMS inputs/outputs, mask logits, final boxes/labels/masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from downstream_reference import case_input, filled_state, manifest as case_manifest, outputs as case_outputs

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


def assert_tap(case: str, name: str, ours: torch.Tensor, outputs: dict, rel: float) -> None:
    """``ours`` equals the stored tap (full, or the sampled values at the stored indices) within
    ``rel`` × the tap's standard deviation, with the stored shape."""
    info = case_manifest(case)["stored_outputs"][name]
    assert list(ours.shape) == list(info["shape"]), (name, tuple(ours.shape), info["shape"])
    if name + "::sample" in outputs:
        ref, got = outputs[name + "::sample"], ours.reshape(-1)[outputs[name + "::idx"].long()]
    else:
        ref, got = outputs[name], ours
    scale = float(info["std"]) if "std" in info else float(ref.double().std()) if ref.numel() > 1 else 1.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-3), f"{case} {name}: max |diff| {err:.3g} > {rel} x scale {scale:.3g}"


def match_rows(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """The rows of ``ours`` and ``ref`` are the same set in any order: each row's nearest reference
    row is within ``tol`` and the pairing is one-to-one (tied scores make the order kernel-dependent)."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    if ours.numel() == 0:
        return
    d = torch.cdist(ours.double(), ref.double())
    assert len(set(d.argmin(dim=1).tolist())) == len(ref), "rows do not pair one-to-one"
    assert d.min(dim=1).values.max().item() <= tol


def cfg_of_case(case: str) -> dict:
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
    model = build_detector(kind, backbone, 80, test_cfg=cfg_of_case(case)).eval()
    model.load_official(filled_state(case), strict=True)  # the official layout, every key
    with recording() as taps:
        out = model.predict(case_input(case))
    return case, taps, out[0], case_outputs(case), model


def test_official_layout_loads_strictly(run):
    case, model = run[0], run[4]
    keys = [e["key"] for e in case_manifest(case)["state_dict"]]
    ours = set(model.state_dict())
    assert sorted(model.official_to_ours(k) for k in keys) == sorted(ours)


def pairing(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> torch.Tensor:
    """For each reference row the index of the same row of ``ours`` (one-to-one, within ``tol``).

    Proposals or detections whose scores differ in the last bits may swap places (the official
    order depends on float noise there), so the per-RoI taps are compared after this alignment."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    if ours.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    d = torch.cdist(ref.double(), ours.double())
    j = d.argmin(dim=1)
    assert len(set(j.tolist())) == len(ref), "rows do not pair one-to-one"
    assert d.min(dim=1).values.max().item() <= tol, d.min(dim=1).values.max().item()
    return j


def aligned_taps(case: str, taps: dict, outputs: dict) -> dict:
    """The taps with per-RoI rows in the reference's order (RoIs by proposal, masks by detection)."""
    out = dict(taps)
    groups = [("rpn.proposals", ("roi", "rcnn.multiclass_nms.0.in.")),
              ("rcnn.multiclass_nms.0.out.det_bboxes", ("mask", "rcnn.multiclass_nms.0.out."))]
    for key, prefixes in groups:
        if key not in taps:
            continue
        j = pairing(taps[key], outputs[key], tol=0.05)
        for name, v in taps.items():
            if name.startswith(prefixes) and name != key or name == key:
                out[name] = v[j]
    return out


def test_every_tap(run):
    case, taps, _, outputs, _ = run
    taps = aligned_taps(case, taps, outputs)
    stored = case_manifest(case)["stored_outputs"]
    checked = 0
    for name in stored:
        if name == "input" or name.startswith("det.") or ".batched_nms." in name:
            continue
        assert name in taps, f"{case}: no tap {name}"
        group = name.split(".")[0]
        assert_tap(case, name, taps[name], outputs, REL[group])
        checked += 1
    assert checked >= 19


def test_nms_sets(run):
    """Boxes, scores and levels/classes entering NMS, and the kept detections, as sets."""
    case, taps, _, outputs, _ = run
    for pre in ("rpn.batched_nms.0", "head.batched_nms.0"):
        if pre + ".in.boxes" not in outputs:
            continue
        rows = [torch.cat([src[pre + ".in.boxes"], 100 * src[pre + ".in.scores"][:, None],
                           1000 * src[pre + ".in.idxs"][:, None].float()], dim=1) for src in (taps, outputs)]
        match_rows(*rows, tol=0.05)
        match_rows(taps[pre + ".out.dets"], outputs[pre + ".out.dets"], tol=0.05)


def test_final_detections(run):
    """mmdet's ``simple_test`` result (``bbox2result``: grouped by class): boxes, scores, labels, masks,
    rows paired with the reference's (near-tied scores may swap places within a class)."""
    case, _, out, outputs, _ = run
    dets = torch.cat([out["boxes"], out["scores"][:, None]], dim=1)
    ref = outputs["det.bboxes"]
    j = pairing(dets, ref, tol=0.05)
    assert torch.equal(out["labels"][j], outputs["det.labels"].long())
    box_err, score_err = (dets[j, :4] - ref[:, :4]).abs().max().item(), (dets[j, 4] - ref[:, 4]).abs().max().item()
    assert box_err <= 0.02 and score_err <= 1e-3, (box_err, score_err)
    info = case_manifest(case)["stored_outputs"]
    if "det.masks" not in info:
        return
    from pycocotools import mask as mask_utils

    gt = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(info["det.masks"]["rle"]))).permute(2, 0, 1).bool()
    ours = out["masks"][j][:, 0]
    assert ours.shape == gt.shape
    # pixels whose probability sits on the threshold may flip with float noise: at most 0.1 % of the mask pixels
    diff = (ours != gt).sum().item()
    assert diff <= max(3, 1e-3 * gt.sum().item()), f"{diff} mask pixels differ"
