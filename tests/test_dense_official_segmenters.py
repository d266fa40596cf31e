"""The official segmenters: Semantic FPN (Agent-PVT-T) and UperNet (Agent-Swin-T) load the official
mmseg layout with strict=True and reproduce the official outputs at every stored tap (FPN neck,
decode-head logits, encode_decode, the predicted class map, UperNet's auxiliary head)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from agent_attention.dense import build_segmenter
from downstream_reference import case_input, check_tap, filled_state, layout, manifest, outputs

pytestmark = pytest.mark.usefixtures("one_thread")

SEG_CASES = {"fpn_agent_pvt_t": ("fpn", "agent_pvt_tiny"), "upernet_agent_swin_t": ("upernet", "agent_swin_tiny")}


def official_segmenter(case: str):
    kind, backbone = SEG_CASES[case]
    model = build_segmenter(kind, backbone, num_classes=150).eval()
    model.load_official_state_dict(filled_state(case), strict=True)
    return model


@lru_cache(maxsize=None)
def _run(case: str):
    model = official_segmenter(case)
    x = case_input(case)
    with torch.no_grad():
        feats = model.extract_feat(x)
        logits = model.decode_head(feats)
        aux = model.auxiliary_head(feats[2]) if model.auxiliary_head is not None else None
        enc = model.encode_decode(x)
    return feats, logits, aux, enc


@pytest.mark.parametrize("case", SEG_CASES)
def test_official_layout_is_ours(case):
    model = build_segmenter(*SEG_CASES[case], num_classes=150)
    ours = {model.official_key(k): s for k, s in layout(case).items()}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", SEG_CASES)
def test_segmenter_equals_official(case):
    feats, logits, aux, enc = _run(case)
    stored = manifest(case)["stored_outputs"]
    if "neck.0" in stored:
        for i, f in enumerate(feats):
            check_tap(case, f"neck.{i}", f, rtol=1e-5, atol=1e-5)
    check_tap(case, "decode_head.logits", logits, rtol=1e-5, atol=1e-5)
    check_tap(case, "seg.encode_decode", enc, rtol=1e-5, atol=1e-5)
    if aux is not None:
        check_tap(case, "auxiliary_head.logits", aux, rtol=1e-5, atol=1e-5)
    pred = enc.softmax(1).argmax(1)[0]
    want = outputs(case)["seg.pred"].long()
    assert pred.shape == want.shape
    # logits equal to ~1e-6: only pixels whose two best classes are that close may swap
    top2 = enc[0].topk(2, dim=0).values
    close = (top2[0] - top2[1]) < 1e-4
    wrong = pred != want
    assert bool(close[wrong].all()) and int(wrong.sum()) <= 1e-4 * want.numel(), int(wrong.sum())


def test_predict_matches_encode_decode_argmax():
    case = "fpn_agent_pvt_t"
    model = official_segmenter(case)
    x = case_input(case)
    images = x * model.image_std + model.image_mean  # back to [0, 1] space: forward normalises
    with torch.no_grad():
        pred = model.predict(images)
    assert torch.equal(pred, _run(case)[3].argmax(1))
