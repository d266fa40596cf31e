"""Agent-PVT: the Pyramid Vision Transformer of Agent Attention as a timm model.

Official state-dict layout (``pos_embed{i}``, ``patch_embed{i}.{proj,norm}``, ``block{i}.{j}`` with
``attn.{q,kv,proj,dwc}`` and the agent biases, ``head``; no final norm, no class token), so the
released checkpoints load with ``strict=True``. Runs at any input size of at least 32×32 (also
non-square; strided convs drop trailing rows/columns like the official backbone): position
embeddings are bilinearly resized to the stage grids (as the official code) and the agent biases by
:class:`~agent_attention.layers.AgentAttention`; at the construction size no resize happens.

Hierarchical timm API: ``feature_info``, ``forward_intermediates``, ``prune_intermediate_layers`` and
``timm.create_model(name, features_only=True)`` (4 NCHW maps at strides 4/8/16/32).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_function
from torch import Tensor, nn

from .._grids import HW
from ..layers import AgentAttention, to_2tuple_hw
from ..weights import unwrap_state_dict
from ._config import AgentNum, parse_agent_num, per_stage
from ._model_api import (ClassifierMixin, check_dynamic_img_size, check_image, check_output_fmt, check_pool,
                         feature_maps, init_kwargs, init_linear_norm, run_blocks, take_indices, to_nchw)
from ._resize import infer_square_grid, resize_agent_bias_tables, resize_pos_embed
from .registry import build, default_cfg, register_family

__all__ = ["AgentPyramidVisionTransformer", "SRAttention", "checkpoint_filter_fn"]

# any FX tracer (torchvision's create_feature_extractor too): these calls of this file are graph leaves
for _name in ("check_image", "check_sr_grid", "resize_pos_embed"):
    torch.fx.wrap(_name)


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm (eps 1e-5, as the official patch embeds); returns tokens and grid."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tuple[Tensor, HW]:
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


@register_notrace_function  # FX: a leaf (Python check on the grid)
def check_sr_grid(hw: HW, sr_ratio: int) -> None:
    if min(hw) < sr_ratio:
        raise ValueError(f"grid {tuple(hw)} is smaller than the spatial-reduction ratio {sr_ratio}")


class SRAttention(nn.Module):
    """PVT spatial-reduction softmax attention ('B' stages): keys/values from a strided conv of the
    tokens (``sr``, kernel = stride = ``sr_ratio``) + LayerNorm (``norm``, eps 1e-5); SDPA."""

    def __init__(self, *, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)
        if self.sr_ratio > 1:
            check_sr_grid(hw, self.sr_ratio)
            x = self.sr(x.transpose(1, 2).reshape(B, C, *hw)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm block (LN eps 1e-6): agent attention (``agent_num``) or spatial-reduction attention."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 window: HW, agent_num: Optional[int] = None, sr_ratio: int = 1, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if agent_num:
            self.attn = AgentAttention(dim, num_heads, agent_num, window=window, qkv_layout="split",
                                       qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        else:
            self.attn = SRAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentPyramidVisionTransformer(ClassifierMixin, nn.Module):
    """Agent-PVT (official ``PyramidVisionTransformer`` of Agent Attention).

    Args:
        img_size: construction size (int or (H, W)): sizes ``pos_embed{i}`` and the agent biases
            (window of stage ``i`` = its grid, ``img/4``, ``/8``, ``/16``, ``/32``).
        patch_size: stride of the first patch embed (later ones use 2).
        embed_dims, num_heads, mlp_ratios, depths: per stage (an int applies to all stages).
        agent_num: agents per stage (int, ``"9-16-49-49"``, list of ints or strings).
        attn_type: one letter per stage, ``'A'`` agent attention, ``'B'`` PVT spatial-reduction
            attention with ``sr_ratios``.
        agent_sr_ratios: spatial reduction of agent stages (one digit per stage); only ``1``.
        qk_scale: scale of 'B' attention only (agent attention always uses ``head_dim ** -0.5``).
        global_pool: ``"avg"`` (mean over the last stage's tokens, official) or ``""``.
    """

    #: official downstream agent grids (``downstream_agent_shapes`` of the mmdet / mmseg configs)
    downstream_agent_shapes = ((12, 12), (16, 16), (28, 28), (28, 28))
    unpooled_classifier = False  # NCHW features: global_pool='' needs num_classes=0

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 depths: Sequence[int] = (2, 2, 2, 2), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 agent_sr_ratios: Union[str, Sequence[int]] = "1111", num_stages: int = 4,
                 agent_num: AgentNum = (9, 16, 49, 49), attn_type: Optional[str] = "AAAA", norm_eps: float = 1e-6,
                 dynamic_img_size: bool = True):
        super().__init__()
        self.init_kwargs = init_kwargs(locals())
        self.dynamic_img_size = check_dynamic_img_size(dynamic_img_size, "Agent-PVT")
        S = num_stages
        if S < 1:
            raise ValueError(f"num_stages must be >= 1, got {S}")
        self.check_head(num_classes, check_pool(global_pool, self.global_pools))
        stages = dict(truncate=True)  # the official model takes the first num_stages entries
        embed_dims = per_stage(embed_dims, S, "embed_dims", **stages)
        num_heads = per_stage(num_heads, S, "num_heads", **stages)
        mlp_ratios = per_stage(mlp_ratios, S, "mlp_ratios", cast=float, **stages)
        depths, sr_ratios = per_stage(depths, S, "depths", **stages), per_stage(sr_ratios, S, "sr_ratios", **stages)
        agents = parse_agent_num(agent_num)
        agents = per_stage(agents * S if len(agents) == 1 else agents, S, "agent_num", **stages)
        attn_type = (attn_type or "A" * S).upper()
        if len(attn_type) < S or set(attn_type[:S]) - {"A", "B"}:
            raise ValueError(
                f"attn_type must have one letter 'A' (agent) or 'B' (PVT attention) per stage, got {attn_type!r}"
            )
        agent_sr = [int(r) for r in (agent_sr_ratios if not isinstance(agent_sr_ratios, int) else str(agent_sr_ratios))]
        agent_sr = per_stage(agent_sr, S, "agent_sr_ratios", **stages)
        for i in range(S):
            if attn_type[i] == "A" and agent_sr[i] != 1:
                raise NotImplementedError(
                    f"agent_sr_ratios[{i}] = {agent_sr[i]}: agent attention with spatial reduction is not "
                    "implemented (no released model uses it); use 1"
                )
        img_hw = to_2tuple_hw(img_size, "img_size")
        self.num_classes, self.global_pool, self.num_stages = num_classes, global_pool, S
        self.patch_size, self.img_size, self.attn_type, self.in_chans = patch_size, img_hw, attn_type[:S], in_chans
        self.embed_dims, self.agent_nums = list(embed_dims), [agents[i] if attn_type[i] == "A" else 0 for i in range(S)]
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        # construction grids: S/4, S/8, ... (floor at every stride-2 stage, like the convs)
        grids, g = [], (img_hw[0] // patch_size, img_hw[1] // patch_size)
        for i in range(S):
            grids.append(g)
            g = (g[0] // 2, g[1] // 2)
        if min(grids[-1]) < 1:
            raise ValueError(f"img_size {img_hw} too small: needs at least {patch_size * 2 ** (S - 1)} pixels per side")
        self.grids: List[HW] = grids
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur = 0
        for i in range(S):
            dim, prev = embed_dims[i], in_chans if i == 0 else embed_dims[i - 1]
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(patch_size=patch_size if i == 0 else 2, in_chans=prev,
                                                            embed_dim=dim))
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grids[i][0] * grids[i][1], dim)))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dim=dim, num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, qk_scale=qk_scale,
                      drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j], window=grids[i],
                      agent_num=self.agent_nums[i] or None, sr_ratio=sr_ratios[i], norm_eps=norm_eps)
                for j in range(depths[i])
            ))
            cur += depths[i]
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        # module: the stage's map (the FX tap, on the forward path); stage: the module holding its blocks
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f"feature_maps.{i}", stage=f"block{i + 1}")
            for i in range(S)
        ]
        self.feature_maps = feature_maps(S, contiguous=False)
        self._init_weights()

    # ----------------------------------------------------------------------------- init / timm API
    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.pos_embed1.is_meta:
            return  # meta device (shape-only build): nothing to initialise
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        for m in self.modules():
            init_linear_norm(m)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token"}  # as the official model: the pos_embeds ARE weight-decayed

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        blocks = r"^(?:block|patch_embed|pos_embed)(\d+)" if coarse else [
            (r"^(?:patch_embed|pos_embed)(\d+)", (-1,)), (r"^block(\d+)\.(\d+)", None)]
        return dict(stem=r"^(?:patch_embed|pos_embed)1\b", blocks=blocks)

    def resized_state_dict(self, target: "AgentPyramidVisionTransformer") -> Dict[str, Tensor]:
        sd = self.state_dict()
        for i in range(self.num_stages):
            key = f"pos_embed{i + 1}"
            sd[key] = resize_pos_embed(sd[key], self.grids[i], target.grids[i], 0, mode="bilinear")
        return checkpoint_filter_fn(sd, target)

    # ------------------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        check_image(x, self.in_chans, "Agent-PVT", min_size=self.patch_size * 2 ** (self.num_stages - 1))

    def _stage(self, i: int, x: Tensor) -> Tuple[Tensor, HW]:
        """Stage ``i`` (0-based) on an NCHW input; returns tokens ``(B, H·W, C)`` and the grid."""
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        pos = resize_pos_embed(getattr(self, f"pos_embed{i + 1}"), self.grids[i], hw, 0, mode="bilinear")
        x = getattr(self, f"pos_drop{i + 1}")(x + pos)
        return run_blocks(getattr(self, f"block{i + 1}"), x, hw, self.grad_checkpointing), hw

    def forward_features(self, x: Tensor) -> Tensor:
        """Last-stage map ``(B, C, H/32, W/32)``."""
        self._check_input(x)
        for i in range(self.num_stages):
            x = self.feature_maps[i](*self._stage(i, x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.flatten(2).mean(-1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs as NCHW maps (or NLC tokens); ``norm`` is accepted for timm compatibility
        (Agent-PVT has no final norm)."""
        check_output_fmt(output_fmt, ("NCHW", "NLC"))
        self._check_input(x)
        take, max_index = take_indices(self.num_stages, indices)
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        outs = []
        for i in range(last + 1):
            tokens, hw = self._stage(i, x)
            x = to_nchw(tokens, hw, contiguous=False)
            if i in take:
                outs.append(x if output_fmt == "NCHW" else tokens)
        if intermediates_only:
            return outs
        return x, outs

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in ("patch_embed", "pos_embed", "pos_drop", "block"):
                delattr(self, f"{name}{i + 1}")
        self.num_stages = max_index + 1
        self.grids, self.feature_info = self.grids[: max_index + 1], self.feature_info[: max_index + 1]
        self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or max_index < len(self.embed_dims) - 1:
            self.reset_classifier(0)
        return take


# ------------------------------------------------------------------------------ checkpoint loading
def checkpoint_filter_fn(state_dict: Dict, model: AgentPyramidVisionTransformer) -> Dict[str, Tensor]:
    """Official / training checkpoint -> this model: unwrap, strip ``module.``, resize ``pos_embed{i}``
    (bilinear, as the official run-time resize) and row/column agent biases (linear) to the model's
    construction grids."""
    out = unwrap_state_dict(state_dict)
    for i in range(model.num_stages):
        key, own = f"pos_embed{i + 1}", getattr(model, f"pos_embed{i + 1}")
        pos = out.get(key)
        if pos is not None and pos.shape != own.shape:
            if pos.dim() != 3 or pos.shape[-1] != own.shape[-1]:
                raise ValueError(f"incompatible checkpoint: {key} {tuple(pos.shape)} vs model {tuple(own.shape)}")
            out[key] = resize_pos_embed(pos, infer_square_grid(pos.shape[1], key), model.grids[i], 0, "bilinear")
    return resize_agent_bias_tables(out, model)


# ----------------------------------------------------------------------------------- registration
def _cfg(url: str, size: int = 224, **kwargs) -> dict:
    # official eval: square resize to int(S * 256 / 224), center crop S
    return default_cfg(first_conv="patch_embed1.proj", url=url, size=size,
                       pool_size=(size // 32, size // 32), crop_mode="squash", **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny": _cfg("https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1"),
    "agent_pvt_small": _cfg("https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1"),
    "agent_pvt_medium": _cfg("https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1"),
    "agent_pvt_medium_256": _cfg("https://cloud.tsinghua.edu.cn/f/654df734121643b19c52/?dl=1", 256, crop_pct=256 / 292),
    "agent_pvt_large": _cfg("https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/?dl=1"),
})


_COMMON = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
               qkv_bias=True, agent_num=[9, 16, 49, 49], attn_type="AAAA", agent_sr_ratios="1111")


