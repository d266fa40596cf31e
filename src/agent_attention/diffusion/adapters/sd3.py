"""SD3 / SD3.5 (``SD3Transformer2DModel``): MMDiT ``JointTransformerBlock`` s.

Patched: the joint attention ``attn`` of every block and, in SD3.5's dual-attention blocks, the
image-only self-attention ``attn2``.  Only the image tokens are merged or pooled; the text tokens stay
exact: their keys/values join those of the (merged) image tokens for every query and agent, and
their own queries attend exactly over all keys.  The agents are built from the image tokens only.
The token grid is ``(H / p, W / p)`` (positions are added by the patch embedding, no RoPE); the
merge metric is the block's input image tokens (before ``norm1``), shared by ``attn`` and ``attn2``.
"""
from __future__ import annotations

from typing import List

from torch import nn

from .base import Adapter, LayerSpec

__all__ = ["SD3Adapter"]


def _is_joint_block(module: nn.Module) -> bool:
    return any(cls.__name__ == "JointTransformerBlock" for cls in type(module).__mro__)


class SD3Adapter(Adapter):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    tokenwise_attrs = {"mlp": ("ff",)}

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        layers: List[LayerSpec] = []
        blocks = [(name, m) for name, m in model.named_modules() if _is_joint_block(m)]
        for index, (name, block) in enumerate(blocks):
            layers.append(LayerSpec(f"{name}.attn", block.attn, name, index, "joint"))
            if getattr(block, "attn2", None) is not None:
                layers.append(LayerSpec(f"{name}.attn2", block.attn2, name, index, "self"))
        return layers
