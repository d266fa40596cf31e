"""Agent-DeiT: a DeiT/ViT whose first ``agent_layer`` blocks use agent attention.

The module keeps the official state-dict layout (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.i.{norm1,attn,norm2,mlp}``, ``norm``, ``head``), so released checkpoints load with
``strict=True``. Unlike the official model it runs at any input size that is a multiple of the
patch size (also non-square): the position embedding and the agent biases are resized to the
actual token grid, and at the construction size both resizes are skipped (exact official outputs).

Registered with timm: ``agent_deit_tiny``, ``agent_deit_small``, ``agent_deit_small_448``,
``agent_deit_base`` and the short aliases ``agent_deit_t/s/s_448/b`` (declared at the end).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_function
from torch import Tensor, nn

from .._grids import HW, fx_tracing
from ..layers import AgentAttention, to_2tuple_hw
from ..weights import unwrap_state_dict
from ._config import AgentNum, parse_agent_num
from ._model_api import (ClassifierMixin, check_dynamic_img_size, check_image, check_output_fmt, check_pool,
                         feature_maps, init_kwargs, init_linear_norm, run_blocks, take_indices, to_nchw)
from ._resize import infer_square_grid, resize_agent_bias_tables, resize_pos_embed
from .registry import build, default_cfg, register_family

__all__ = [
    "AgentVisionTransformer", "checkpoint_filter_fn", "parse_agent_num", "deit_agent_num",
    "unwrap_state_dict", "resize_pos_embed", "resize_agent_bias_tables", "infer_square_grid",
]

# any FX tracer (torchvision's create_feature_extractor too): these calls of this file are graph leaves
for _name in ("check_image", "check_patch_multiple", "resize_pos_embed"):
    torch.fx.wrap(_name)

# official rule: block i uses agent_num[_PAIR_TO_ENTRY[i // 2]] (blocks 0-1 -> 0, 2-3 -> 1, 4-9 -> 2, 10-11 -> 3)
_PAIR_TO_ENTRY = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}


# ---------------------------------------------------------------------------------------- helpers
def deit_agent_num(agent_num: AgentNum, block: int) -> int:
    """Agent count of DeiT block ``block`` under the official per-pair table.

    A single count applies to every block. Blocks past the table (``block // 2 > 5``, deeper than
    the official 12) use entry 3, like the last official pair.
    """
    counts = parse_agent_num(agent_num)
    if len(counts) == 1:
        return counts[0]
    entry = _PAIR_TO_ENTRY.get(block // 2, 3)
    if entry >= len(counts):
        raise ValueError(f"agent_num {counts} has no entry {entry} needed by block {block} (official rule needs 4)")
    return counts[entry]


def grid_size(img_hw: Sequence[int], patch_size: int) -> HW:
    """Token grid of an ``img_hw`` input; ValueError unless a positive multiple of the patch."""
    H, W = (int(s) for s in img_hw)
    p = patch_size
    if H < p or W < p or H % p or W % p:
        raise ValueError(f"input size {(H, W)} must be a positive multiple of the patch size {p} (Agent-DeiT)")
    return H // p, W // p


@register_notrace_function  # FX: a leaf (Python checks on the input's shape)
def check_patch_multiple(x: Tensor, patch_size: int) -> None:
    if torch.compiler.is_compiling():  # torch.export with a dynamic size: a run-time check, no specialisation
        torch._check(x.shape[-2] % patch_size == 0 and x.shape[-1] % patch_size == 0,
                     lambda: f"input size must be a multiple of the patch size {patch_size} (Agent-DeiT)")
        return
    grid_size(x.shape[-2:], patch_size)


# ----------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """Pre-norm transformer block; ``attn`` is :class:`AgentAttention` (with the class token as a
    prefix token) when ``agent_num`` is given, else timm's softmax :class:`Attention` (SDPA)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, agent_num: Optional[int] = None,
                 window: Optional[HW] = None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.is_agent = bool(agent_num)
        if self.is_agent:
            self.attn = AgentAttention(dim, num_heads, agent_num, window=window, qkv_layout="fused", qkv_bias=qkv_bias,
                                       num_prefix_tokens=1, attn_drop=attn_drop, proj_drop=drop)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, hw) if self.is_agent else self.attn(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------ model
class AgentVisionTransformer(ClassifierMixin, nn.Module):
    """Agent-DeiT (official ``VisionTransformer`` of Agent Attention) as a timm model.

    Args:
        img_size: construction size (int or (H, W)); sizes ``pos_embed`` and the agent biases.
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as ViT.
        global_pool: ``"token"`` (class token, official) or ``"avg"`` (mean of patch tokens).
        agent_num: agents per block through the official table (int, ``"49-49-49-49"`` or a list).
        agent_layer: blocks ``i < agent_layer`` use agent attention (``-1``/None: all; 0: a plain
            softmax ViT of otherwise identical architecture).
        drop_rate, attn_drop_rate, drop_path_rate: dropout / stochastic depth (linear over blocks).
    """

    global_pools = ("token", "avg")

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, agent_num: AgentNum = 49,
                 agent_layer: Optional[int] = -1, norm_eps: float = 1e-6, dynamic_img_size: bool = True):
        super().__init__()
        self.init_kwargs = init_kwargs(locals())
        self.dynamic_img_size = check_dynamic_img_size(dynamic_img_size, "Agent-DeiT")
        check_pool(global_pool, self.global_pools)
        if depth <= 0 or embed_dim <= 0 or embed_dim % num_heads:
            raise ValueError(f"invalid depth {depth} / embed_dim {embed_dim} / num_heads {num_heads}")
        agent_layer = depth if agent_layer is None or agent_layer == -1 else int(agent_layer)
        if not 0 <= agent_layer <= depth:
            raise ValueError(f"agent_layer must be -1 or in [0, depth={depth}], got {agent_layer}")
        img_hw = to_2tuple_hw(img_size, "img_size")
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} must be a multiple of patch_size {patch_size}")
        self.num_classes, self.global_pool, self.num_prefix_tokens = num_classes, global_pool, 1
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size, self.img_size, self.agent_layer, self.in_chans = patch_size, img_hw, agent_layer, in_chans
        self.grid: HW = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.grad_checkpointing = False
        norm_layer = lambda d: nn.LayerNorm(d, eps=norm_eps)  # noqa: E731

        # parameters directly on the module first: official state-dict order
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.patch_embed = PatchEmbed(img_hw, patch_size, in_chans, embed_dim, flatten=False, strict_img_size=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.agent_nums = [deit_agent_num(agent_num, i) if i < agent_layer else 0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], agent_num=self.agent_nums[i] or None, window=self.grid,
                  norm_layer=norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # module: the FX tap of the block's map (patch tokens as NCHW); stage: the block
        self.feature_info = [dict(module=f"feature_maps.{i}", num_chs=embed_dim, reduction=patch_size,
                                  stage=f"blocks.{i}") for i in range(depth)]
        self.feature_maps = feature_maps(depth, num_prefix_tokens=1)
        self._init_weights()

    # ----------------------------------------------------------------------------- init / timm API
    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return  # meta device (shape-only build): nothing to initialise
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            init_linear_norm(m)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def resized_state_dict(self, target: "AgentVisionTransformer") -> Dict[str, Tensor]:
        sd = self.state_dict()
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], self.grid, target.grid, num_prefix=1, mode="bicubic")
        return checkpoint_filter_fn(sd, target)

    # ------------------------------------------------------------------------------------- forward
    def grid_size(self, img_hw: Sequence[int]) -> HW:
        """Token grid for an input of size ``img_hw``; ValueError unless a multiple of the patch."""
        return grid_size(img_hw, self.patch_size)

    def _embed(self, x: Tensor) -> Tuple[Tensor, HW]:
        check_image(x, self.in_chans, "Agent-DeiT")
        check_patch_multiple(x, self.patch_size)
        hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + resize_pos_embed(self.pos_embed, self.grid, hw, num_prefix=1, mode="bicubic")
        return self.pos_drop(x), hw

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens ``(B, 1 + H·W, C)`` (class token first)."""
        x, hw = self._embed(x)
        if fx_tracing():  # block by block, with the FX feature tap of each (feature_info[i]["module"])
            for blk, tap in zip(self.blocks, self.feature_maps):
                x = blk(x, hw)
                tap(x, hw)
            return self.norm(x)
        return self.norm(run_blocks(self.blocks, x, hw, self.grad_checkpointing))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm-style intermediate block outputs (NCHW maps or NLC tokens of the patch grid)."""
        check_output_fmt(output_fmt, ("NCHW", "NLC"))
        take, max_index = take_indices(len(self.blocks), indices)
        x, hw = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        outs = []
        for i, blk in enumerate(blocks):
            x = run_blocks((blk,), x, hw, self.grad_checkpointing)
            if i in take:
                outs.append(self.norm(x) if norm else x)
        prefix = [y[:, :1] for y in outs]
        outs = [y[:, 1:] for y in outs]
        if output_fmt == "NCHW":
            outs = [to_nchw(y, hw) for y in outs]
        if return_prefix_tokens:
            outs = list(zip(outs, prefix))
        if intermediates_only:
            return outs
        return self.norm(x), outs

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


