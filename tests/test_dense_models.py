"""Agent backbones in dense models: every head with every hierarchical family at non-square sizes,
downstream agent shapes, Swin output norms, padding, classification-checkpoint loading."""
from __future__ import annotations

import pytest
import timm
import torch

from agent_attention.dense import (OFFICIAL_AGENT_SHAPES, AgentBackbone, build_detector, build_segmenter,
                                   parse_agent_shapes)
from agent_attention.dense.backbone import agent_modules_by_stage
from agent_attention.layers import AgentAttention


pytestmark = pytest.mark.usefixtures("one_thread")

# tiny backbones (a few 10k parameters) of each family; Swin has a shifted window block in stage 4
TINY = {
    "agent_pvt_tiny": dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
                           mlp_ratios=[2, 2, 2, 2], agent_num=[4, 9, 4, 4]),
    "agent_swin_tiny": dict(img_size=64, embed_dim=16, depths=[1, 1, 1, 2], num_heads=[1, 2, 2, 4], agent_num=[4, 9, 4, 4],
                            mlp_ratio=2.0, attn_type="AAAB", drop_path_rate=0.0),
    "agent_cswin_tiny": dict(img_size=64, embed_dim=16, depth=[1, 1, 1, 1], num_heads=[2, 2, 4, 4], agent_num=[4, 9, 4, 4],
                             mlp_ratio=2.0, drop_path_rate=0.0),
}
FAMILIES = list(TINY)
H, W = 56, 88  # non-square, not a multiple of 32


def _targets(sizes):
    g = torch.Generator().manual_seed(0)
    out = []
    for k, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[8.0, 6.0, 40.0, 30.0], [30.0, 20.0, 70.0, 60.0]])[: k + 1]
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for i, b in enumerate(boxes.long()):
            masks[i, b[1]:b[3], b[0]:b[2]] = 1
        out.append({"boxes": boxes, "labels": torch.randint(1, 3, (len(boxes),), generator=g), "masks": masks})
    return out


SMALL_DET = dict(train_cfg={"rpn": {"num": 32, "nms_pre": 200, "max_per_img": 50}, "rcnn": {"num": 32}},
                 test_cfg={"rpn": {"nms_pre": 100, "max_per_img": 30}, "rcnn": {"max_per_img": 10}, "head": {"max_per_img": 10}})


@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn", "retinanet"])
def test_detector_forward_backward(kind, backbone):
    torch.manual_seed(0)
    # small custom agent grids (the official ones are exercised in test_official_agent_shapes_set_per_stage)
    model = build_detector(kind, backbone, num_classes=2, fpn_channels=32, fc_channels=32, min_size=H, max_size=W + 8,
                           anchor_scale=2, agent_shapes="4-4-3-2", backbone_kwargs=TINY[backbone], **SMALL_DET)
    sizes = [(H, W), (H - 8, W - 20)]
    images = [torch.rand(3, *s) for s in sizes]
    model.train()
    losses = model(images, _targets(sizes))
    stage = ["loss_cls", "loss_bbox", "loss_mask"]
    expected = {"mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox", *stage},
                "cascade_mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox", *(f"{k}_s{i}" for k in stage for i in range(3))},
                "retinanet": {"loss_cls", "loss_bbox"}}[kind]
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.backbone.named_parameters() if "an_bias" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[1]["boxes"].shape[1] == 4 and len(out[1]["boxes"]) <= 10
    assert ((out[1]["labels"] >= 1) & (out[1]["labels"] <= 2)).all()  # data-set labels: from 1
    if kind != "retinanet":
        assert out[1]["masks"].shape[-2:] == sizes[1] and out[1]["masks"].dtype == torch.bool


@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("kind", ["fpn", "upernet"])
def test_segmenter_forward_backward(kind, backbone):
    torch.manual_seed(0)
    model = build_segmenter(kind, backbone, num_classes=5, decoder_channels=32, segmentation_channels=16,
                            aux_channels=16, backbone_kwargs=TINY[backbone]).train()
    x = torch.rand(2, 3, H, W)
    logits, aux = model(x, with_aux=True)
    assert logits.shape == aux.shape == (2, 5, H, W)
    (logits.logsumexp(1).mean() + aux.mean()).backward()
    assert all(p.grad is not None for n, p in model.backbone.named_parameters() if n.endswith("ha_bias"))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 33, 47)).shape == (1, 5, 33, 47)  # any size: padded and cropped back


