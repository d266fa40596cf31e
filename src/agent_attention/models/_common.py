"""Helpers shared by the Agent-Swin and Agent-CSWin model files.

Config parsing (``agent_num``, ``attn_type``), window partition with padding, the official
LayerNorm, and the pieces of ``checkpoint_filter_fn`` that both families need.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import resize_1d

HW = Tuple[int, int]

#: agent-bias parameters whose spatial axis follows the construction grid: name -> resized dim
AGENT_BIAS_AXES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


def resolve_norm_layer(norm_layer) -> Callable[..., nn.Module]:
    """``None`` / ``"LayerNorm"`` (as the manifests spell it) -> ``nn.LayerNorm`` with eps 1e-5."""
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() in ("layernorm", "ln")):
        return partial(nn.LayerNorm, eps=1e-5)
    if isinstance(norm_layer, str):
        raise ValueError(f"unknown norm_layer {norm_layer!r}; pass 'LayerNorm' or a callable")
    return norm_layer


def img_size_2d(img_size) -> HW:
    """``224`` or ``(224, 160)`` -> ``(H, W)``."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    try:
        H, W = (int(s) for s in img_size)
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be an int or a pair (H, W), got {img_size!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"img_size must be positive, got {(H, W)}")
    return H, W


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


def pad_hw(x: Tensor, mult: HW) -> Tensor:
    """Zero-pad ``x (B, H, W, C)`` at the bottom/right to multiples of ``mult``."""
    H, W = x.shape[1:3]
    ph, pw = (-H) % mult[0], (-W) % mult[1]
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def window_partition(x: Tensor, window: HW) -> Tensor:
    """``(B, H, W, C)`` -> ``(B·nW, wh·ww, C)``; windows by (row-block, col-block), tokens row-major."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: Tensor, window: HW, hw: HW) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, wh·ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    H, W = hw
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def unwrap_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Take the weights out of a training checkpoint and strip DDP's ``module.`` prefix.

    Accepts the dicts written by the official scripts (``model``, ``model_ema``, ``state_dict_ema``,
    ``state_dict``) or a bare state dict.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"checkpoint must be a dict of tensors, got {type(state_dict).__name__}")
    for key in ("model", "model_ema", "state_dict_ema", "state_dict"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            state_dict = inner
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def resize_agent_bias(key: str, value: Tensor, target: Tensor) -> Tensor:
    """Resize a checkpoint's row/column agent bias (``ah/aw/ha/wa_bias``) to the model's grid.

    Linear interpolation along the spatial axis (as the official fine-tuning loader); other
    shape mismatches are returned unchanged so that ``load_state_dict`` reports them.
    """
    leaf = key.rsplit(".", 1)[-1]
    dim = AGENT_BIAS_AXES.get(leaf)
    if dim is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    same_elsewhere = all(a == b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != dim)
    if not same_elsewhere:
        return value
    return resize_1d(value.float(), target.shape[dim], dim=dim).to(value.dtype)


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


def take_indices(num: int, indices) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` with a ValueError instead of an assert."""
    from timm.models._features import feature_take_indices

    try:
        return feature_take_indices(num, indices)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"invalid feature indices {indices!r} for {num} stages: {e}") from None


def to_nchw(x: Tensor, hw: HW) -> Tensor:
    """Tokens ``(B, H·W, C)`` -> ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw).contiguous()


def check_image(x: Tensor, in_chans: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected an image batch (B, {in_chans}, H, W), got {tuple(x.shape)}")




# ---------------------------------------------------------------- Swin window geometry
def relative_position_index(window: HW, table_window: int) -> Tensor:
    """Index ``(wh·ww, wh·ww)`` into a ``((2s-1)², h)`` relative position table (``s = table_window``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (table_window - 1)
    return rel[..., 0] * (2 * table_window - 1) + rel[..., 1]


def _pad_flags(hw: HW, padded: HW, shift: HW, device, dtype) -> Tensor:
    """``(1, Hp, Wp, 1)``: 1 on the padding of an ``hw`` map, in the frame rolled by ``-shift``."""
    m = torch.ones(1, *padded, 1, dtype=dtype, device=device)
    m[:, : hw[0], : hw[1]] = 0
    return torch.roll(m, shifts=(-shift[0], -shift[1]), dims=(1, 2))


def shifted_window_mask(hw: HW, padded: HW, window: HW, shift: HW, device=None) -> Optional[Tensor]:
    """Additive mask ``(nW, N, N)`` (0 / -100) of the shifted-window scheme, or ``None`` if not needed.

    Tokens of different regions of the rolled map (standard Swin labelling) may not attend to each
    other, and no token attends to the padding added at the bottom/right of an ``hw`` map.
    """
    if not any(shift) and tuple(hw) == tuple(padded):
        return None
    label = torch.zeros(1, *padded, 1, device=device)

    def slices(w, s):
        return (slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)

    cnt = 0
    for hs in slices(window[0], shift[0]):
        for ws in slices(window[1], shift[1]):
            label[:, hs, ws, :] = cnt
            cnt += 1
    if tuple(hw) != tuple(padded):
        label = label * 2 + _pad_flags(hw, padded, shift, device, label.dtype)
    m = window_partition(label, window).squeeze(-1)
    m = m.unsqueeze(1) - m.unsqueeze(2)
    return m.masked_fill(m != 0, float(-100.0)).masked_fill(m == 0, float(0.0))


def window_padding_mask(hw: HW, padded: HW, window: HW, shift: HW = (0, 0), device=None) -> Optional[Tensor]:
    """Bool ``(nW, wh·ww)``: ``True`` on padded tokens of each window (rolled by ``-shift``), or ``None``."""
    if tuple(hw) == tuple(padded):
        return None
    return window_partition(_pad_flags(hw, padded, shift, device, torch.bool), window)[..., 0]


# ---------------------------------------------------------------- shared classifier plumbing
class ClassifierMixin:
    """timm classifier API shared by both families (``norm`` -> mean over H, W -> ``head``)."""

    num_features: int
    num_classes: int
    global_pool: str

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: Linear trunc_normal(0.02) / zero bias, LayerNorm 1 / 0."""
        from timm.layers import trunc_normal_

        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """NHWC features -> pooled features (``pre_logits``) or logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    return global_pool


def default_cfg(first_conv: str, size: int = 224, crop_pct: float = 0.875) -> dict:
    """timm pretrained cfg of a released model (ImageNet-1k, bicubic, ImageNet mean/std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None, "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": first_conv, "classifier": "head", "paper_ids": "arXiv:2312.08874"}


def build(model_cls, variant: str, pretrained: bool, filter_fn, **kwargs):
    """``build_model_with_cfg`` with the checkpoint filter and a ``getter`` feature wrapper."""
    from timm.models import build_model_with_cfg

    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)