# ------------------------------------------------------------------------------ checkpoint loading
def checkpoint_filter_fn(state_dict: Dict, model: AgentVisionTransformer) -> Dict[str, Tensor]:
    """Official / training checkpoint -> this model: unwrap, strip ``module.``, resize ``pos_embed``
    (bicubic) and the row/column agent biases (linear) when the checkpoint's grid differs."""
    out = unwrap_state_dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        if pos.dim() != 3 or pos.shape[-1] != model.pos_embed.shape[-1]:
            raise ValueError(
                f"incompatible checkpoint: pos_embed {tuple(pos.shape)} vs model {tuple(model.pos_embed.shape)}"
            )
        old = infer_square_grid(pos.shape[1] - 1, "pos_embed")
        out["pos_embed"] = resize_pos_embed(pos, old, model.grid, 1, "bicubic")
    return resize_agent_bias_tables(out, model)


# ----------------------------------------------------------------------------------- registration
def _cfg(url: str, **kwargs) -> dict:
    # official eval: square resize to S/0.875, then center crop S
    return default_cfg(first_conv="patch_embed.proj", url=url, crop_mode="squash", **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_deit_tiny": _cfg("https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1"),
    "agent_deit_small": _cfg("https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/?dl=1"),
    "agent_deit_small_448": _cfg("https://cloud.tsinghua.edu.cn/f/a228f86241c445f1969b/?dl=1", size=448),
    "agent_deit_base": _cfg("https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/?dl=1"),
})


