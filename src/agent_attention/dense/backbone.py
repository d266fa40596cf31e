"""Hierarchical agent backbones for dense prediction.

:class:`AgentBackbone` wraps a hierarchical timm model (any model of the zoo, or any timm model
with ``forward_intermediates``) as a feature extractor with the official downstream settings
which each model declares itself:

* **agent shapes per stage** for dense inputs: every :class:`~agent_attention.layers.AgentAttention`
  of stage ``i`` (the module ``feature_info[i]["stage"]``) pools its agents to ``agent_shapes[i]``
  (``"official"``: the model's ``downstream_agent_shapes``); the agent biases keep their
  classification shapes and are resized at run time, so ImageNet checkpoints load unchanged;
* **the model's downstream window rule** (``set_downstream_windows()``; Swin: every window block
  computes as the official mmdet / mmseg block — full 7×7 windows at any map size, odd blocks
  shifted, the normalised map zero-padded to a multiple of the window with the padded tokens taking
  part in attention, the shift mask of the padded map) and **output norms** ``norm0..norm3``
  (LayerNorm of each stage output, fresh init; by default for models with a downstream window rule,
  as the official Swin);
* **any input size**: the image is padded right/bottom to a multiple of ``size_divisor`` (32 = the
  coarsest stride, as the official detection pipeline pads), so every stage map is exactly
  ``ceil(H / stride)``; ``size_divisor=1`` leaves the size alone (official segmentation: the patch
  embedding pads to 4, patch merging pads odd maps);
* **official downstream checkpoints**: :meth:`load_official_state_dict` loads the ``backbone.``
  entries of a released mmdet / mmseg file (same layout, ``norm{i}`` output norms);
* **classification weights**: a checkpoint of the classifier (official ``.pth``, ours, safetensors)
  is read with the project's safe loader, checked against the classifier (``strict``), loaded, and
  the classification-only parts (head, final norm) are then dropped. :attr:`load_report` says
  what was loaded, dropped and freshly initialised.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from .._grids import HW, round_up
from ..layers import AgentAttentionCore
from ..models.registry import FAMILIES, check_model_name, family_of

#: official downstream agent grids per family (each model class's ``downstream_agent_shapes``)
OFFICIAL_AGENT_SHAPES: Dict[str, Tuple[HW, ...]] = {
    fam[len("agent_"):]: tuple(cls.downstream_agent_shapes) for fam, cls in FAMILIES.items()
    if getattr(cls, "downstream_agent_shapes", None)
}

AgentShapesSpec = Union[None, str, Sequence[Union[int, Sequence[int]]]]


def parse_agent_shapes(spec: AgentShapesSpec, official=None, num_stages: int = 4) -> Optional[List[HW]]:
    """Per-stage agent grids from a user spec; ``None`` means "keep the classification grids".

    Accepted: ``None`` / ``"native"`` (keep), ``"official"`` (``official``: the model's downstream
    table, or a family name such as ``"swin"``; native when there is none), ``"12-16-28-28"``
    (square grids), ``"9x9,12x12,14x14,7x7"``, or a sequence of ints / ``(h, w)`` pairs.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() in ("native", "none", "")):
        return None
    if isinstance(spec, str) and spec.lower() == "official":
        table = OFFICIAL_AGENT_SHAPES.get(official) if isinstance(official, str) or official is None else official
        return [tuple(s) for s in table[:num_stages]] if table else None
    items: List = []
    if isinstance(spec, str):
        parts = re.split(r"[,\-\s]+", spec.strip())
        for p in parts:
            if not re.fullmatch(r"\d+(x\d+)?", p):
                raise ValueError(f"agent_shapes: cannot parse {p!r} in {spec!r} (use e.g. '12-16-28-28' or '9x9,12x12,14x14,7x7')")
            items.append(tuple(int(v) for v in p.split("x")) if "x" in p else int(p))
    else:
        items = list(spec)
    out: List[HW] = []
    for it in items:
        hw = (int(it), int(it)) if isinstance(it, int) else tuple(int(v) for v in it)
        if len(hw) != 2 or min(hw) <= 0:
            raise ValueError(f"agent_shapes: each entry must be a positive int or (h, w), got {it!r}")
        out.append(hw)
    if len(out) != num_stages:
        raise ValueError(f"agent_shapes: need one entry per stage ({num_stages}), got {len(out)}: {spec!r}")
    return out


