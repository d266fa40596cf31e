"""Wan 2.x (``WanTransformer3DModel``): video DiT blocks on a 3-D ``T × H × W`` token grid, with 3-D
rotary position embeddings.

* **Layers.** The self-attention ``attn1`` of every ``WanTransformerBlock`` (image tokens only);
  the cross-attention ``attn2`` to the text (and, for image-to-video, the image embedding) keeps
  its processor.
* **Grid.** The latent ``(B, C, T, H, W)`` cut in ``patch_size = (pt, ph, pw)`` patches:
  ``(T / pt, H / ph, W / pw)``, tokens in ``t, h, w`` order.  Merging uses ``st × sy × sx`` cells
  (``st`` = 1 by default: cells within a frame) and the agents are 3-D cells of the same grid.
* **Projections and norms** as diffusers' ``WanAttnProcessor``: ``to_q/to_k/to_v``, then
  ``norm_q/norm_k`` over all heads together (``rms_norm_across_heads``), then the heads.
* **RoPE.** ``rotary_emb = (cos, sin)`` of shape ``(1, N, 1, d)``, applied to interleaved pairs
  (``x[0::2], x[1::2]``) as diffusers' Wan processor does (re-stated in :func:`wan_rope`, which
  diffusers defines inside its processor).  As for Flux, every token is rotated first and then
  merged, so **the agents are pooled from the rotated queries** (after RoPE).
* The merge metric is the block's input tokens (before ``norm1``).  Scale ``head_dim ** -0.5``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core import Stream
from .base import Adapter, Call, LayerSpec

__all__ = ["WanAdapter", "wan_rope"]


def wan_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotation of interleaved pairs on ``t`` ``(B, heads, S, d)`` with ``cos``/``sin``
    broadcastable to it (the same arithmetic as diffusers' ``WanAttnProcessor``)."""
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(t)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(t)


def _across_heads(norm: nn.Module, heads: int):
    """A norm over all heads together, applied to ``(B, heads, S, d)``."""
    return lambda t: norm(t.transpose(1, 2).flatten(2)).unflatten(-1, (heads, -1)).transpose(1, 2)


class WanAdapter(Adapter):
    name = "wan"
    classes = ("WanTransformer3DModel",)
    tokenwise_attrs = {"crossattn": ("attn2",), "mlp": ("ffn",)}
    denoiser_attrs = ("transformer", "transformer_2")  # Wan 2.2 has a second (low-noise) expert
    rotary_arg = "rotary_emb"  # the 4th positional argument of the layer's processor

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        blocks = [(n, m) for n, m in model.named_modules() if any(c.__name__ == "WanTransformerBlock" for c in type(m).__mro__)]
        return [LayerSpec(f"{name}.attn1", block.attn1, name, i, "self") for i, (name, block) in enumerate(blocks)]

    def grid(self, model: nn.Module, sample: Tensor, bound) -> Optional[Tuple[int, ...]]:
        if sample.ndim != 5:
            return None
        pt, ph, pw = (int(p) for p in model.config.patch_size)
        return (int(sample.shape[2]) // pt, int(sample.shape[3]) // ph, int(sample.shape[4]) // pw)

    def prepare(self, layer: LayerSpec, attn: nn.Module, state, hidden_states: Tensor,
                encoder_hidden_states: Optional[Tensor], attention_mask: Optional[Tensor], kwargs: dict) -> Optional[Call]:
        if (attention_mask is not None or encoder_hidden_states is not None or set(kwargs) - {self.rotary_arg}
                or hidden_states.ndim != 3 or getattr(attn, "add_k_proj", None) is not None):
            return None
        grid = self.token_grid(layer, state, hidden_states.shape[1])
        heads = attn.heads
        stream = Stream(attn.to_q, attn.to_k, attn.to_v, heads, _across_heads(attn.norm_q, heads),
                        _across_heads(attn.norm_k, heads))
        freqs = kwargs.get(self.rotary_arg)
        if freqs is not None:
            cos, sin = (f.transpose(1, 2) for f in freqs)  # (1, N, 1, d) -> (1, 1, N, d)
            stream.rotary = lambda t: wan_rope(t, cos, sin)
        return Call(hidden_states, grid, stream)

    def scale(self, attn: nn.Module) -> float:
        return float(attn.to_q.out_features // attn.heads) ** -0.5
