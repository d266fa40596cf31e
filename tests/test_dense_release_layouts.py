"""Every official downstream configuration (the 20 released files and the 3 unreleased configs)
builds with the layout its official config implies.

Backbones: the official downstream backbone is the ImageNet classifier's layout without the
classifier ``head`` (Swin also without the final ``norm`` and the ``attn_mask`` buffers, which the
downstream block computes at run time, and with the output norms ``norm0..3``), independently read
from the classification manifests. Segmentation heads: the layouts of the two official references,
with the input widths the config implies for the other backbones."""
from __future__ import annotations

import pytest
import torch

from agent_attention.dense import AgentBackbone
from agent_attention.dense.pretrained import build_released_segmenter
from agent_attention.dense.releases import CONFIGS
from downstream_reference import layout
from reference_utils import manifest

DIMS = {"agent_swin_tiny": [96, 192, 384, 768], "agent_swin_small": [96, 192, 384, 768],
        "agent_swin_base": [128, 256, 512, 1024]}


def downstream_backbone_layout(backbone: str) -> dict:
    swin = backbone.startswith("agent_swin")
    out = {}
    for e in manifest(backbone)["state_dict"]:
        k = e["key"]
        if k.startswith("head.") or (swin and (k.startswith("norm.") or k.endswith("attn_mask"))):
            continue
        out[k] = tuple(e["shape"])
    if swin:
        for i, c in enumerate(DIMS[backbone]):
            out.update({f"norm{i}.weight": (c,), f"norm{i}.bias": (c,)})
    return out


def seg_head_layout(name: str) -> dict:
    r = CONFIGS[name]
    case = "upernet_agent_swin_t" if r.head == "upernet" else "fpn_agent_pvt_t"
    heads = {k: v for k, v in layout(case).items() if not k.startswith("backbone.")}
    if r.head == "upernet":  # input widths: the backbone's stage widths
        c = DIMS[r.backbone]
        for k, s in list(heads.items()):
            if k.startswith("decode_head.psp_modules.") and k.endswith("conv.weight"):
                heads[k] = (s[0], c[3]) + s[2:]
            elif k == "decode_head.bottleneck.conv.weight":
                heads[k] = (s[0], c[3] + 4 * 512) + s[2:]
            elif k.startswith("decode_head.lateral_convs.") and k.endswith("conv.weight"):
                heads[k] = (s[0], c[int(k.split(".")[2])]) + s[2:]
            elif k == "auxiliary_head.convs.0.conv.weight":
                heads[k] = (s[0], c[2]) + s[2:]
    return heads  # Semantic FPN: every Agent-PVT has the widths 64-128-320-512


@pytest.mark.parametrize("name", list(CONFIGS))
def test_release_backbone_layout(name):
    r = CONFIGS[name]
    with torch.device("meta"):
        bb = AgentBackbone(r.backbone, drop_path_rate=r.drop_path_rate)
    ours = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
    official = {bb.official_key(k): v for k, v in downstream_backbone_layout(r.backbone).items()}
    assert ours == official


@pytest.mark.parametrize("name", [n for n, r in CONFIGS.items() if r.task == "seg"])
def test_release_segmenter_layout(name):
    with torch.device("meta"):
        model = build_released_segmenter(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert ours == {model.official_key(k): v for k, v in seg_head_layout(name).items()}
    assert model.decode_head.conv_seg.out_channels == 150
    # the official README's parameter counts (millions; 60.56 is given as 61, 121.61 as 121)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(CONFIGS[name].params_m, abs=1.0)


def test_reference_layouts_match_the_rule():
    """The rule above is the official one where a full reference exists (T backbones)."""
    for case, bb in (("upernet_agent_swin_t", "agent_swin_tiny"), ("fpn_agent_pvt_t", "agent_pvt_tiny"),
                     ("mrcnn_agent_swin_t", "agent_swin_tiny"), ("retinanet_agent_pvt_t", "agent_pvt_tiny")):
        got = {k[len("backbone."):]: v for k, v in layout(case).items() if k.startswith("backbone.")}
        assert got == downstream_backbone_layout(bb)
    assert seg_head_layout("upernet_agent_swin_t_160k") == {k: v for k, v in layout("upernet_agent_swin_t").items()
                                                            if not k.startswith("backbone.")}
