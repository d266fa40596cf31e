"""SD 1.x / 2.x / SDXL UNets (``UNet2DConditionModel``): the paper's setting.

Patched: the self-attention ``attn1`` of every ``BasicTransformerBlock`` (not an ``only_cross_attention``
one) at the selected resolutions: ``max_downsample`` (``None``: the highest-resolution level that has
self-attention: 1 for SD 1.x/2.x, 2 for SDXL).  The token grid of a layer is the latent halved
(rounding up, as the stride-2 convolutions do) until its size matches the layer's token count; a
call whose tokens match no level at or above ``max_downsample`` keeps the stock attention.  The
merge metric is the block input ``x`` (before ``norm1``), the official ``compute_merge(x)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..core import Stream
from .base import Adapter, Call, LayerSpec

__all__ = ["UNetAdapter", "latent_grid", "block_levels"]


def latent_grid(num_tokens: int, latent_hw: Tuple[int, int], max_levels: int = 8) -> Optional[Tuple[int, int, int]]:
    """``(downsample, h, w)`` of a feature map with ``num_tokens`` tokens in a UNet whose latent is
    ``latent_hw``: the latent halved (rounding up, as stride-2 convolutions do) until the token count
    matches; ``None`` if no level matches."""
    h, w = latent_hw
    downsample = 1
    for _ in range(max_levels + 1):
        if h * w == num_tokens:
            return downsample, h, w
        if h * w < num_tokens:
            return None
        h, w, downsample = -(-h // 2), -(-w // 2), downsample * 2
    return None


def block_levels(unet: nn.Module) -> Dict[int, int]:
    """``id(module) -> downsampling factor`` for the modules of a UNet2DConditionModel-like UNet
    (``down_blocks`` / ``mid_block`` / ``up_blocks``, each down block but the last halving the map
    at its end, each up block but the last doubling it)."""
    levels: Dict[int, int] = {}
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        return levels
    factor = 1
    for block in unet.down_blocks:
        levels.update((id(m), factor) for m in block.modules())
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        levels.update((id(m), factor) for m in unet.mid_block.modules())
    for block in unet.up_blocks:
        levels.update((id(m), factor) for m in block.modules())
        if getattr(block, "upsamplers", None) is not None:
            factor = max(1, factor // 2)
    return levels


def _is_basic_block(module: nn.Module) -> bool:
    return any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__)


def basic_block_self_attention(model: nn.Module, levels: Optional[Dict[int, int]] = None) -> List[LayerSpec]:
    """The ``attn1`` of every ``BasicTransformerBlock`` that is a self-attention, in model order."""
    layers: List[LayerSpec] = []
    for name, module in model.named_modules():
        if not _is_basic_block(module):
            continue
        attn = getattr(module, "attn1", None)
        if attn is None or getattr(attn, "is_cross_attention", False) or not hasattr(attn, "set_processor"):
            continue
        level = None if levels is None else levels.get(id(attn))
        layers.append(LayerSpec(f"{name}.attn1" if name else "attn1", attn, name, len(layers), "self", level))
    return layers


class UNetAdapter(Adapter):
    name = "unet"
    classes = ("UNet2DConditionModel",)
    tokenwise_attrs = {"crossattn": ("attn2",), "mlp": ("ff",)}
    denoiser_attrs = ("unet",)
    sample_arg = "sample"

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        return basic_block_self_attention(model, block_levels(model))

    def grid(self, model, sample, bound):
        return None  # per layer, from the latent size and the layer's token count

    @staticmethod
    def max_downsample(settings, levels) -> int:
        """``settings.max_downsample`` resolved against the patched layers' levels."""
        known = sorted({lvl for lvl in levels if lvl is not None})
        if settings.max_downsample is None:
            return known[0] if known else 1
        if known and settings.max_downsample < known[0]:
            raise ValueError(
                f"AgentSD: max_downsample={settings.max_downsample} selects no self-attention layer; this UNet "
                f"has self-attention at downsampling {known} (use max_downsample=None for the highest resolution)")
        return settings.max_downsample

    def selects(self, layer: LayerSpec, settings, layers: List[LayerSpec]) -> bool:
        return layer.level is None or layer.level <= self.max_downsample(settings, [s.level for s in layers])

    def prepare(self, layer, attn, state, hidden_states, encoder_hidden_states, attention_mask, kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or kwargs or state.latent_hw is None:
            return None
        n = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        found = latent_grid(n, state.latent_hw)
        settings = state.settings_of(layer.name)
        levels = state.known_levels or [state.max_downsample]  # (a bare processor: its state's value)
        if found is None or found[0] > self.max_downsample(settings, levels):
            return None
        if attn.spatial_norm is not None:  # (never in a BasicTransformerBlock: it needs temb)
            return None
        extra = {"residual": hidden_states, "shape": None}
        if hidden_states.ndim == 4:
            extra["shape"] = hidden_states.shape
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return Call(hidden_states, found[1:], self.image_stream(attn), extra=extra)

    def image_stream(self, attn: nn.Module) -> Stream:
        return Stream(attn.to_q, attn.to_k, attn.to_v, attn.heads, attn.norm_q, attn.norm_k)

    def finish(self, layer, attn, call: Call, image: Tensor, text) -> Tensor:
        shape = call.extra["shape"]
        if shape is not None:
            image = image.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            image = image + call.extra["residual"]
        if attn.rescale_output_factor != 1.0:
            image = image / attn.rescale_output_factor
        return image