def agent_modules_by_stage(model: nn.Module) -> List[Tuple[int, str, AgentAttentionCore]]:
    """``(stage, name, module)`` of every 2-D agent-attention module, the stage ``i`` being the module
    ``feature_info[i]["stage"]`` (else ``["module"]``) that holds it (stages pruned away are skipped)."""
    out, seen = [], set()
    for i, info in enumerate(getattr(model, "feature_info", None) or []):
        name = info.get("stage", info["module"])
        try:
            stage = model.get_submodule(name)
        except AttributeError:
            continue  # pruned (features_only / FeatureGetterNet)
        for n, m in stage.named_modules(prefix=name):
            if isinstance(m, AgentAttentionCore) and m.ndim == 2 and id(m) not in seen:
                seen.add(id(m))
                out.append((i, n, m))
    for n, m in model.named_modules():
        if isinstance(m, AgentAttentionCore) and m.ndim == 2 and id(m) not in seen:
            raise ValueError(f"cannot tell the stage of agent module {n!r} (in no feature_info module); set its agent_shape by hand")
    return out


def set_agent_shapes(model: nn.Module, shapes: Optional[Sequence[HW]]) -> Dict[int, int]:
    """Set ``agent_shape`` of every agent-attention module by stage; returns ``{stage: modules set}``.

    ``shapes=None`` resets each module to its classification grid ``(p, p)``.
    """
    counts: Dict[int, int] = {}
    for stage, name, mod in agent_modules_by_stage(model):
        if shapes is None:
            p = math.isqrt(mod.agent_num)
            mod.agent_shape = (p, p)
        else:
            if stage >= len(shapes):
                raise ValueError(f"agent module {name!r} is in stage {stage} but only {len(shapes)} agent shapes were given")
            mod.agent_shape = tuple(shapes[stage])
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def flat_backbone_error(name: str, strides: Sequence[int] = (16, 16, 16, 16)) -> str:
    """The message refusing a flat backbone (every stage at one stride: no feature pyramid)."""
    return (f"backbone {name!r} is flat (strides {'-'.join(map(str, strides))}): detection and segmentation need a "
            "hierarchical backbone (agent_pvt_*, agent_swin_*, agent_cswin_*)")


