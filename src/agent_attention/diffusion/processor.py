"""The AgentSD attention processor for 🤗 diffusers: one class for every adapter.

:class:`AgentSDProcessor` replaces the processor of a patched attention layer through
``Attention.set_processor``.  On each call it asks the layer's adapter which tokens are image tokens
(and text tokens) and on which grid (``adapter.prepare``); with the layer's settings for the current
step it then

1. reduces the image tokens (``core.reduce_tokens``): AgentSD merges them by cosine similarity of
   the **block input** (the official ``compute_merge(x)``, handed over by the block hook; one
   reduction per block call, shared by the block's patched layers) and builds the agents by the
   stronger merge; ToDo pools the keys/values;
2. runs ``core.attention_call``: agent attention for the image queries when there are agents,
   softmax attention otherwise and for the text queries, through diffusers' attention dispatch (so
   ``set_attention_backend`` applies);
3. applies the layer's output projection on the reduced rows and expands them back to every token.

A processor called outside a hooked block (a bare ``Attention``) matches on its own input instead
and counts the call under ``calls["metric=attention input"]``.  Calls the adapter does not handle
(cross-attention, an attention mask, a UNet layer deeper than ``max_downsample``) and layers that
are off at this step go to the layer's original processor unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from .adapters.base import LayerSpec
from .adapters.unet import UNetAdapter, latent_grid
from .core import attention_call, reduce_tokens, sdpa
from .settings import METHODS, AgentSDSettings
from .state import AgentSDState

__all__ = ["AgentSDSettings", "AgentSDState", "AgentSDProcessor", "block_reduction", "latent_grid", "METHODS"]

_BARE = UNetAdapter()


def _dispatch_softmax(backend):
    """Softmax attention on ``(B, heads, S, d)`` through diffusers' dispatcher (``(B, S, heads, d)``)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def softmax(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, backend=backend)
        return out.transpose(1, 2)

    return softmax


class AgentSDProcessor:
    """Diffusers attention processor running AgentSD (token merging + agents), ToDo or ToDo + agents.

    Args:
        state: the shared :class:`AgentSDState` of the denoiser.
        original: the layer's processor before patching; used for the calls AgentSD does not
            handle and restored by ``remove_agentsd``.
        name: the layer's module name.
        level: UNet downsampling factor of the layer (a bare processor without ``layer``).
        layer, adapter: the layer's :class:`~.adapters.base.LayerSpec` and its adapter (default: a
            UNet-style self-attention).
    """

    _attention_backend = None  # set by ``model.set_attention_backend(...)``
    _parallel_config = None

    def __init__(self, state: AgentSDState, original: Any, name: str = "", level: Optional[int] = None,
                 layer: Optional[LayerSpec] = None, adapter: Any = None):
        self.state = state
        self.original = original
        self.name = name if layer is None else layer.name
        self.level = level if layer is None else layer.level
        self.layer = layer
        self.adapter = adapter if adapter is not None else _BARE
        self._attention_backend = getattr(original, "_attention_backend", None)

    def __repr__(self) -> str:
        return f"AgentSDProcessor(name={self.name!r}, adapter={self.adapter.name!r})"

    def _stock(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs) -> Any:
        self.state.calls["stock"] += 1
        if self._attention_backend is not None and hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = self._attention_backend  # set_attention_backend reached only us
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, **kwargs: Any) -> Any:
        state = self.state
        rotary_arg = getattr(self.adapter, "rotary_arg", None)
        if rotary_arg and temb is not None:  # Flux/Wan layers pass their rotary embedding 4th, not a temb
            kwargs[rotary_arg], temb = temb, None
        settings = state.settings_of(self.name)
        layer = self.layer or LayerSpec(self.name, attn, "", 0, "self", self.level)
        call = None
        if settings is not None and temb is None:
            call = self.adapter.prepare(layer, attn, state, hidden_states, encoder_hidden_states, attention_mask, kwargs)
        if call is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)

        fp32 = self.adapter.fp32(attn, settings)
        red = self._reduction(layer, call, settings, fp32)
        scale = self.adapter.scale(attn)
        image, text = attention_call(
            call.x, red, call.image, settings, scale=scale, text=call.text, text_stream=call.text_stream,
            fp32=fp32, softmax=_dispatch_softmax(self._attention_backend) if _has_dispatch() else sdpa,
        )
        state.calls[red.label] += 1
        image = red.expand(self.adapter.project_out(attn, image))
        return self.adapter.finish(layer, attn, call, image, text)

    def _reduction(self, layer: LayerSpec, call, settings: AgentSDSettings, fp32: bool):
        return block_reduction(self.state, layer.block if self.layer is not None else None, call.x, call.grid,
                               settings, fp32)


def block_reduction(state: AgentSDState, block: Optional[str], x: Tensor, grid, settings: AgentSDSettings, fp32: bool):
    """The reduction of the image tokens ``x`` (B, N, C) on ``grid`` in block ``block``: computed once
    per block call (the block hook keeps the block input and the reduction while the block runs),
    matched on the block input, and shared by the block's patched layers and merged sub-layers.
    ``block=None`` (a bare ``Attention`` outside a hooked block) matches on ``x`` itself."""
    if settings.method != "agentsd":  # ToDo pools on the grid: no matching
        return reduce_tokens(settings, grid, x)
    entry = state.block_inputs.get(block) if block is not None else None
    metric = entry[0] if entry is not None else None
    if metric is None or metric.shape[:2] != x.shape[:2]:
        metric, entry = x, None  # called outside a hooked block (a bare Attention layer)
        state.calls["metric=attention input"] += 1
    elif entry[1] is not None and entry[1][0] == settings:
        return entry[1][1]
    use_rand = settings.use_rand and x.shape[0] % 2 == 0
    generator = state.generator(x.device) if use_rand else None
    red = reduce_tokens(settings, grid, metric, generator=generator, fp32=fp32)
    if entry is not None:
        entry[1] = (settings, red)
    return red


_DISPATCH: Optional[bool] = None


def _has_dispatch() -> bool:
    global _DISPATCH
    if _DISPATCH is None:
        try:
            from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: F401
            _DISPATCH = True
        except ImportError:  # pragma: no cover - diffusers below the supported minimum
            _DISPATCH = False
    return _DISPATCH