def test_official_agent_shapes_set_per_stage():
    for name, fam in (("agent_pvt_tiny", "pvt"), ("agent_swin_tiny", "swin")):
        bb = AgentBackbone(name, agent_shapes="official", **TINY[name])
        mods = [m for m in bb.modules() if isinstance(m, AgentAttention)]
        by_stage = agent_modules_by_stage(bb.body.model)
        assert mods and len(by_stage) == len(mods)
        stage_modules = [info["stage"] for info in bb.body.model.feature_info]
        for stage, n, m in by_stage:
            assert n.startswith(stage_modules[stage] + ".")  # found inside its feature_info stage
            assert m.agent_shape == OFFICIAL_AGENT_SHAPES[fam][stage]
        feats = bb(torch.rand(1, 3, H, W))
        assert [tuple(f.shape[-2:]) for f in feats] == [(-(-H // 32) * 32 // s, -(-W // 32) * 32 // s) for s in (4, 8, 16, 32)]
        assert bb.out_channels == [f.shape[1] for f in feats]
    # CSWin has no official downstream setting: classification grids are kept
    bb = AgentBackbone("agent_cswin_tiny", agent_shapes="official", **TINY["agent_cswin_tiny"])
    assert {m.agent_shape for m in bb.modules() if isinstance(m, AgentAttention)} <= {(2, 2), (3, 3)}


def test_parse_agent_shapes():
    assert parse_agent_shapes("12-16-28-28", "pvt") == [(12, 12), (16, 16), (28, 28), (28, 28)]
    assert parse_agent_shapes("9x9,12x12,14x7,7x7", None) == [(9, 9), (12, 12), (14, 7), (7, 7)]
    assert parse_agent_shapes("official", "swin") == list(OFFICIAL_AGENT_SHAPES["swin"])
    assert parse_agent_shapes("native", "pvt") is None and parse_agent_shapes("official", "cswin") is None
    for bad in ("1-2-3", "a-b-c-d", [(1, 0)] * 4):
        with pytest.raises(ValueError, match="agent_shapes"):
            parse_agent_shapes(bad, "pvt")


def _classifier(name):
    import agent_attention.models  # noqa: F401

    return timm.create_model(name, **TINY[name]).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_native_backbone_reproduces_classifier_features(name, tmp_path):
    """Classification weights + native agent shapes at the construction size = the classifier's stages."""
    torch.manual_seed(1)
    clf = _classifier(name)
    with torch.no_grad():
        for n, p in clf.named_parameters():
            if n.endswith("_bias") and p.dim() >= 3:
                p.normal_(0, 0.5)  # make the agent biases matter
    path = tmp_path / "clf.pth"
    torch.save({"model": clf.state_dict()}, path)
    bb = AgentBackbone(name, agent_shapes="native", checkpoint=str(path), output_norms=False,
                       downstream_windows=False, **TINY[name]).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = clf.forward_intermediates(x, indices=(0, 1, 2, 3), intermediates_only=True)
        got = bb(x)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
    assert any(k.startswith("head.") for k in bb.load_report["dropped"])
    # official settings change the result (agents pooled to other grids)
    bb_off = AgentBackbone(name, agent_shapes="12-16-28-28", checkpoint=str(path), output_norms=False,
                           downstream_windows=False, **TINY[name]).eval()
    with torch.no_grad():
        assert not torch.allclose(bb_off(x)[0], got[0])


def test_swin_output_norms_and_checkpoint_report(tmp_path):
    name = "agent_swin_tiny"
    path = tmp_path / "swin.pth"
    torch.save(_classifier(name).state_dict(), path)
    bb = AgentBackbone(name, checkpoint=str(path), **TINY[name])
    assert bb.load_report["fresh"] == [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(bb.load_report["dropped"])
    assert bb.shifted_blocks == 1  # the odd window block of stage 4 (downstream Swin shifts it)
    feats = bb(torch.rand(1, 3, H, W))
    for f in feats:  # LayerNorm over channels with fresh (1, 0) affine: zero mean per position
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-5, rtol=0)
    assert "fresh: norm0.weight" in bb.describe()


def test_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        AgentBackbone("agent_pvt_tinyy")
    bad = dict(TINY["agent_pvt_tiny"], depths=[1, 1, 2, 1])  # an extra block: missing keys
    path = tmp_path / "other.pth"
    torch.save(_classifier("agent_pvt_tiny").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        AgentBackbone("agent_pvt_tiny", checkpoint=str(path), **{k: v for k, v in bad.items()})
    with pytest.warns(UserWarning, match="matching entries"):
        AgentBackbone("agent_pvt_tiny", checkpoint=str(path), strict=False, **bad)
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo", "agent_pvt_tiny", backbone_kwargs=TINY["agent_pvt_tiny"])
    with pytest.raises(ValueError, match="unknown segmentation head"):
        build_segmenter("deeplab", "agent_pvt_tiny", backbone_kwargs=TINY["agent_pvt_tiny"])
    bb = AgentBackbone("agent_pvt_tiny", **TINY["agent_pvt_tiny"])
    with pytest.raises(ValueError, match="images"):
        bb(torch.rand(3, 64, 64))


@pytest.mark.parametrize("builder,kind,backbone,paper_m", [
    ("det", "mask_rcnn", "agent_pvt_t", 31), ("det", "mask_rcnn", "agent_pvt_s", 40), ("det", "retinanet", "agent_pvt_t", 21),
    ("det", "mask_rcnn", "agent_swin_t", 48), ("det", "cascade_mask_rcnn", "agent_swin_t", 86), ("seg", "fpn", "agent_pvt_t", 15), ("seg", "fpn", "agent_pvt_l", 52),
    ("seg", "upernet", "agent_swin_t", 61),
])
def test_official_structures_match_paper_sizes(builder, kind, backbone, paper_m):
    """Full-size models (built on the meta device) have the parameter counts of the paper's tables
    (spec §6.2/6.3: COCO 80 classes, ADE20K 150)."""
    with torch.device("meta"):
        model = build_detector(kind, backbone, 80) if builder == "det" else build_segmenter(kind, backbone, 150)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(paper_m, abs=0.6)


def test_checkpoint_head_of_another_task_is_dropped(tmp_path):
    """A classifier fine-tuned with another number of classes still loads strictly (its head is dropped)."""
    import agent_attention.models  # noqa: F401

    name = "agent_pvt_tiny"
    clf = timm.create_model(name, **dict(TINY[name], num_classes=10))
    state = {"model": clf.state_dict()}
    bb = AgentBackbone(name, checkpoint=state, **TINY[name])
    assert bb.load_report["dropped"][:2] == ["head.bias", "head.weight"]
    torch.testing.assert_close(bb.body.model.patch_embed1.proj.weight, clf.patch_embed1.proj.weight)
