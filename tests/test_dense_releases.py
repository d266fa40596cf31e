"""The table of the 20 released detection / segmentation checkpoints."""
from __future__ import annotations

import re

import pytest

from agent_attention.dense.releases import CONFIGS, RELEASES, UNRELEASED, get_release, release_names


def test_twenty_released_files_with_official_urls():
    assert len(RELEASES) == 20 and len(UNRELEASED) == 3
    heads = [r.head for r in RELEASES.values()]
    assert {h: heads.count(h) for h in set(heads)} == {"mask_rcnn": 8, "cascade_mask_rcnn": 4, "retinanet": 4,
                                                      "upernet": 1, "fpn": 3}
    urls = [r.official_url for r in RELEASES.values()]
    assert len(set(urls)) == 20
    assert all(re.fullmatch(r"https://cloud\.tsinghua\.edu\.cn/f/[0-9a-f]{20}/\?dl=1", u) for u in urls)
    assert not any(r.url for r in UNRELEASED.values())


def test_paper_numbers_and_names():
    r = get_release("mask_rcnn_agent_swin_t_1x")
    assert (r.box_map, r.mask_map, r.backbone, r.task) == (44.6, 40.7, "agent_swin_tiny", "det")
    assert get_release("cascade_mask_rcnn_agent_swin_b_3x").config.endswith("agent_swin_b_crcnn_3x_9-12-14-7.py")
    assert get_release("upernet_agent_swin_t_160k").miou == 46.68
    assert get_release("fpn_agent_pvt_l_40k").metrics() == "mIoU 46.52"
    assert get_release("retinanet_agent_pvt_m_1x").metrics() == "box 45.8"
    for r in CONFIGS.values():
        assert (r.task == "seg") == (r.miou is not None) and (r.task == "det") == (r.box_map is not None)
        assert r.name.startswith(r.head + "_agent_")
    assert release_names("seg") == ["upernet_agent_swin_t_160k", "fpn_agent_pvt_t_40k", "fpn_agent_pvt_s_40k",
                                    "fpn_agent_pvt_l_40k"]


def test_unknown_name_is_one_line():
    with pytest.raises(ValueError, match="unknown seg release 'mask_rcnn_agent_swin_t_1x'"):
        get_release("mask_rcnn_agent_swin_t_1x", task="seg")


def test_models_command_lists_dense_releases(monkeypatch, capsys):
    from agent_attention.commands.models import main
    from agent_attention.models import report

    monkeypatch.setattr(report, "collect_with_progress", lambda names, flops=False, stream=None: [])
    assert main(["--task", "dense", "--format", "csv"]) == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 20 and all(r["weights"] == "released" for r in rows)
    swin = next(r for r in rows if r["model"] == "cascade_mask_rcnn_agent_swin_t_3x")
    assert (swin["box mAP"], swin["mask mAP"], swin["mIoU"]) == ("51.4", "44.5", "")
    assert next(r for r in rows if r["model"] == "fpn_agent_pvt_s_40k")["mIoU"] == "44.18"
    assert main(["--no-flops"]) == 0  # both tables
    out = capsys.readouterr().out
    assert "Detection (COCO val2017) and segmentation" in out and "upernet_agent_swin_t_160k" in out
    assert main(["--task", "seg", "--names", "all", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| upernet_agent_swin_b_160k | seg |" in out and "mask_rcnn" not in out
    assert main(["--format", "csv"]) == 2  # two tables do not fit one csv
