"""Agent-CSWin (Han et al., ECCV 2024): CSWin Transformer with agent attention in the early stages.

Official layout and names (``stage1_conv_embed.0/.2``, ``stage{s}.{j}`` blocks with block-level
``qkv``/``norm1``/``proj``, ``attns.{0,1}``, ``mlp``, ``norm2``; ``merge{m}.conv/.norm``; ``norm``;
``head``). Stages marked ``'A'`` in ``attn_type`` run one global
:class:`~agent_attention.layers.AgentAttentionCore` branch (its depthwise conv is CSWin's ``get_v``);
``'B'`` stages run the original LePE cross-shaped stripe attention (two half-width branches,
vertical then horizontal stripes; one full branch in the last stage or when the stripe covers the
map). Any input size works: the stem and merges follow the actual grid, stripes are padded to the
split size (padded keys masked, zero padding for ``get_v`` as at a stripe border).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model, register_notrace_module
from torch import Tensor, nn

from .._grids import HW, _channels_last_grid, fx_tracing, round_up
from ..layers import AgentAttentionCore, to_2tuple_hw
from ..weights import unwrap_state_dict
from ._config import parse_attn_type, parse_int_list, resolve_norm_layer
from ._model_api import (HierarchicalMixin, check_dynamic_img_size, check_image, check_pool, feature_maps,
                         init_kwargs, init_linear_norm, merged_hw, opaque_forward, run_blocks, take_indices, to_nchw)
from ._resize import resize_agent_bias
from ._windows import known_true, pad_to, same_size, window_padding_mask, window_partition, window_reverse
from .registry import build, default_cfg, register_family

# any FX tracer (torchvision's create_feature_extractor too): these calls of this file are graph leaves
for _name in ("check_image", "opaque_forward"):
    torch.fx.wrap(_name)

__all__ = ["AgentCSWinTransformer", "LePEAttention", "CSWinAgentAttention", "CSWinBlock", "checkpoint_filter_fn"]


def _stripe_window(idx: int, split: int, hw: HW) -> HW:
    """Window of branch ``idx`` on an actual map: -1 whole map, 0 vertical stripes, 1 horizontal.

    The stripe width is ``split`` wherever the map side is provably at least ``split`` (a constant of
    an exported graph whose sizes start at :meth:`AgentCSWinTransformer.export_min_size`), else
    ``min(split, side)``."""
    H, W = hw
    if idx == -1:
        return H, W
    side = W if idx == 0 else H
    width = split if known_true(side >= split) else min(split, side)
    return (H, width) if idx == 0 else (width, W)


def _construction_window(idx: int, split: int, reso: HW) -> HW:
    return reso if idx == -1 else ((reso[0], split) if idx == 0 else (split, reso[1]))


class _Stripes:
    """Partition ``(B, H·W, C)`` q/k/v into (padded) stripe windows and back.

    Only the striped side is padded (the other side is the window itself), with one size expression
    per side, so that a dynamic-size export holds no guard on the map size."""

    def __init__(self, idx: int, split: int, hw: HW, device):
        self.hw = hw
        self.window = _stripe_window(idx, split, hw)
        wh, ww = self.window
        H, W = hw
        self.padded = (H, round_up(W, ww)) if idx == 0 else (round_up(H, wh), W) if idx == 1 else (H, W)
        self.pad = window_padding_mask(hw, self.padded, self.window, device=device)  # (nW, N) bool or None

    def split(self, t: Tensor) -> Tensor:
        B, _, C = t.shape
        return window_partition(pad_to(t.view(B, *self.hw, C), self.padded), self.window)

    def key_padding_mask(self, batch: int) -> Optional[Tensor]:
        return None if self.pad is None else self.pad.repeat(batch, 1)

    def merge(self, windows: Tensor) -> Tensor:
        x = window_reverse(windows, self.window, self.padded)
        H, W = self.hw
        if not same_size(self.padded, self.hw):  # an explicit copy of the crop: no view test on its size
            x = x[:, :H, :W].clone(memory_format=torch.contiguous_format)
        return x.view(x.shape[0], H * W, x.shape[-1])


class LePEAttention(nn.Module):
    """CSWin stripe attention: softmax attention per stripe window + ``get_v`` (locally-enhanced PE)."""

    def __init__(self, *, dim: int, resolution: HW, idx: int, split_size: int, num_heads: int, attn_drop: float = 0.0,
                 qk_scale: Optional[float] = None):
        super().__init__()
        self.dim, self.idx, self.split_size, self.num_heads = dim, idx, split_size, num_heads
        self.window = _construction_window(idx, split_size, resolution)  # (H_sp, W_sp) at construction
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, hw: HW) -> Tensor:
        B, L, C = q.shape
        s = _Stripes(self.idx, self.split_size, hw, q.device)
        q, k, v = s.split(q), s.split(k), s.split(v)
        Bw, N, _ = q.shape
        h = self.num_heads
        qh, kh, vh = (t.view(Bw, N, h, C // h).transpose(1, 2) for t in (q, k, v))
        mask = s.key_padding_mask(B)
        if mask is not None:
            mask = ~mask[:, None, None, :]  # SDPA bool masks mark the keys to keep
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(Bw, N, C)
        lepe = self.get_v(_channels_last_grid(v, s.window)).flatten(2).transpose(1, 2)
        return s.merge(out + lepe)


class CSWinAgentAttention(AgentAttentionCore):
    """Agent attention branch of a CSWin block: projected q/k/v in, no projection, DWC = ``get_v``.

    ``idx=-1`` (every released config) attends over the whole actual map; ``idx`` 0/1 over vertical /
    horizontal stripes like :class:`LePEAttention` (padded tokens are kept out of keys and agents).
    """

    def __init__(self, *, dim: int, resolution: HW, idx: int, split_size: int, num_heads: int, agent_num: int,
                 attn_drop: float = 0.0):
        window = _construction_window(idx, split_size, resolution)
        super().__init__(dim, num_heads, agent_num, window=window, dwc_name="get_v", attn_drop=attn_drop)
        self.idx, self.split_size = idx, split_size

    def forward(self, q: Tensor, k: Tensor, v: Tensor, hw: HW) -> Tensor:  # type: ignore[override]
        if self.idx == -1:
            return self.attend(q, k, v, hw)
        s = _Stripes(self.idx, self.split_size, hw, q.device)
        out = self.attend(s.split(q), s.split(k), s.split(v), s.window, key_padding_mask=s.key_padding_mask(q.shape[0]))
        return s.merge(out)


@register_notrace_module  # FX: a leaf (stripe geometry and padding follow the actual map size)
class CSWinBlock(nn.Module):
    """``x + proj(branches(qkv(norm1(x))))``, then ``x + mlp(norm2(x))`` (official CSWinBlock)."""

    def __init__(self, *, dim: int, reso: HW, num_heads: int, split_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, last_stage: bool = False, agent: bool = False,
                 agent_num: int = 49):
        super().__init__()
        self.dim, self.agent = dim, agent
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)  # constructed but never applied, as in the official code
        single = last_stage or split_size >= max(reso)  # official: split == resolution
        self.branch_num = 1 if single else 2
        if single:
            specs = [(dim, num_heads, -1)]
        else:
            if num_heads % 2 or dim % 2:
                raise ValueError(f"CSWinBlock: two stripe branches need even dim and num_heads, got {dim}, {num_heads}")
            specs = [(dim // 2, num_heads // 2, 0), (dim // 2, num_heads // 2, 1)]
        self.attns = nn.ModuleList([
            CSWinAgentAttention(dim=d, resolution=reso, idx=i, split_size=split_size, num_heads=h, agent_num=agent_num,
                                attn_drop=attn_drop) if agent
            else LePEAttention(dim=d, resolution=reso, idx=i, split_size=split_size, num_heads=h, attn_drop=attn_drop,
                               qk_scale=qk_scale)
            for d, h, i in specs])
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.norm2 = norm_layer(dim)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        if fx_tracing():  # any FX tracer: one opaque call (the stripes follow the map size)
            return opaque_forward(self, x, hw)
        return self.forward_impl(x, hw)

    def forward_impl(self, x: Tensor, hw: HW) -> Tensor:
        B, L, C = x.shape
        if L != hw[0] * hw[1]:
            raise ValueError(f"CSWinBlock: {L} tokens do not match the map size {hw[0]}x{hw[1]}")
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, C)).unbind(-2)
        if self.branch_num == 2:
            c = C // 2
            out = torch.cat([self.attns[0](q[..., :c], k[..., :c], v[..., :c], hw),
                             self.attns[1](q[..., c:], k[..., c:], v[..., c:], hw)], dim=-1)
        else:
            out = self.attns[0](q, k, v, hw)
        x = x + self.drop_path(self.proj(out))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    """Conv 3x3 stride 2 + LayerNorm between stages; tokens in, tokens out."""

    output_hw = staticmethod(merged_hw)  # grid after this merge

    def __init__(self, *, dim: int, dim_out: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        return self.norm(self.conv(to_nchw(x, hw)).flatten(2).transpose(1, 2))


class _ToTokens(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H·W, C)`` (index 1 of the stem, like the official Rearrange)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class AgentCSWinTransformer(HierarchicalMixin, nn.Module):
    """Agent-CSWin classifier; defaults are Agent-CSWin-T at 224.

    ``split_size``: stripe width of ``'B'`` stages; ``la_split_size`` (str ``'56-28-14-7'`` or list):
    that of ``'A'`` stages, ``None`` = the stage resolution (global agent attention, as released).
    ``depths`` is accepted as an alias of the official ``depth``. ``patch_size`` and
    ``hybrid_backbone`` exist for signature compatibility (the stem is a 7x7 stride-4 conv).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 64,
                 depth: Sequence[int] = (2, 4, 18, 1), split_size=(1, 2, 7, 7), la_split_size=None,
                 num_heads=(2, 4, 8, 16), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, hybrid_backbone=None, norm_layer=None, use_chk: bool = False,
                 agent_num=(9, 16, 49, 49), attn_type: str = "AABB", depths: Optional[Sequence[int]] = None,
                 dynamic_img_size: bool = True):
        super().__init__()
        self.init_kwargs = init_kwargs(locals())
        self.dynamic_img_size = check_dynamic_img_size(dynamic_img_size, "Agent-CSWin")
        if hybrid_backbone is not None:
            raise ValueError("AgentCSWinTransformer: hybrid_backbone is not supported")
        norm_layer = resolve_norm_layer(norm_layer)
        depth = list(depths if depths is not None else depth)
        n = len(depth)
        if n != 4:
            raise ValueError(f"AgentCSWinTransformer has 4 stages; depth must have 4 entries, got {depth}")
        num_heads = parse_int_list(num_heads, n, "num_heads")
        agent_nums = parse_int_list(agent_num, n, "agent_num")
        splits = parse_int_list(split_size, n, "split_size")
        plan = parse_attn_type(attn_type, depth)
        H, W = to_2tuple_hw(img_size, "img_size")
        res = [((H - 3) // 4 + 1, (W - 3) // 4 + 1)]  # the stem conv (k7, s4, p2)
        for _ in range(n - 1):
            res.append(MergeBlock.output_hw(res[-1]))
        la_splits = [max(r) for r in res] if la_split_size is None else parse_int_list(la_split_size, n, "la_split_size")
        self.num_classes, self.global_pool, self.in_chans = num_classes, check_pool(global_pool), in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (n - 1)
        self.grad_checkpointing = bool(use_chk)

        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), _ToTokens(), norm_layer(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.feature_info: List[dict] = []
        dim = embed_dim
        for i in range(n):
            if i > 0:
                self.add_module(f"merge{i}", MergeBlock(dim=dim, dim_out=dim * 2, norm_layer=norm_layer))
                dim *= 2
            blocks = [CSWinBlock(dim=dim, reso=res[i], num_heads=num_heads[i],
                                 split_size=la_splits[i] if plan[i][j] else splits[i], mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                                 drop_path=dpr[sum(depth[:i]) + j], norm_layer=norm_layer, last_stage=i == n - 1,
                                 agent=plan[i][j], agent_num=agent_nums[i])
                      for j in range(depth[i])]
            self.add_module(f"stage{i + 1}", nn.ModuleList(blocks))
            # module: the FX tap of the stage's map; stage: the module holding its blocks
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"feature_maps.{i}",
                                          stage=f"stage{i + 1}"))
        self.num_stages = n
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_maps = feature_maps(n)
        self.apply(init_linear_norm)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay."""
        if coarse:
            return dict(stem=r"^stage1_conv_embed", blocks=[(r"^stage(\d+)", None), (r"^merge(\d+)", None)])
        return dict(stem=r"^stage1_conv_embed",
                    blocks=[(r"^stage(\d+)\.(\d+)", None), (r"^merge(\d+)", (99999,)), (r"^norm", (99999,))])

    def resized_state_dict(self, target: "AgentCSWinTransformer") -> Dict[str, Tensor]:
        return checkpoint_filter_fn(self.state_dict(), target)

    export_size_oblivious = True  # see models.export: stripes are padded at some sizes and not at others

    def export_min_size(self) -> int:
        """Smallest input side (pixels) of a dynamic-size export: every stripe branch has its full
        stripe width from there up (112 for the released 224 models); smaller inputs take another
        graph (static)."""
        low = 1
        for i, (_, blocks) in enumerate(self._stages()):
            for blk in blocks:
                for attn in blk.attns:
                    if attn.idx != -1:
                        low = max(low, attn.split_size * 4 * 2 ** i)
        return low

    def _embed(self, x: Tensor) -> Tuple[Tensor, HW]:
        check_image(x, self.in_chans, type(self).__name__, min_size=3)
        conv, to_tokens, norm = self.stage1_conv_embed
        x = conv(x)
        return norm(to_tokens(x)), (x.shape[2], x.shape[3])

    def _stages(self):
        for i in range(self.num_stages):
            merge = getattr(self, f"merge{i}", None) if i > 0 else None
            blocks = getattr(self, f"stage{i + 1}", None)
            if blocks is None:  # pruned
                return
            yield merge, blocks

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor, hw: HW) -> Tensor:
        return run_blocks(blocks, x, hw, self.grad_checkpointing)

    def _merge_stage_pairs(self) -> List[Tuple[Optional[nn.Module], Callable[[Tensor, HW], Tensor]]]:
        """Per stage: its opening merge (``None`` for the first) and its blocks."""
        return [(merge, partial(self._run_blocks, blocks)) for merge, blocks in self._stages()]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = take_indices(len(list(self._stages())), indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"merge{i}", f"stage{i + 1}"):
                if hasattr(self, name):
                    delattr(self, name)
        self._prune_tail(max_index, self.num_stages, prune_norm, prune_head)
        return take


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: AgentCSWinTransformer) -> Dict[str, Tensor]:
    """Official (or our) checkpoint -> state dict for ``model``: unwraps ``model``/``model_ema``/
    ``state_dict_ema``/``state_dict`` and ``module.``; resizes row/column agent biases (linear)."""
    own = model.state_dict()
    out = {}
    for k, v in unwrap_state_dict(state_dict).items():
        out[k] = resize_agent_bias(k, v, own[k]) if k in own else v
    return out


def _cfg(url: str, size: int = 224, **kwargs) -> dict:
    return default_cfg(first_conv="stage1_conv_embed.0", url=url, size=size,
                       pool_size=(size // 32, size // 32), **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_cswin_tiny": _cfg("https://cloud.tsinghua.edu.cn/f/8c562a74441e46d5902b/?dl=1"),
    "agent_cswin_small": _cfg("https://cloud.tsinghua.edu.cn/f/30eb8af675bc4b7a8747/?dl=1"),
    "agent_cswin_base": _cfg("https://cloud.tsinghua.edu.cn/f/c8035b0839b2410c8c9f/?dl=1"),
    # official eval of B-384 uses the 0.875 crop
    "agent_cswin_base_384": _cfg("https://cloud.tsinghua.edu.cn/f/1239be0df44b47719432/?dl=1", 384),
})

_T = dict(embed_dim=64, depth=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7),
          agent_num=(9, 16, 49, 49), attn_type="AABB")
_S = dict(_T, depth=(3, 6, 29, 2))
_B = dict(_S, embed_dim=96, num_heads=(4, 8, 16, 32))


def _create_agent_cswin(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> AgentCSWinTransformer:
    kwargs = {**defaults, **kwargs}
    if "depths" in kwargs:  # timm-style spelling overrides the official ``depth``
        kwargs.pop("depth", None)
    return build(AgentCSWinTransformer, variant, pretrained, **kwargs)


@register_model
def agent_cswin_tiny(pretrained: bool = False, **kwargs) -> AgentCSWinTransformer:
    """Agent-CSWin-T 224 (83.1% top-1)."""
    return _create_agent_cswin("agent_cswin_tiny", pretrained, dict(_T, drop_path_rate=0.2), kwargs)


@register_model
def agent_cswin_small(pretrained: bool = False, **kwargs) -> AgentCSWinTransformer:
    """Agent-CSWin-S 224 (83.9%)."""
    return _create_agent_cswin("agent_cswin_small", pretrained, dict(_S, drop_path_rate=0.4), kwargs)


@register_model
def agent_cswin_base(pretrained: bool = False, **kwargs) -> AgentCSWinTransformer:
    """Agent-CSWin-B 224 (84.7%)."""
    return _create_agent_cswin("agent_cswin_base", pretrained, dict(_B, drop_path_rate=0.5), kwargs)


@register_model
def agent_cswin_base_384(pretrained: bool = False, **kwargs) -> AgentCSWinTransformer:
    """Agent-CSWin-B 384 (85.8%)."""
    return _create_agent_cswin("agent_cswin_base_384", pretrained,
                               dict(_B, img_size=384, split_size=(1, 2, 12, 12), drop_path_rate=0.7), kwargs)


register_family(
    __name__, AgentCSWinTransformer, checkpoint_filter=checkpoint_filter_fn,
    aliases={"agent_cswin_t": "agent_cswin_tiny", "agent_cswin_s": "agent_cswin_small",
             "agent_cswin_b": "agent_cswin_base", "agent_cswin_b_384": "agent_cswin_base_384"},
    paper_top1={"agent_cswin_tiny": 83.1, "agent_cswin_small": 83.9, "agent_cswin_base": 84.7,
                "agent_cswin_base_384": 85.8},
    test_kwargs=dict(embed_dim=16, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), agent_num=[4, 9, 4, 4]),
)
