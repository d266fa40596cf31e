"""The 20 released detection and segmentation checkpoints of Agent Attention.

One row per released file (official ``downstream/detection/README.md`` and
``downstream/segmentation/README.md``): our name, the task and head, the ImageNet backbone it
starts from, the official config, the official download URL and the paper's COCO box / mask mAP
or ADE20K mIoU / mAcc. The files are mmdetection 2.25 / mmsegmentation 0.28 training checkpoints
(``state_dict`` + ``meta``); their layout is the one the official config builds.

Names: ``<head>_<backbone>_<schedule>``, e.g. ``mask_rcnn_agent_swin_t_1x``,
``cascade_mask_rcnn_agent_swin_b_3x``, ``retinanet_agent_pvt_l_1x``, ``upernet_agent_swin_t_160k``,
``fpn_agent_pvt_s_40k``.

Three official configs have no released file (UperNet with Agent-Swin-S/B, Semantic FPN with
Agent-PVT-M): they are in :data:`UNRELEASED` (same fields, no URL) so that they can still be built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["DenseRelease", "RELEASES", "UNRELEASED", "CONFIGS", "URL_TEMPLATE", "get_release", "release_names",
           "official_url"]

#: same host and template as the classifiers (``models.pretrained.URL_TEMPLATE``)
URL_TEMPLATE = "https://cloud.tsinghua.edu.cn/f/{id}/?dl=1"
#: a mirror of the released files: a template with ``{id}`` and/or ``{name}`` (shared with the classifiers)
ENV_URL = "AGENT_ATTENTION_WEIGHTS_URL"

HEADS = ("mask_rcnn", "cascade_mask_rcnn", "retinanet", "upernet", "fpn")
_DET_DIR = "downstream/detection/configs"
_SEG_DIR = "downstream/segmentation/configs"


@dataclass(frozen=True)
class DenseRelease:
    """One released (or configured) dense model."""

    name: str
    head: str                      # one of HEADS
    backbone: str                  # official ImageNet name of the backbone (``agent_swin_tiny`` …)
    schedule: str                  # ``1x`` / ``3x`` (COCO epochs x12) or ``160k`` / ``40k`` (ADE20K iterations)
    config: str                    # official config file (path in the official repository)
    file_id: str = ""              # Tsinghua-cloud file id ('' = not released)
    box_map: Optional[float] = None    # COCO val2017 box mAP (paper / official README)
    mask_map: Optional[float] = None   # COCO val2017 mask mAP
    miou: Optional[float] = None       # ADE20K val mIoU (single scale)
    macc: Optional[float] = None       # ADE20K val mAcc
    params_m: int = 0              # parameters (millions, official README)
    drop_path_rate: float = 0.1    # the config's backbone stochastic depth (training only)
    backbone_kwargs: Dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "seg" if self.head in ("upernet", "fpn") else "det"

    @property
    def num_classes(self) -> int:
        return 150 if self.task == "seg" else 80

    @property
    def released(self) -> bool:
        return bool(self.file_id)

    @property
    def url(self) -> str:
        """The official download URL ('' if not released); ``$AGENT_ATTENTION_WEIGHTS_URL`` points at a mirror."""
        if not self.file_id:
            return ""
        return (os.environ.get(ENV_URL) or URL_TEMPLATE).format(id=self.file_id, name=self.name)

    @property
    def official_url(self) -> str:
        """The official URL, ignoring any mirror."""
        return URL_TEMPLATE.format(id=self.file_id, name=self.name) if self.file_id else ""

    def metrics(self) -> str:
        """The paper's numbers in one string (``box 44.6 / mask 40.7`` or ``mIoU 46.68``)."""
        if self.task == "seg":
            return f"mIoU {self.miou:.2f}"
        return f"box {self.box_map:.1f}" + (f" / mask {self.mask_map:.1f}" if self.mask_map is not None else "")


def _det(head, bb, sched, cfg, fid, box, mask, params, dpr):
    return DenseRelease(f"{head}_{bb}_{sched}", head, _BACKBONES[bb], sched, f"{_DET_DIR}/{cfg}", fid,
                        box_map=box, mask_map=mask, params_m=params, drop_path_rate=dpr)


def _seg(head, bb, sched, cfg, fid, miou, macc, params, dpr):
    return DenseRelease(f"{head}_{bb}_{sched}", head, _BACKBONES[bb], sched, f"{_SEG_DIR}/{cfg}", fid,
                        miou=miou, macc=macc, params_m=params, drop_path_rate=dpr)


