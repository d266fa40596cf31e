"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``): a DiT of ``BasicTransformerBlock`` s on the
patch grid.

Patched: ``attn1`` of every block (self-attention over the image tokens; the text enters through the
cross-attention ``attn2``, which keeps its processor).  The token grid is the latent cut in
``patch_size`` patches, ``(H / p, W / p)``; positions are added once by the patch embedding (no RoPE).
The merge metric is the block input (before ``norm1``), as on the UNet.
"""
from __future__ import annotations

from typing import List

from torch import nn

from .base import Adapter, LayerSpec
from .unet import basic_block_self_attention

__all__ = ["PixArtAdapter"]


class PixArtAdapter(Adapter):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    tokenwise_attrs = {"crossattn": ("attn2",), "mlp": ("ff",)}

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        return basic_block_self_attention(model)