class AgentBackbone(nn.Module):
    """Feature extractor: NCHW maps at strides 4/8/16/32 (``out_indices``) for any input size.

    Args:
        name: timm model name (``agent_pvt_small``, ``agent_swin_t`` …).
        out_indices: stages to return.
        agent_shapes: per-stage agent grids (see :func:`parse_agent_shapes`); ``"official"`` uses the
            model's ``downstream_agent_shapes`` (PVT ``12-16-28-28``, Swin ``9-12-14-7``).
        checkpoint: classification checkpoint to start from (path or state dict).
        strict: the checkpoint must fit the classifier exactly (else a clear error); ``False`` loads
            the matching entries and warns.
        output_norms: add ``norm{i}`` LayerNorms on the outputs (default: the model's
            ``downstream_output_norms``, True for Swin as official).
        size_divisor: pad inputs right/bottom to a multiple of this.
        downstream_windows: apply the model's downstream window rule (``set_downstream_windows``;
            the official downstream Swin window blocks); ``False`` keeps the classifier's blocks.
        **model_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``, tiny dims …).
    """

    def __init__(self, name: str, *, out_indices: Sequence[int] = (0, 1, 2, 3), agent_shapes: AgentShapesSpec = "official",
                 checkpoint=None, strict: bool = True, output_norms: Optional[bool] = None, size_divisor: int = 32,
                 downstream_windows: bool = True, **model_kwargs):
        super().__init__()
        check_model_name(name, kind="backbone", see="")
        self.name, self.family = name, family_of(name)
        model_kwargs.setdefault("num_classes", 0)  # no classifier: a checkpoint's head is dropped below
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"backbone {name!r} has no forward_intermediates (not a hierarchical timm model)")
        self.load_report: Dict[str, object] = {"checkpoint": None}
        full_keys = set(model.state_dict())
        head_keys: List[str] = []
        if checkpoint is not None:
            from ..weights import load_checkpoint_state, prepare_state_dict, select_state_dict

            state = select_state_dict(checkpoint)[0] if isinstance(checkpoint, dict) else load_checkpoint_state(checkpoint)
            cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
            head_keys = sorted(k for k in state if k == cls or k.startswith(cls + "."))
            state = prepare_state_dict(model, {k: v for k, v in state.items() if k not in head_keys}, strict=strict)
            model.load_state_dict(state, strict=False)
            self.load_report.update(checkpoint=str(checkpoint) if not isinstance(checkpoint, dict) else "<state dict>",
                                    loaded=len(state))
        out_indices = tuple(int(i) for i in out_indices)
        self.body = FeatureGetterNet(model, out_indices=out_indices, norm=False, prune=True)
        kept = set(self.body.model.state_dict())
        # classification-only parts: the checkpoint's head, and what pruning removed (Swin/CSWin final norm)
        self.load_report["dropped"] = head_keys + sorted(full_keys - kept)
        self.out_indices = out_indices
        self.out_channels: List[int] = list(self.body.feature_info.channels())
        self.strides: List[int] = list(self.body.feature_info.reduction())
        if len(set(self.strides)) < len(self.strides):  # a flat model (DeiT: 16-16-16-16) gives no pyramid
            raise ValueError(flat_backbone_error(name, self.strides))
        self.size_divisor = int(size_divisor)
        num_stages = len(getattr(model, "feature_info", [])) or (max(out_indices) + 1)
        self.agent_shapes = parse_agent_shapes(agent_shapes, getattr(model, "downstream_agent_shapes", None), num_stages)
        self.agent_modules = set_agent_shapes(self.body.model, self.agent_shapes)
        window_rule = getattr(self.body.model, "set_downstream_windows", None)
        self.shifted_blocks = window_rule() if (window_rule is not None and downstream_windows) else 0
        if output_norms is None:
            output_norms = bool(getattr(model, "downstream_output_norms", False))
        self.output_norms = bool(output_norms)
        fresh = []
        if self.output_norms:
            for i, c in zip(out_indices, self.out_channels):
                self.add_module(f"norm{i}", LayerNorm2d(c, eps=1e-5))
                fresh += [f"norm{i}.weight", f"norm{i}.bias"]
        self.load_report["fresh"] = fresh

    @staticmethod
    def official_key(key: str) -> str:
        """Our key of an official downstream backbone entry (mmdet / mmseg ``backbone.`` prefix
        removed): the output norms ``norm{i}`` keep their names, the rest lives in the timm model."""
        return key if re.match(r"norm\d+\.", key) else "body.model." + key

    def load_official_state_dict(self, state: Mapping[str, Tensor], strict: bool = True):
        """Load an official downstream backbone state dict (keys without the ``backbone.`` prefix);
        ``strict``: the keys must be exactly ours (one-line error naming the first few otherwise)."""
        mapped = {self.official_key(k): v for k, v in state.items()}
        if strict:
            own = self.state_dict()
            missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
            bad = [k for k in set(own) & set(mapped) if tuple(own[k].shape) != tuple(mapped[k].shape)]
            if missing or unexpected or bad:
                raise ValueError(f"backbone {self.name}: the state dict does not fit (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}, other shapes {sorted(bad)[:3]})")
        return self.load_state_dict(mapped, strict=strict)

    def pad(self, x: Tensor) -> Tensor:
        """Zero-pad right/bottom to a multiple of :attr:`size_divisor`."""
        d = self.size_divisor
        ph, pw = round_up(x.shape[-2], d) - x.shape[-2], round_up(x.shape[-1], d) - x.shape[-1]
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    def forward(self, x: Tensor) -> List[Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"AgentBackbone expects images (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        feats = self.body(self.pad(x))
        if self.output_norms:
            feats = [getattr(self, f"norm{i}")(f) for i, f in zip(self.out_indices, feats)]
        return list(feats)

    def describe(self) -> str:
        """One paragraph on the settings and the weight loading (for logs)."""
        r = self.load_report
        shapes = "classification" if self.agent_shapes is None else "-".join(f"{h}x{w}" for h, w in self.agent_shapes)
        s = (f"backbone {self.name}: channels {self.out_channels}, strides {self.strides}, agent shapes {shapes} "
             f"({sum(self.agent_modules.values())} agent modules)")
        if self.shifted_blocks:
            s += f", downstream window blocks ({self.shifted_blocks} newly shifted)"
        if r.get("checkpoint"):
            s += f"; loaded {r['loaded']} tensors from {r['checkpoint']}, dropped {len(r['dropped'])} classification-only"
        else:
            s += "; random init"
        if r.get("fresh"):
            s += f", fresh: {', '.join(r['fresh'])}"
        return s

