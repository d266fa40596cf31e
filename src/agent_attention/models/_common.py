"""Helpers shared by the four model families (Agent-DeiT, -PVT, -Swin, -CSWin).

Config parsing (``agent_num``, ``attn_type``, norm layer), position-embedding and
agent-bias resizing for run time and for ``checkpoint_filter_fn``, the timm classifier / feature
plumbing (:class:`ClassifierMixin`, :class:`HierarchicalMixin`, block runner with activation
checkpointing) and model registration (cfgs, ``build_model_with_cfg``).
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import resize_1d

HW = Tuple[int, int]
AgentNum = Union[int, str, Sequence[Union[int, str]]]

#: agent-bias parameters whose spatial axis follows the construction grid: name -> resized dim
AGENT_BIAS_AXES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


# ---------------------------------------------------------------- config parsing
def resolve_norm_layer(norm_layer) -> Callable[..., nn.Module]:
    """``None`` / ``"LayerNorm"`` (as the manifests spell it) -> ``nn.LayerNorm`` with eps 1e-5."""
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() in ("layernorm", "ln")):
        return partial(nn.LayerNorm, eps=1e-5)
    if isinstance(norm_layer, str):
        raise ValueError(f"unknown norm_layer {norm_layer!r}; pass 'LayerNorm' or a callable")
    return norm_layer


def parse_int_list(value, num: int, what: str) -> List[int]:
    """An int, a ``'a-b-c-d'`` string or a sequence of ints/strings -> ``num`` positive ints."""
    if isinstance(value, str):
        value = value.split("-")
    elif isinstance(value, int):
        value = [value] * num
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or {num} ints, got {value!r}") from None
    if len(out) != num or any(v <= 0 for v in out):
        raise ValueError(f"{what} must have {num} positive entries (one per stage), got {value!r}")
    return out


def parse_agent_num(agent_num: AgentNum) -> List[int]:
    """Agent counts as a list of ints from an int, ``"9-16-49-49"``, or a list of ints/strings."""
    if isinstance(agent_num, str):
        items: Sequence = agent_num.split("-")
    elif isinstance(agent_num, int):
        items = [agent_num]
    else:
        items = list(agent_num)
    try:
        out = [int(a) for a in items]
    except (TypeError, ValueError):
        raise ValueError(f"agent_num must be an int or a list of ints, got {agent_num!r}") from None
    if not out or any(a <= 0 for a in out):
        raise ValueError(f"agent_num must be positive, got {agent_num!r}")
    return out


def parse_attn_type(attn_type: str, depths: Sequence[int]) -> List[List[bool]]:
    """Per stage, per block: ``True`` for agent attention.

    One letter per stage: ``'A'`` agent, ``'B'`` the family's own attention, ``'M'`` mixed, where the
    integer after the letters (``'AAMB2'``) is how many leading blocks of an ``'M'`` stage are agent
    blocks.
    """
    n = len(depths)
    if not isinstance(attn_type, str) or len(attn_type) < n:
        raise ValueError(f"attn_type must be a string with one letter per stage ({n}), got {attn_type!r}")
    letters, rest = attn_type[:n].upper(), attn_type[n:]
    if any(c not in "ABM" for c in letters):
        raise ValueError(f"attn_type letters must be A (agent), B (original) or M (mixed), got {attn_type!r}")
    mixed = 0
    if "M" in letters or rest:
        if not re.fullmatch(r"\d+", rest):
            raise ValueError(f"attn_type {attn_type!r}: an 'M' stage needs the agent block count after the letters, e.g. 'AAMB2'")
        mixed = int(rest)
    plan = []
    for c, d in zip(letters, depths):
        if c == "M" and mixed > d:
            raise ValueError(f"attn_type {attn_type!r}: {mixed} agent blocks requested in a stage of depth {d}")
        plan.append([c == "A" or (c == "M" and j < mixed) for j in range(d)])
    return plan


# ---------------------------------------------------------------- resizing (run time and checkpoints)
def resize_pos_embed(pos: Tensor, old_hw: HW, new_hw: HW, num_prefix: int = 0, mode: str = "bicubic") -> Tensor:
    """Resize a ``(1, P + H·W, C)`` position embedding from grid ``old_hw`` to ``new_hw``.

    Prefix tokens are kept. Identity (the same tensor) when the grids are equal. The dtype is kept
    (float64 models stay float64). ``mode``: ``"bicubic"`` (timm / official fine-tuning) or
    ``"bilinear"`` (the official PVT run-time resize).
    """
    old_hw, new_hw = tuple(old_hw), tuple(new_hw)
    if old_hw == new_hw:
        return pos
    if pos.shape[1] != num_prefix + old_hw[0] * old_hw[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, expected {num_prefix} + {old_hw[0]}x{old_hw[1]}")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    C = grid.shape[-1]
    grid = grid.reshape(1, *old_hw, C).permute(0, 3, 1, 2)
    extra = dict(antialias=True) if mode == "bicubic" else {}
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=False, **extra)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], C)
    return torch.cat([prefix, grid], dim=1) if num_prefix else grid


def infer_square_grid(n: int, what: str) -> HW:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"cannot infer the grid of {what}: {n} tokens is not a square; resize it yourself")
    return s, s


def resize_agent_bias(key: str, value: Tensor, target: Tensor, *, strict: bool = False) -> Tensor:
    """Resize a checkpoint's row/column agent bias (``ah/aw/ha/wa_bias``) to the model's grid.

    Linear interpolation along the spatial axis (as the official fine-tuning loader), computed in
    at least float32 and returned in ``value``'s dtype. Other entries are returned unchanged, and
    so are other shape mismatches (``load_state_dict`` reports them) unless ``strict``, which
    raises a ValueError for them.
    """
    leaf = key.rsplit(".", 1)[-1]
    dim = AGENT_BIAS_AXES.get(leaf)
    if dim is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    if any(a != b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != dim):
        if strict:
            raise ValueError(
                f"incompatible checkpoint: {key} has shape {tuple(value.shape)}, model {tuple(target.shape)}"
            )
        return value
    work = value.to(torch.promote_types(value.dtype, torch.float32))
    return resize_1d(work, target.shape[dim], dim=dim).to(value.dtype)


def resize_agent_bias_tables(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Resize the row/column agent biases of ``state_dict`` (in place) to ``model``'s shapes with
    :func:`resize_agent_bias`; a mismatch along another axis raises a ValueError."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own:
            state_dict[k] = resize_agent_bias(k, v, own[k], strict=True)
    return state_dict


def resize_rel_pos_table(value: Tensor, target_shape: torch.Size) -> Tensor:
    """Bicubic resize of a Swin relative position bias table ``((2w-1)², h)`` to ``((2w'-1)², h)``."""
    if value.shape == target_shape or value.dim() != 2 or value.shape[1] != target_shape[1]:
        return value
    s0, s1 = math.isqrt(value.shape[0]), math.isqrt(target_shape[0])
    if s0 * s0 != value.shape[0] or s1 * s1 != target_shape[0]:
        return value
    t = value.float().t().reshape(1, -1, s0, s0)
    t = F.interpolate(t, size=(s1, s1), mode="bicubic", align_corners=False)
    return t.reshape(-1, s1 * s1).t().contiguous().to(value.dtype)


# ---------------------------------------------------------------- forward plumbing
def take_indices(num: int, indices) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` with a ValueError instead of an assert."""
    from timm.models._features import feature_take_indices

    try:
        return feature_take_indices(num, indices)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"invalid feature indices {indices!r} for {num} stages: {e}") from None


def check_output_fmt(output_fmt: str, allowed: Sequence[str]) -> None:
    if output_fmt not in allowed:
        raise ValueError(f"output_fmt must be {' or '.join(map(repr, allowed))}, got {output_fmt!r}")


def merged_hw(hw: HW) -> HW:
    """Grid after a stride-2 merge of an ``hw`` map (odd sizes padded): ``(ceil(H/2), ceil(W/2))``."""
    return (hw[0] + 1) // 2, (hw[1] + 1) // 2


def to_nchw(x: Tensor, hw: HW) -> Tensor:
    """Tokens ``(B, H·W, C)`` -> ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw).contiguous()


def check_image(x: Tensor, in_chans: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected an image batch (B, {in_chans}, H, W), got {tuple(x.shape)}")


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, hw: HW, checkpointing: bool = False) -> Tensor:
    """``x = blk(x, hw)`` for each block, through activation checkpointing when ``checkpointing`` is
    set and gradients are being recorded."""
    use = checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for blk in blocks:
        x = checkpoint(blk, x, hw, use_reentrant=False) if use else blk(x, hw)
    return x


# ---------------------------------------------------------------- classifier plumbing
def init_linear_norm(m: nn.Module) -> None:
    """Official init: Linear trunc_normal(0.02) / zero bias, LayerNorm 1 / 0."""
    from timm.layers import trunc_normal_

    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_pool(global_pool: str, allowed: Sequence[str] = ("avg", "")) -> str:
    if global_pool not in allowed:
        raise ValueError(f"global_pool must be {' or '.join(map(repr, allowed))}, got {global_pool!r}")
    return global_pool


class ClassifierMixin:
    """timm classifier API shared by the families: ``head`` on ``num_features``, ``forward``.

    ``global_pools`` lists the accepted ``global_pool`` values; ``forward_head`` and
    ``forward_features`` come from the family (or :class:`HierarchicalMixin`).
    """

    num_features: int
    num_classes: int
    global_pool: str
    global_pools: Tuple[str, ...] = ("avg", "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = check_pool(global_pool, self.global_pools)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class HierarchicalMixin(ClassifierMixin):
    """Swin / CSWin: a stem, then stages each opened by an optional merge (``output_hw``), a final
    ``norm`` and NHWC features.

    The family provides ``_embed(x) -> (tokens, hw)`` and ``_merge_stage_pairs()``: per stage, the
    merge that opens it (or ``None``) and a function running its blocks.
    """

    norm: nn.Module

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """NHWC features -> pooled features (``pre_logits``) or logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs before each merge (dims C, 2C, 4C, 8C at strides 4..32), timm style."""
        check_output_fmt(output_fmt, ("NCHW", "NHWC"))
        stages = self._merge_stage_pairs()
        last = len(stages) - 1
        take, max_index = take_indices(len(stages), indices)
        if stop_early:
            stages = stages[: max_index + 1]
        x, hw = self._embed(x)
        intermediates = []
        for i, (merge, run) in enumerate(stages):
            if merge is not None:
                x, hw = merge(x, hw), merge.output_hw(hw)
            x = run(x, hw)
            if i in take:
                y = to_nchw(self.norm(x) if norm and i == last else x, hw)
                intermediates.append(y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        x = self.norm(x) if len(stages) == last + 1 else x
        return x.view(x.shape[0], hw[0], hw[1], -1), intermediates

    def _prune_tail(self, max_index: int, num_stages: int, prune_norm: bool, prune_head: bool) -> bool:
        """After the stages past ``max_index`` are removed: features, norm and head; True if any was."""
        prune_end = max_index < num_stages - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return prune_end


# ---------------------------------------------------------------- registration
def default_cfg(first_conv: str, size: int = 224, crop_pct: float = 0.875) -> dict:
    """timm pretrained cfg of a released model (ImageNet-1k, bicubic, ImageNet mean/std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None, "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": first_conv, "classifier": "head", "paper_ids": "arXiv:2312.08874"}


def check_weight_source(variant: str, pretrained: bool, kwargs: dict) -> None:
    """``pretrained=True`` for a model without released weights needs a local source: raise instead
    of timm's silent fallback to random weights."""
    from .pretrained import official_url

    if not pretrained or official_url(variant):
        return
    cfgs = [kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")]
    get = lambda c, k: c.get(k) if isinstance(c, dict) else getattr(c, k, None)  # noqa: E731
    if not any(c is not None and get(c, k) for c in cfgs for k in ("file", "url", "hf_hub_id", "state_dict")):
        raise ValueError(
            f"{variant}: no released weights can be downloaded for this model; load a local file with "
            "agent_attention.models.create_model(name, checkpoint_path=...) or pretrained_cfg_overlay=dict(file=...)"
        )


def build(model_cls, variant: str, pretrained: bool, filter_fn, out_indices=(0, 1, 2, 3), **kwargs):
    """``build_model_with_cfg`` with the checkpoint filter and a ``getter`` feature wrapper."""
    from timm.models import build_model_with_cfg

    from .pretrained import prepare_pretrained

    kwargs = prepare_pretrained(variant, pretrained, kwargs)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)
