"""Agent backbones with the official downstream settings = the official mmdet / mmseg backbones:
the released layout loads with strict=True and the four stage outputs equal the official ones in all
six reference cases (Swin: the downstream window blocks, padding included)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from agent_attention.dense import AgentBackbone
from downstream_reference import CASE_BACKBONE, CASES, case_input, check_tap, filled_state, manifest, prefixed

pytestmark = pytest.mark.usefixtures("one_thread")


def official_backbone(case: str, **kwargs) -> AgentBackbone:
    bb = AgentBackbone(CASE_BACKBONE[case], size_divisor=1, **kwargs).eval()
    bb.load_official_state_dict(prefixed(filled_state(case), "backbone."), strict=True)
    return bb


@lru_cache(maxsize=None)
def _features(case: str, downstream_windows: bool = True):
    with torch.no_grad():
        return tuple(official_backbone(case, downstream_windows=downstream_windows)(case_input(case)))


def _same_backbone(case: str) -> str:
    """The cases share their backbone weights (the fill depends on the key only) and input: one forward
    per backbone serves every case of that backbone."""
    return next(c for c in CASES if CASE_BACKBONE[c] == CASE_BACKBONE[case]
                and manifest(c)["input"]["shape"] == manifest(case)["input"]["shape"])


@pytest.mark.parametrize("case", CASES)
def test_backbone_equals_official(case):
    feats = _features(_same_backbone(case))
    assert len(feats) == 4
    for i, f in enumerate(feats):
        check_tap(case, f"backbone.{i}", f, rtol=1e-5, atol=1e-5)


def test_swin_classifier_window_blocks_differ_at_stage_4():
    """The classifier's window blocks (padded keys masked, window capped) give another stage 4 on
    320x416 (10x13 map): the downstream rule is what makes the parity above hold."""
    case = "upernet_agent_swin_t"
    feats = _features(case, downstream_windows=False)
    for i in range(3):
        check_tap(case, f"backbone.{i}", feats[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        check_tap(case, "backbone.3", feats[3], rtol=1e-3, atol=1e-3)


def test_official_layout_strict_errors():
    bb = AgentBackbone("agent_swin_tiny", size_divisor=1)
    state = prefixed(filled_state("upernet_agent_swin_t"), "backbone.")
    state.pop("norm3.weight")
    with pytest.raises(ValueError, match=r"does not fit \(missing \['norm3.weight'\]"):
        bb.load_official_state_dict(state)