def _create_agent_deit(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> AgentVisionTransformer:
    return build(AgentVisionTransformer, variant, pretrained, **{"out_indices": 3, **defaults, **kwargs})


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=[49] * 4)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=[49] * 4)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=[81] * 4, agent_layer=4)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-T (224, 49 agents in all 12 blocks; 6.0M params, ImageNet top-1 74.9)."""
    return _create_agent_deit("agent_deit_tiny", pretrained, _TINY, kwargs)


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S (224, 49 agents; 22.7M params, top-1 80.5)."""
    return _create_agent_deit("agent_deit_small", pretrained, _SMALL, kwargs)


@register_model
def agent_deit_small_448(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S at 448 (28x28 grid; 23.1M params, top-1 83.1)."""
    return _create_agent_deit("agent_deit_small_448", pretrained, dict(_SMALL, img_size=448), kwargs)


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-B (224, 81 agents in blocks 0-3, softmax after; 87.2M params, top-1 82.0)."""
    return _create_agent_deit("agent_deit_base", pretrained, _BASE, kwargs)


register_family(
    __name__, AgentVisionTransformer, checkpoint_filter=checkpoint_filter_fn,
    aliases={"agent_deit_t": "agent_deit_tiny", "agent_deit_s": "agent_deit_small",
             "agent_deit_s_448": "agent_deit_small_448", "agent_deit_b": "agent_deit_base"},
    paper_top1={"agent_deit_tiny": 74.9, "agent_deit_small": 80.5, "agent_deit_small_448": 83.1,
                "agent_deit_base": 82.0},
    test_kwargs=dict(embed_dim=32, depth=5, num_heads=2, agent_num=4),
)
