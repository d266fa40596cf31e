"""The 16 released detectors: every configuration builds with the layout its official config implies
(heads from the three reference layouts, FPN input widths from the backbone) and the official README's
parameter count; download from a loopback server, safe loading, the cache, wrong files refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from agent_attention.dense.detectors import build_released_detector, pretrained_detector
from agent_attention.dense.pretrained import fetch_release, release_cache_path
from agent_attention.dense.releases import CONFIGS, get_release
from downstream_reference import layout
from pretrained_support import LoopbackServer

CASE_OF_HEAD = {"mask_rcnn": "mrcnn_agent_swin_t", "cascade_mask_rcnn": "cmrcnn_agent_swin_t",
                "retinanet": "retinanet_agent_pvt_t"}
WIDTHS = {"agent_swin_tiny": [96, 192, 384, 768], "agent_swin_small": [96, 192, 384, 768],
          "agent_swin_base": [128, 256, 512, 1024], "agent_pvt_tiny": [64, 128, 320, 512],
          "agent_pvt_small": [64, 128, 320, 512], "agent_pvt_medium": [64, 128, 320, 512],
          "agent_pvt_large": [64, 128, 320, 512]}
DET = [n for n, r in CONFIGS.items() if r.task == "det"]


def head_layout(name: str) -> dict:
    """Neck and heads of the official config: the reference layout of the same head, with the FPN's
    lateral input widths of this backbone (RetinaNet: stages 2-4, and P6 from stage 4)."""
    r = CONFIGS[name]
    out = {k: v for k, v in layout(CASE_OF_HEAD[r.head]).items() if not k.startswith("backbone.")}
    c = WIDTHS[r.backbone]
    first = 1 if r.head == "retinanet" else 0
    for k, s in list(out.items()):
        if k.startswith("neck.lateral_convs.") and k.endswith("weight"):
            out[k] = (s[0], c[first + int(k.split(".")[2])]) + s[2:]
        elif r.head == "retinanet" and k == "neck.fpn_convs.3.conv.weight":
            out[k] = (s[0], c[3]) + s[2:]
    return out


def test_sixteen_detection_releases():
    assert len([n for n in DET if CONFIGS[n].released]) == 16


@pytest.mark.parametrize("name", DET)
def test_release_detector_layout(name):
    with torch.device("meta"):
        model = build_released_detector(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert ours == {model.official_to_ours(k): v for k, v in head_layout(name).items()}
    assert model.num_classes == 80
    # the official README's parameter counts (millions, rounded)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(CONFIGS[name].params_m, abs=0.6)


def test_head_layout_rule_is_the_reference_where_one_exists():
    for name, case in (("mask_rcnn_agent_pvt_t_1x", "mrcnn_agent_pvt_t"), ("retinanet_agent_pvt_t_1x", "retinanet_agent_pvt_t"),
                       ("cascade_mask_rcnn_agent_swin_t_1x", "cmrcnn_agent_swin_t")):
        assert head_layout(name) == {k: v for k, v in layout(case).items() if not k.startswith("backbone.")}


def mmdet_file(path, case: str):
    """A file structured like a released mmdet checkpoint (meta, state_dict, optimizer), every tensor a
    stride-0 view of one number (a few KB)."""
    state = {}
    for i, (k, shape) in enumerate(layout(case).items()):
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000, dtype=torch.int64)
        elif k.endswith("relative_position_index"):
            state[k] = torch.zeros((), dtype=torch.int64).expand(shape)
        else:
            state[k] = torch.full((), 0.01 * (i % 13)).expand(shape)
    meta = {"mmdet_version": "2.25.2", "config": "model = dict(type='RetinaNet')", "CLASSES": ("person", "bicycle"),
            "epoch": 12, "iter": 87960, "hook_msgs": {}}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture
def server(monkeypatch):
    with LoopbackServer() as s:
        monkeypatch.setenv("AGENT_ATTENTION_WEIGHTS_URL", s.url("/f/{id}/?dl=1"))
        yield s


def test_released_detector_downloads_once_and_loads(server, tmp_path, one_thread):
    name, case = "retinanet_agent_pvt_t_1x", "retinanet_agent_pvt_t"
    r = get_release(name)
    server.routes[f"/f/{r.file_id}/?dl=1"] = mmdet_file(tmp_path / "release.pth", case)
    model = pretrained_detector(name, cache=tmp_path / "cache", progress=False)
    assert not model.training and len(server.requests) == 1
    cached = release_cache_path(name, r.url, tmp_path / "cache")
    assert cached.is_file() and set(load_file(str(cached))) == set(layout(case))  # weights only, official keys
    key = "bbox_head.retina_cls.weight"
    assert torch.equal(model.state_dict()[model.official_to_ours(key)], load_file(str(cached))[key])
    neck = "neck.fpn_convs.4.conv.bias"
    assert torch.equal(model.state_dict()[model.official_to_ours(neck)], load_file(str(cached))[neck])
    pretrained_detector(name, cache=tmp_path / "cache", progress=False)
    assert len(server.requests) == 1  # second time from the cache
    local = pretrained_detector(name, checkpoint=tmp_path / "release.pth")
    for k, v in local.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_wrong_file_names_the_model(server, tmp_path):
    r = get_release("retinanet_agent_pvt_t_1x")
    server.routes[f"/f/{r.file_id}/?dl=1"] = mmdet_file(tmp_path / "mrcnn.pth", "mrcnn_agent_pvt_t")
    with pytest.raises(ValueError, match=r"does not hold the retinanet_agent_pvt_t_1x weights: .* keys differ"):
        pretrained_detector("retinanet_agent_pvt_t_1x", cache=tmp_path, progress=False)
    assert not list(tmp_path.glob("dense/*"))  # nothing cached
    with pytest.raises(ValueError, match="keys differ from the mask_rcnn_agent_pvt_t_1x layout"):
        pretrained_detector("mask_rcnn_agent_pvt_t_1x", checkpoint=mmdet_file(tmp_path / "r.pth", "retinanet_agent_pvt_t"))


def test_code_in_the_file_is_refused(server, tmp_path):
    r = get_release("mask_rcnn_agent_pvt_t_1x")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"hook": print}}, path)
    server.routes[f"/f/{r.file_id}/?dl=1"] = path
    with pytest.raises(ValueError, match="the file downloaded from"):
        fetch_release("mask_rcnn_agent_pvt_t_1x", cache=tmp_path, progress=False)


def test_init_from_a_released_detector_for_other_classes(tmp_path, one_thread):
    """Fine-tuning start: every entry of the official file is loaded, except the class layers when
    the data has another class count; a file of another detector is refused in one line."""
    from agent_attention.dense import build_detector
    from agent_attention.dense.detectors.pretrained import init_from_official
    from downstream_reference import filled_state

    path = tmp_path / "retinanet.pth"
    state = filled_state("retinanet_agent_pvt_t")
    torch.save({"meta": {}, "state_dict": state}, path)
    model = build_detector("retinanet", "agent_pvt_tiny", 3)
    report = init_from_official(model, str(path))
    assert report["fresh"] == ["bbox_head.retina_cls.weight", "bbox_head.retina_cls.bias"]
    assert report["loaded"] == len(state) - 2
    assert torch.equal(model.state_dict()["bbox_head.retina_reg.weight"], state["bbox_head.retina_reg.weight"])
    assert model.bbox_head.retina_cls.out_channels == 9 * 3
    other = build_detector("mask_rcnn", "agent_pvt_tiny", 80)
    with pytest.raises(ValueError, match="does not fit this mask_rcnn"):
        init_from_official(other, str(path))
    with pytest.raises(ValueError, match="neither a detection release name nor a file"):
        init_from_official(other, "mask_rcnn_agent_pvt_q_1x")