_BACKBONES = {
    "agent_swin_t": "agent_swin_tiny", "agent_swin_s": "agent_swin_small", "agent_swin_b": "agent_swin_base",
    "agent_pvt_t": "agent_pvt_tiny", "agent_pvt_s": "agent_pvt_small", "agent_pvt_m": "agent_pvt_medium",
    "agent_pvt_l": "agent_pvt_large",
}

_SW, _PV = "agent_swin/agent_swin_", "agent_pvt/agent_pvt_"
_ROWS: Tuple[DenseRelease, ...] = (
    # Mask R-CNN (COCO)
    _det("mask_rcnn", "agent_swin_t", "1x", f"{_SW}t_mrcnn_1x_9-12-14-7.py", "258e208469084e6abf26", 44.6, 40.7, 48, 0.1),
    _det("mask_rcnn", "agent_swin_t", "3x", f"{_SW}t_mrcnn_3x_9-12-14-7.py", "e0ab821875704960a505", 47.3, 42.7, 48, 0.1),
    _det("mask_rcnn", "agent_swin_s", "1x", f"{_SW}s_mrcnn_1x_9-12-14-7.py", "52714305c21a4104bbc5", 47.2, 42.7, 69, 0.1),
    _det("mask_rcnn", "agent_swin_s", "3x", f"{_SW}s_mrcnn_3x_9-12-14-7.py", "b78f6ff837b84b61b122", 48.9, 43.8, 69, 0.1),
    _det("mask_rcnn", "agent_pvt_t", "1x", f"{_PV}t_mrcnn_1x_12-16-28-28.py", "79cbc3a7b7a24a0b92c1", 41.4, 38.7, 31, 0.1),
    _det("mask_rcnn", "agent_pvt_s", "1x", f"{_PV}s_mrcnn_1x_12-16-28-28.py", "8e333aa6b55e45d4b76c", 44.5, 41.2, 40, 0.2),
    _det("mask_rcnn", "agent_pvt_m", "1x", f"{_PV}m_mrcnn_1x_12-16-28-28.py", "6401bf2b227046a58fc3", 45.9, 42.0, 56, 0.1),
    _det("mask_rcnn", "agent_pvt_l", "1x", f"{_PV}l_mrcnn_1x_12-16-28-28.py", "8fa3d506f1e24099b99f", 46.9, 42.8, 68, 0.2),
    # Cascade Mask R-CNN (COCO); the official README's Swin-B row links a Mask R-CNN config name by
    # mistake: the file is the Cascade one (the only Swin-B detection config)
    _det("cascade_mask_rcnn", "agent_swin_t", "1x", f"{_SW}t_crcnn_1x_9-12-14-7.py", "39d78fddf90241e58db0", 49.2, 42.7, 86, 0.1),
    _det("cascade_mask_rcnn", "agent_swin_t", "3x", f"{_SW}t_crcnn_3x_9-12-14-7.py", "ed2af911d0e64d359aa3", 51.4, 44.5, 86, 0.1),
    _det("cascade_mask_rcnn", "agent_swin_s", "3x", f"{_SW}s_crcnn_3x_9-12-14-7.py", "3d092a23b935458b98ed", 52.6, 45.5, 107, 0.1),
    _det("cascade_mask_rcnn", "agent_swin_b", "3x", f"{_SW}b_crcnn_3x_9-12-14-7.py", "b3a628e668eb460ca532", 52.6, 45.3, 145, 0.4),
    # RetinaNet (COCO)
    _det("retinanet", "agent_pvt_t", "1x", f"{_PV}t_rtn_1x_12-16-28-28.py", "d3c1dbe0243d4775aafd", 40.3, None, 21, 0.1),
    _det("retinanet", "agent_pvt_s", "1x", f"{_PV}s_rtn_1x_12-16-28-28.py", "d427a52511f64ab5a928", 44.1, None, 30, 0.1),
    _det("retinanet", "agent_pvt_m", "1x", f"{_PV}m_rtn_1x_12-16-28-28.py", "81d6c824d9f244a192a3", 45.8, None, 46, 0.2),
    _det("retinanet", "agent_pvt_l", "1x", f"{_PV}l_rtn_1x_12-16-28-28.py", "2dc5b1f685fd4ecf8db5", 46.8, None, 58, 0.3),
    # UperNet (ADE20K, 512x512, 160k iterations)
    _seg("upernet", "agent_swin_t", "160k", "agent_swin/upernet_agent_swin_t_9-12-14-7.py", "280481ee38024bce8364",
         46.68, 58.53, 61, 0.3),
    # Semantic FPN (ADE20K, 512x512, 40k iterations)
    _seg("fpn", "agent_pvt_t", "40k", "agent_pvt/fpn_agent_pvt_t_12-16-28-28.py", "5e7bf988b4b74efe8654", 40.18, 51.76, 15, 0.1),
    _seg("fpn", "agent_pvt_s", "40k", "agent_pvt/fpn_agent_pvt_s_12-16-28-28.py", "11332fa565e443678e4c", 44.18, 56.17, 24, 0.1),
    _seg("fpn", "agent_pvt_l", "40k", "agent_pvt/fpn_agent_pvt_l_12-16-28-28.py", "0da8b58581214f85974f", 46.52, 58.50, 52, 0.1),
)

