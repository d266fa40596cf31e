"""Agent-Swin (Han et al., ECCV 2024): Swin Transformer with agent attention in the early stages.

Official layout and names (``patch_embed``, ``layers.i.blocks.j``, ``layers.i.downsample`` at the
end of stages 0–2, ``norm``, ``head``), so the released checkpoints load with ``strict=True``.
Blocks of a stage marked ``'A'`` in ``attn_type`` run :class:`~agent_attention.layers.AgentAttention`
over the whole stage map; ``'B'`` blocks run (shifted-)window softmax attention; ``'M'`` stages mix
(``'AAMB2'``: the first 2 blocks of stage 3 are agent blocks).

Unlike the official classifier the model accepts any input size, square or not: the image is padded
to the patch size, agent blocks work on the actual map (biases resized), window blocks pad to
multiples of the window (padded keys are masked) and compute their shift mask for that size, and
patch merging pads odd maps.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_function, register_notrace_module
from torch import Tensor, nn

from .._grids import HW, fx_tracing, round_up
from ..layers import AgentAttention, to_2tuple_hw
from ..weights import unwrap_state_dict
from ._config import parse_attn_type, parse_int_list, resolve_norm_layer
from ._model_api import (FeatureMap, HierarchicalMixin, check_dynamic_img_size, check_image, check_pool,
                         init_kwargs, init_linear_norm, merged_hw, opaque_forward, run_blocks, take_indices, to_nchw)
from ._resize import resize_agent_bias, resize_pos_embed, resize_rel_pos_table
from ._windows import (WindowAttention, known_true, pad_to, relative_position_index, same_size, shifted_window_mask,
                       window_padding_mask, window_partition, window_reverse)
from .registry import build, default_cfg, register_family

__all__ = ["AgentSwinTransformer", "WindowAttention", "AgentSwinBlock", "PatchMerging", "checkpoint_filter_fn",
           "relative_position_index", "shifted_window_mask"]

_GEOMETRY_BUFFERS = ("relative_position_index", "attn_mask")
# any FX tracer (torchvision's create_feature_extractor too): these calls of this file are graph leaves
for _name in ("check_image", "opaque_forward", "pad_to", "pad_to_multiple", "absolute_pos_embed"):
    torch.fx.wrap(_name)


@register_notrace_module  # FX: a leaf (window geometry, padding and masks follow the actual map size)
class AgentSwinBlock(nn.Module):
    """Pre-norm Swin block with agent attention (``agent=True``) or (shifted-)window attention."""

    def __init__(self, *, dim: int, input_resolution: HW, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm, agent: bool = False,
                 agent_num: int = 49):
        super().__init__()
        self.dim, self.num_heads, self.agent = dim, num_heads, agent
        self.input_resolution: HW = tuple(input_resolution)
        self.global_attn = False
        self.downstream = False  # official downstream window computation (set_downstream_window)
        if min(self.input_resolution) <= window_size:  # official rule: the window covers the map
            shift_size, window_size = 0, min(self.input_resolution)
            self.global_attn = agent  # agent blocks then attend over the whole (actual) map
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = norm_layer(dim)
        if agent:
            window = self.input_resolution if self.global_attn else (window_size, window_size)
            self.attn = AgentAttention(dim, num_heads, agent_num, window=window, qkv_bias=qkv_bias,
                                       attn_drop=attn_drop, proj_drop=drop)
        else:
            self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        mask = None
        if shift_size > 0:
            H, W = self.input_resolution
            padded = (round_up(H, window_size), round_up(W, window_size))
            mask = shifted_window_mask((H, W), padded, (window_size,) * 2, (shift_size,) * 2)
        self.register_buffer("attn_mask", mask)  # persistent, as in the official checkpoints
        self._mask_cache: Dict[tuple, Optional[Tensor]] = {}

    def set_downstream_window(self, shift: bool) -> bool:
        """Switch a window block to the official downstream computation; True if it now shifts and
        did not before.

        The official downstream block (mmdet / mmseg ``SwinTransformerBlock``) differs from the
        classifier's: the window is never capped at the map, ``shift`` blocks (the odd ones) shift by
        half the window whatever the map size, the normalised map is zero-padded to a multiple of
        the window and the padded tokens take part in attention (no key mask), and the shift mask
        labels the regions of the *padded* map (0 / -100). Written here because no library block
        computes this. Agent blocks are unchanged (they attend over the whole map)."""
        if self.agent:
            return False
        self.downstream = True
        self.attn_mask = None  # computed for the actual map size at run time (not in the downstream layout)
        self._mask_cache.clear()
        changed = bool(shift and not self.shift_size and self.window_size // 2)
        self.shift_size = self.window_size // 2 if shift else 0
        return changed

    def _geometry(self, hw: HW) -> Tuple[HW, HW, HW]:
        """(window, shift, padded size) for an actual map ``hw``.

        The window and shift are the same for every map side ``>= min_export_side()``: exported
        with a dynamic size in that range they are constants of the graph (no size guard)."""
        H, W = hw
        ws, s = self.window_size, self.shift_size
        if self.downstream:  # official downstream: full window and shift at every map size
            return (ws, ws), (s, s), (round_up(H, ws), round_up(W, ws))
        # decided on provable bounds first: under a dynamic export the window and shift stay ints
        win = tuple(ws if known_true(n >= ws) else min(ws, n) for n in hw)
        shift = tuple(s if s and (known_true(n > ws) or (n > w)) else 0 for n, w in zip(hw, win))
        padded = (round_up(H, win[0]), round_up(W, win[1]))
        return win, shift, padded

    def min_export_side(self) -> int:
        """Smallest map side with the block's full window (and its shift): the lower bound of a
        dynamic-size export (1 for a global agent block)."""
        return 1 if self.global_attn else self.window_size + (1 if self.shift_size else 0)

    def _mask(self, hw: HW, win: HW, shift: HW, padded: HW, ref: Tensor) -> Optional[Tensor]:
        if self.attn_mask is not None and same_size(hw, self.input_resolution):
            return self.attn_mask  # the registered buffer: exact official values
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # no caching (see position_bias)
            m = shifted_window_mask(hw, padded, win, shift, device=ref.device)
            return None if m is None else m.to(ref.dtype)
        key = (tuple(hw), ref.device, ref.dtype)
        if key not in self._mask_cache:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            m = shifted_window_mask(hw, padded, win, shift, device=ref.device)
            self._mask_cache[key] = None if m is None else m.to(ref.dtype)
        return self._mask_cache[key]

    def _windowed(self, x: Tensor, hw: HW) -> Tensor:
        B, H, W, C = x.shape
        win, shift, padded = self._geometry(hw)
        x = pad_to(x, padded)  # `padded` itself: one size expression for x and the masks
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, win)
        if self.agent:  # official: the shift mask is ignored by agent attention; padding is masked
            pad = window_padding_mask(hw, padded, win, shift, x.device)
            pad = None if pad is None else pad.repeat(B, 1)
            out = self.attn(windows, win, key_padding_mask=pad)
        else:
            # downstream: the padding is not masked, the shift mask is that of the padded map
            mask_hw = padded if self.downstream else hw
            out = self.attn(windows, win, self._mask(mask_hw, win, shift, padded, x), images=B)
        x = window_reverse(out, win, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        if same_size(padded, (H, W)):
            return x
        # an explicit copy: reshaping the strided slice would branch on B == 1 (a guard under export)
        return x[:, :H, :W].clone(memory_format=torch.contiguous_format)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        if fx_tracing():  # any FX tracer: one opaque call (the geometry follows the map size)
            return opaque_forward(self, x, hw)
        return self.forward_impl(x, hw)

    def forward_impl(self, x: Tensor, hw: HW) -> Tensor:
        H, W = hw
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"AgentSwinBlock: {L} tokens do not match the map size {H}x{W}")
        shortcut = x
        x = self.norm1(x)
        if self.global_attn:
            x = self.attn(x, (H, W))
        else:
            x = self._windowed(x.view(B, H, W, C), (H, W)).reshape(B, L, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


@register_notrace_function  # FX: a leaf (the padding depends on the input size)
def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad an image batch at the bottom/right to a multiple of ``multiple``."""
    ph, pw = round_up(x.shape[2], multiple) - x.shape[2], round_up(x.shape[3], multiple) - x.shape[3]
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


