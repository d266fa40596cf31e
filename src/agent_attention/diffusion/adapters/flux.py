"""FLUX.1 (``FluxTransformer2DModel``): double-stream ``FluxTransformerBlock`` s and single-stream
``FluxSingleTransformerBlock`` s, with rotary position embeddings (RoPE).

* **Tokens.** The latent is packed in 2×2 patches, one image token each; the token grid ``(h, w)``
  comes from the denoiser's ``img_ids`` (``[0, row, col]`` per token).  Text tokens (T5) stay exact:
  their keys/values serve every image query and agent, their own queries attend exactly.
* **Double-stream blocks** (``attn``, kind ``"joint"``): image tokens through ``to_q/to_k/to_v`` and
  ``norm_q/norm_k``, text tokens through ``add_q_proj...`` and ``norm_added_q/k``; outputs through
  ``to_out`` and ``to_add_out``, as diffusers' ``FluxAttnProcessor``.
* **Single-stream blocks** (``attn``, kind ``"single"``): the layer receives ``[text; image]`` tokens
  (text first) projected by the same ``to_q/to_k/to_v``; it has no output projection (the block's
  ``proj_out`` follows), so the output is ``[text; image]`` rows again.
* **RoPE.** ``image_rotary_emb`` holds ``(cos, sin)`` for ``[text; image]`` positions; each stream gets
  its own rows.  Every token is projected, normalised and rotated first, and only then merged (the
  core does that when a stream has ``rotary``): queries, keys and values of a merged token are means
  of *rotated* ones, and **the agents are pooled from the rotated image queries** (after RoPE).  An
  agent then carries the mean phase of its cell, which is what the stock attention's queries of that
  cell look like; pooling before RoPE would need one position per agent, which a cell does not have.
* The merge metric is the block's input image tokens (before its norm).  Scale ``head_dim ** -0.5``.
* ``merge_mlp``: the double-stream blocks' image ``ff``.  The single-stream blocks stay unmerged: their
  MLP input projection feeds the same output projection as the attention, on every row, so merging
  it alone costs a 12288-wide unmerge and was measured slower (FLUX.1 width, 2048², CPU).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core import Stream, grid_numel
from .base import Adapter, Call, LayerSpec, TokenwiseSpec

__all__ = ["FluxAdapter", "rope_rows"]


def _is(module: nn.Module, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(module).__mro__)


def rope_rows(freqs: Any, rows: slice):
    """A rotary function on ``(B, heads, S, d)`` for rows ``rows`` of diffusers' ``(cos, sin)`` of
    shape ``(S_all, d)`` (diffusers' ``apply_rotary_emb``, real form, sequence dim 2)."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = freqs
    part = (cos[rows], sin[rows])
    return lambda t: apply_rotary_emb(t, part, sequence_dim=2)


class FluxAdapter(Adapter):
    name = "flux"
    classes = ("FluxTransformer2DModel",)
    rotary_arg = "image_rotary_emb"  # the 4th positional argument of the layer's processor

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        layers: List[LayerSpec] = []
        index = 0
        for name, module in model.named_modules():
            if _is(module, "FluxTransformerBlock"):
                layers.append(LayerSpec(f"{name}.attn", module.attn, name, index, "joint"))
                index += 1
            elif _is(module, "FluxSingleTransformerBlock"):
                layers.append(LayerSpec(f"{name}.attn", module.attn, name, index, "single"))
                index += 1
        return layers

    def tokenwise(self, block_name: str, block: nn.Module) -> List[TokenwiseSpec]:
        if _is(block, "FluxSingleTransformerBlock"):  # see the module docstring
            return []
        return [TokenwiseSpec(f"{block_name}.ff", block.ff, block_name, "mlp")]

    def grid(self, model: nn.Module, sample: Tensor, bound) -> Optional[Tuple[int, ...]]:
        ids = bound.get("img_ids")
        if not isinstance(ids, Tensor) or ids.shape[-1] != 3:
            return None
        ids = ids.reshape(-1, 3)
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return (h, w) if h * w == ids.shape[0] == sample.shape[-2] else None

    def observe(self, model: nn.Module, args: tuple, kwargs: dict, state) -> Any:
        bound = self._bind(model, args, kwargs)
        sample = bound.get(self.sample_arg)
        if isinstance(sample, Tensor):
            state.grid = self.grid(model, sample, bound)
            state.latent_hw = None if state.grid is None else (2 * state.grid[0], 2 * state.grid[1])
        return bound.get(self.timestep_arg)

    def block_input(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        x = args[0] if args else kwargs.get("hidden_states")
        return x if isinstance(x, Tensor) else None

    def prepare(self, layer: LayerSpec, attn: nn.Module, state, hidden_states: Tensor,
                encoder_hidden_states: Optional[Tensor], attention_mask: Optional[Tensor], kwargs: dict) -> Optional[Call]:
        freqs = kwargs.get(self.rotary_arg)
        if attention_mask is not None or set(kwargs) - {self.rotary_arg} or hidden_states.ndim != 3:
            return None
        if state.grid is None:  # img_ids that are not one full (h, w) grid (e.g. extra reference-image tokens)
            self.token_grid(layer, state, hidden_states.shape[1])  # raises, naming the layer
        n = grid_numel(state.grid)
        if layer.kind == "joint":
            if encoder_hidden_states is None:
                return None
            grid = self.token_grid(layer, state, hidden_states.shape[1])
            t = encoder_hidden_states.shape[1]
            image, text = hidden_states, encoder_hidden_states
            text_stream = Stream(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.heads,
                                 attn.norm_added_q, attn.norm_added_k)
        else:
            t = hidden_states.shape[1] - n
            if encoder_hidden_states is not None or t < 0:
                return None
            grid = self.token_grid(layer, state, n)
            text, image = hidden_states[:, :t], hidden_states[:, t:]
            text_stream = Stream(attn.to_q, attn.to_k, attn.to_v, attn.heads, attn.norm_q, attn.norm_k)
        image_stream = Stream(attn.to_q, attn.to_k, attn.to_v, attn.heads, attn.norm_q, attn.norm_k)
        if freqs is not None:  # [text; image] positions
            image_stream.rotary = rope_rows(freqs, slice(t, t + n))
            text_stream.rotary = rope_rows(freqs, slice(0, t))
        if t == 0:
            text = text_stream = None
        return Call(image, grid, image_stream, text, text_stream, extra={"text_tokens": t})

    def scale(self, attn: nn.Module) -> float:
        return float(attn.head_dim) ** -0.5

    def project_out(self, attn: nn.Module, image_rows: Tensor) -> Tensor:
        if getattr(attn, "pre_only", False):  # single-stream: the block's proj_out follows
            return image_rows
        return attn.to_out[1](attn.to_out[0](image_rows))

    def finish(self, layer: LayerSpec, attn: nn.Module, call: Call, image: Tensor, text: Optional[Tensor]) -> Any:
        if layer.kind == "single":
            return image if text is None else torch.cat([text, image], dim=1)
        return image, attn.to_add_out(text)