def _create_agent_pvt(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> AgentPyramidVisionTransformer:
    return build(AgentPyramidVisionTransformer, variant, pretrained,
                 **{**_COMMON, **defaults, **kwargs})


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T (depths 2-2-2-2; 11.6M params, ImageNet top-1 78.4)."""
    return _create_agent_pvt("agent_pvt_tiny", pretrained, dict(depths=[2, 2, 2, 2]), kwargs)


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S (depths 3-4-6-3; 20.6M params, top-1 82.2)."""
    return _create_agent_pvt("agent_pvt_small", pretrained, dict(depths=[3, 4, 6, 3]), kwargs)


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M (depths 3-4-18-3; 35.9M params, top-1 83.4)."""
    return _create_agent_pvt("agent_pvt_medium", pretrained, dict(depths=[3, 4, 18, 3]), kwargs)


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M at 256 (grids 64/32/16/8; 36.1M params, top-1 83.8)."""
    return _create_agent_pvt("agent_pvt_medium_256", pretrained, dict(depths=[3, 4, 18, 3], img_size=256), kwargs)


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L (official config file agent_pvt_b.yaml; depths 3-8-27-3; 48.7M params, top-1 83.7)."""
    return _create_agent_pvt("agent_pvt_large", pretrained, dict(depths=[3, 8, 27, 3]), kwargs)


register_family(
    __name__, AgentPyramidVisionTransformer, checkpoint_filter=checkpoint_filter_fn,
    aliases={"agent_pvt_t": "agent_pvt_tiny", "agent_pvt_s": "agent_pvt_small", "agent_pvt_m": "agent_pvt_medium",
             "agent_pvt_m_256": "agent_pvt_medium_256", "agent_pvt_l": "agent_pvt_large"},
    paper_top1={"agent_pvt_tiny": 78.4, "agent_pvt_small": 82.2, "agent_pvt_medium": 83.4,
                "agent_pvt_medium_256": 83.8, "agent_pvt_large": 83.7},
    test_kwargs=dict(embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
                     agent_num=[4, 9, 4, 4]),
)