#: official configs with paper numbers but no released file
_UNRELEASED_ROWS: Tuple[DenseRelease, ...] = (
    _seg("upernet", "agent_swin_s", "160k", "agent_swin/upernet_agent_swin_s_9-12-14-7.py", "", 48.08, 59.78, 81, 0.3),
    _seg("upernet", "agent_swin_b", "160k", "agent_swin/upernet_agent_swin_b_9-12-14-7.py", "", 48.73, 60.01, 121, 0.5),
    _seg("fpn", "agent_pvt_m", "40k", "agent_pvt/fpn_agent_pvt_m_12-16-28-28.py", "", 44.30, 56.42, 40, 0.2),
)

#: the 20 released checkpoints, by name
RELEASES: Dict[str, DenseRelease] = {r.name: r for r in _ROWS}
#: the 3 configured but unreleased models, by name
UNRELEASED: Dict[str, DenseRelease] = {r.name: r for r in _UNRELEASED_ROWS}
#: every official downstream configuration (released or not)
CONFIGS: Dict[str, DenseRelease] = {**RELEASES, **UNRELEASED}


def release_names(task: Optional[str] = None, released: bool = True) -> List[str]:
    """Names of the released models (``released=False``: every configuration), optionally of one task."""
    table = RELEASES if released else CONFIGS
    return [n for n, r in table.items() if task is None or r.task == task]


def get_release(name: str, task: Optional[str] = None) -> DenseRelease:
    """The row of ``name``; a one-line error listing the names otherwise."""
    r = CONFIGS.get(name)
    if r is None or (task is not None and r.task != task):
        names = ", ".join(release_names(task, released=False))
        raise ValueError(f"unknown {'' if task is None else task + ' '}release {name!r}; choose one of {names}")
    return r


def official_url(name: str) -> str:
    """The download URL of a released dense model ('' if it has none)."""
    return get_release(name).url


def format_releases(fmt: str = "table", task: Optional[str] = None, released_only: bool = False) -> str:
    """The dense models as an aligned text ``table``, GitHub ``markdown`` or ``csv``: name, head,
    backbone, schedule, parameters and the paper's COCO box / mask mAP or ADE20K mIoU / mAcc."""
    import csv
    import io

    head = ["model", "task", "backbone", "schedule", "params (M)", "box mAP", "mask mAP", "mIoU", "mAcc", "weights"]
    body = []
    for r in (RELEASES if released_only else CONFIGS).values():
        if task is not None and r.task != task:
            continue
        num = [(f"{v:.1f}" if k in ("box", "mask") else f"{v:.2f}") if v is not None else ""
               for k, v in (("box", r.box_map), ("mask", r.mask_map), ("miou", r.miou), ("macc", r.macc))]
        body.append([r.name, r.task, r.backbone, r.schedule, str(r.params_m)] + num +
                    ["released" if r.released else "no link"])
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([head] + body)
        return buf.getvalue().rstrip("\n")
    numeric = [h in ("params (M)", "box mAP", "mask mAP", "mIoU", "mAcc") for h in head]
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    if fmt == "table":
        widths = [max(len(x) for x in col) for col in zip(head, *body)]

        def line(cells) -> str:
            return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in body])
    raise ValueError(f"format must be 'table', 'markdown' or 'csv', got {fmt!r}")