@register_notrace_function  # FX: a leaf (resizes only off the construction grid)
def absolute_pos_embed(pos: Tensor, grid: HW, hw: HW) -> Tensor:
    """The absolute position embedding ``(1, H·W, C)`` of grid ``grid`` for a map ``hw`` (bicubic)."""
    if tuple(hw) == tuple(grid):
        return pos
    pos = to_nchw(pos, grid)
    return F.interpolate(pos, size=hw, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Conv patchify + optional LayerNorm; pads the image at the bottom/right to the patch size."""

    def __init__(self, *, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: Tensor) -> Tuple[Tensor, HW]:
        x = self.proj(pad_to_multiple(x, self.patch_size))
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        return (x if self.norm is None else self.norm(x)), hw


class PatchMerging(nn.Module):
    """2x2 neighbour concat (official order) -> LayerNorm(4C) -> Linear(4C, 2C); odd maps are padded."""

    output_hw = staticmethod(merged_hw)  # grid after this merge

    def __init__(self, *, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        B, L, C = x.shape
        (H, W), (oh, ow) = hw, merged_hw(hw)
        x = pad_to(x.view(B, H, W, C), (2 * oh, 2 * ow))  # odd sides: padded to the merged grid's own size
        # 2x2 neighbours in the official order [(0,0), (1,0), (0,1), (1,1)] (row, col offsets): one reshape
        x = x.view(B, oh, 2, ow, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, oh * ow, 4 * C)
        return self.reduction(self.norm(x))


class AgentSwinStage(nn.Module):
    """One stage (official ``BasicLayer``): blocks, then the optional downsample at its end."""

    def __init__(self, *, dim: int, input_resolution: HW, depth: int, num_heads: int, agent_window: int,
                 window: int, agent_flags: Sequence[bool], agent_num: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float], norm_layer=nn.LayerNorm, downsample: bool = False):
        super().__init__()
        self.dim, self.input_resolution, self.grad_checkpointing = dim, tuple(input_resolution), False
        blocks = []
        for j in range(depth):
            ws = agent_window if agent_flags[j] else window
            blocks.append(AgentSwinBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=ws,
                shift_size=0 if j % 2 == 0 else ws // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                drop=drop, attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer, agent=agent_flags[j],
                agent_num=agent_num))
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(dim=dim, norm_layer=norm_layer) if downsample else None
        self.feature_map = FeatureMap()  # the FX tap of the stage's map, before the merge (no parameters)

    def set_downstream_windows(self) -> int:
        """Official downstream window blocks, odd ones shifted; returns how many started shifting."""
        return sum(blk.set_downstream_window(shift=j % 2 == 1) for j, blk in enumerate(self.blocks))

    def forward_blocks(self, x: Tensor, hw: HW) -> Tensor:
        return run_blocks(self.blocks, x, hw, self.grad_checkpointing)

    def output_hw(self, hw: HW) -> HW:
        return hw if self.downsample is None else self.downsample.output_hw(hw)

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        x = self.forward_blocks(x, hw)
        if fx_tracing():  # FX: the stage's map (feature_info "module"), which the merge below replaces
            self.feature_map(x, hw)
        return x if self.downsample is None else self.downsample(x, hw)


class AgentSwinTransformer(HierarchicalMixin, nn.Module):
    """Agent-Swin classifier; defaults are Agent-Swin-T at 224.

    ``window_size`` is the window of agent blocks (``None``: the patch grid, i.e. global agent
    attention, as every released config); window blocks use ``max(7, window_size // 8)``.
    ``agent_num``: one int, or one int/str per stage. ``attn_type``: see the module docstring.
    Other arguments follow the official class (``qk_scale`` applies to window blocks only;
    ``use_checkpoint`` = :meth:`set_grad_checkpointing`).
    """

    #: official downstream agent grids (``downstream_agent_shapes`` of the mmdet / mmseg configs)
    downstream_agent_shapes = ((9, 9), (12, 12), (14, 14), (7, 7))
    #: the official downstream Swin adds a LayerNorm on each stage output
    downstream_output_norms = True

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Optional[int] = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, norm_layer=None, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, agent_num=(9, 16, 49, 49), attn_type: str = "AAAB",
                 dynamic_img_size: bool = True):
        super().__init__()
        self.init_kwargs = init_kwargs(locals())
        self.dynamic_img_size = check_dynamic_img_size(dynamic_img_size, "Agent-Swin")
        norm_layer = resolve_norm_layer(norm_layer)
        depths, n = list(depths), len(depths)
        num_heads = parse_int_list(num_heads, n, "num_heads")
        agent_nums = parse_int_list(agent_num, n, "agent_num")
        plan = parse_attn_type(attn_type, depths)
        H, W = to_2tuple_hw(img_size, "img_size")
        grid = (round_up(H, patch_size) // patch_size, round_up(W, patch_size) // patch_size)
        window_size = window_size or max(grid)
        self.num_classes, self.global_pool, self.num_layers = num_classes, check_pool(global_pool), n
        self.embed_dim, self.patch_size, self.in_chans, self.ape = embed_dim, patch_size, in_chans, ape
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (n - 1))
        self.mlp_ratio, self.output_fmt = mlp_ratio, "NHWC"
        self.patches_resolution = grid

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info: List[dict] = []
        res = grid
        for i in range(n):
            dim = int(embed_dim * 2 ** i)
            self.layers.append(AgentSwinStage(
                dim=dim, input_resolution=res, depth=depths[i], num_heads=num_heads[i], agent_window=window_size,
                window=max(7, window_size // 8), agent_flags=plan[i], agent_num=agent_nums[i], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])], norm_layer=norm_layer, downsample=i < n - 1))
            # module: the FX tap of the stage's map (before its merge); stage: the module holding its blocks
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}.feature_map",
                                          stage=f"layers.{i}"))
            res = merged_hw(res)
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_norm)
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay (downsample at the end of its stage)."""
        if coarse:
            return dict(stem=r"^absolute_pos_embed|^patch_embed", blocks=r"^layers\.(\d+)")
        return dict(stem=r"^absolute_pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (99999,)),
                            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    export_size_oblivious = True  # see models.export: window counts per stage may be 1 or more

    def resized_state_dict(self, target: "AgentSwinTransformer") -> Dict[str, Tensor]:
        sd = self.state_dict()
        if self.ape:
            sd["absolute_pos_embed"] = resize_pos_embed(sd["absolute_pos_embed"], self.patches_resolution,
                                                        target.patches_resolution, 0, mode="bicubic")
        return checkpoint_filter_fn(sd, target)

    def export_min_size(self) -> int:
        """Smallest input side (pixels) of a dynamic-size export: every window block of every stage
        has its full window (and shift) from there up; smaller inputs take another graph (static)."""
        return max(max(blk.min_export_side() for blk in layer.blocks) * self.patch_size * 2 ** i
                   for i, layer in enumerate(self.layers))

    @torch.jit.ignore
    def set_downstream_windows(self) -> int:
        """Official downstream Swin (the mmdet / mmseg backbone): every window block computes as the
        official downstream block (see :meth:`AgentSwinBlock.set_downstream_window`), odd ones
        shifted; returns how many blocks started shifting."""
        return sum(layer.set_downstream_windows() for layer in self.layers)

    def _embed(self, x: Tensor) -> Tuple[Tensor, HW]:
        check_image(x, self.in_chans, type(self).__name__)
        x, hw = self.patch_embed(x)
        if self.ape:
            x = x + absolute_pos_embed(self.absolute_pos_embed, self.patches_resolution, hw)
        return self.pos_drop(x), hw

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-normed features ``(B, H/32, W/32, C)`` (NHWC, like timm's Swin)."""
        x, hw = self._embed(x)
        for layer in self.layers:
            x = layer(x, hw)
            hw = layer.output_hw(hw)
        x = self.norm(x)
        return x.view(x.shape[0], hw[0], hw[1], -1)

    def _merge_stage_pairs(self) -> List[Tuple[Optional[nn.Module], Callable[[Tensor, HW], Tensor]]]:
        """Per stage: the previous stage's closing merge (``None`` for the first) and its blocks."""
        return [(self.layers[i - 1].downsample if i > 0 else None, layer.forward_blocks)
                for i, layer in enumerate(self.layers)]

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = take_indices(len(self.layers), indices)
        num_stages = len(self.layers)
        self.layers = self.layers[: max_index + 1]
        if self._prune_tail(max_index, num_stages, prune_norm, prune_head):
            self.layers[-1].downsample = None
        return take


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: AgentSwinTransformer) -> Dict[str, Tensor]:
    """Official (or our) checkpoint -> state dict for ``model``.

    Unwraps ``model``/``model_ema``/``state_dict_ema``/``state_dict`` and ``module.``; replaces the
    geometry buffers (``relative_position_index``, ``attn_mask``) by the model's own, present or not;
    resizes row/column agent biases (linear) and relative position tables (bicubic) to the model.
    """
    own = model.state_dict()
    out = {}
    for k, v in unwrap_state_dict(state_dict).items():
        if k.endswith(_GEOMETRY_BUFFERS):
            continue
        if k in own:
            if k.endswith("relative_position_bias_table"):
                v = resize_rel_pos_table(v, own[k].shape)
            else:
                v = resize_agent_bias(k, v, own[k])
        out[k] = v
    out.update({k: v for k, v in own.items() if k.endswith(_GEOMETRY_BUFFERS)})
    return out


def _cfg(url: str, size: int = 224, **kwargs) -> dict:
    return default_cfg(first_conv="patch_embed.proj", url=url, size=size,
                       pool_size=(size // 32, size // 32), **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_swin_tiny": _cfg("https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/?dl=1"),
    "agent_swin_small": _cfg("https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1"),
    "agent_swin_small_288": _cfg("https://cloud.tsinghua.edu.cn/f/09760394e93b4046a25e/?dl=1", 288, crop_pct=1.0),  # no crop
    "agent_swin_base": _cfg("https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/?dl=1"),
    "agent_swin_base_384": _cfg("https://cloud.tsinghua.edu.cn/f/bb84ee9058954706a557/?dl=1", 384, crop_pct=1.0),
})

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), agent_num=(9, 16, 49, 49), attn_type="AAAB")
_S = dict(_T, depths=(2, 2, 18, 2), attn_type="AABB")
_B = dict(_S, embed_dim=128, num_heads=(4, 8, 16, 32), attn_type="AAMB2")


def _create_agent_swin(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> AgentSwinTransformer:
    return build(AgentSwinTransformer, variant, pretrained, **{**defaults, **kwargs})


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T 224 (82.6% top-1)."""
    return _create_agent_swin("agent_swin_tiny", pretrained, dict(_T, drop_path_rate=0.2), kwargs)


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S 224 (83.7%)."""
    return _create_agent_swin("agent_swin_small", pretrained, dict(_S, drop_path_rate=0.3), kwargs)


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S 288 (84.1%), evaluated without crop."""
    return _create_agent_swin("agent_swin_small_288", pretrained, dict(_S, img_size=288, drop_path_rate=0.3), kwargs)


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B 224 (84.0%)."""
    return _create_agent_swin("agent_swin_base", pretrained, dict(_B, drop_path_rate=0.5), kwargs)


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B 384 (84.9%), evaluated without crop."""
    return _create_agent_swin("agent_swin_base_384", pretrained, dict(_B, img_size=384, drop_path_rate=0.5), kwargs)


register_family(
    __name__, AgentSwinTransformer, checkpoint_filter=checkpoint_filter_fn,
    aliases={"agent_swin_t": "agent_swin_tiny", "agent_swin_s": "agent_swin_small",
             "agent_swin_s_288": "agent_swin_small_288", "agent_swin_b": "agent_swin_base",
             "agent_swin_b_384": "agent_swin_base_384"},
    paper_top1={"agent_swin_tiny": 82.6, "agent_swin_small": 83.7, "agent_swin_small_288": 84.1,
                "agent_swin_base": 84.0, "agent_swin_base_384": 84.9},
    test_kwargs=dict(embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), agent_num=[4, 9, 4, 4]),
)
