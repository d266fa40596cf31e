"""What an adapter tells AgentSD about one family of denoisers.

An adapter is a small object with the model knowledge of one family, used by the model-independent
core (``core.py``), the hooks (``hooks.py``) and the processor (``processor.py``):

* ``classes`` / ``denoiser_attrs``: the denoiser classes it handles and where a pipeline keeps them;
* :meth:`layers`: the attention layers to patch, in model order, each with the block whose input
  decides the merge (:class:`LayerSpec`);
* :meth:`observe`: the token grid of a denoiser call (latent size, ``patch_size``, frames ...) and
  its timestep;
* :meth:`tokenwise`: the sub-layers of a block that act token by token on its image tokens
  (cross-attention, feed-forward), which ``merge_crossattn`` / ``merge_mlp`` run on merged rows;
* :meth:`prepare` / :meth:`finish`: which tokens of an attention call are image tokens (and text
  tokens), the :class:`~..core.Stream` s that call the layer's own projections, norms and position
  encoding, and how the outputs leave the layer.

The defaults here serve diffusers' ``Attention`` layers (``to_q/to_k/to_v``, ``norm_q/norm_k``,
``add_q_proj/add_k_proj/add_v_proj``, ``norm_added_q/norm_added_k``, ``to_out``, ``to_add_out``) on
a fixed patch grid; a family overrides what differs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..core import Stream, grid_numel

__all__ = ["Adapter", "LayerSpec", "Call", "TokenwiseSpec"]


@dataclass
class LayerSpec:
    """One patched attention layer: its module name, the module, the name of the block whose input
    is the merge metric, the block's index for schedules, ``kind`` (``"self"``: image tokens only,
    ``"joint"``: image + text tokens) and, for UNets, the downsampling level."""

    name: str
    attn: nn.Module
    block: str
    index: int
    kind: str = "self"
    level: Optional[int] = None


@dataclass
class TokenwiseSpec:
    """A sub-layer of a block that acts token by token on the block's image tokens: its module name,
    the module, the block's name and ``kind`` (``"crossattn"`` or ``"mlp"``: the setting
    ``merge_<kind>`` turns it on)."""

    name: str
    module: nn.Module
    block: str
    kind: str


@dataclass
class Call:
    """One attention call as the core sees it: image tokens ``x`` (B, N, C) on ``grid``, text tokens
    (or ``None``), the streams, and what :meth:`Adapter.finish` needs to rebuild the output."""

    x: Tensor
    grid: Tuple[int, ...]
    image: Stream
    text: Optional[Tensor] = None
    text_stream: Optional[Stream] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _module_class_names(model: Any) -> List[str]:
    return [c.__name__ for c in type(model).__mro__]


class Adapter:
    """Base adapter; see the module docstring.  Subclasses set ``name`` and ``classes``."""

    name: str = ""
    classes: Tuple[str, ...] = ()
    denoiser_attrs: Tuple[str, ...] = ("transformer",)
    sample_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    #: name of the layer processor's 4th positional argument when it is not ``temb`` (Flux passes its
    #: ``image_rotary_emb`` there, Wan its ``rotary_emb``); the processor hands it to :meth:`prepare` in ``kwargs``
    rotary_arg: Optional[str] = None

    # ------------------------------------------------------------- the denoiser
    def matches(self, model: Any) -> bool:
        return any(name in self.classes for name in _module_class_names(model))

    def layers(self, model: nn.Module) -> List[LayerSpec]:
        raise NotImplementedError

    #: ``kind -> block attributes`` of the token-wise sub-layers (see :meth:`tokenwise`)
    tokenwise_attrs: Dict[str, Tuple[str, ...]] = {}

    def tokenwise(self, block_name: str, block: nn.Module) -> List[TokenwiseSpec]:
        """The token-wise sub-layers of ``block`` (``tokenwise_attrs``; a cross-attention only if it
        is one)."""
        found = []
        for kind, attrs in self.tokenwise_attrs.items():
            for attr in attrs:
                module = getattr(block, attr, None)
                if not isinstance(module, nn.Module):
                    continue
                if kind == "crossattn" and not getattr(module, "is_cross_attention", True):
                    continue
                found.append(TokenwiseSpec(f"{block_name}.{attr}" if block_name else attr, module, block_name, kind))
        return found

    def selects(self, layer: LayerSpec, settings, layers: List[LayerSpec]) -> bool:
        """Whether ``settings`` may run on ``layer`` (UNets: its resolution level)."""
        return True

    def _bind(self, model: nn.Module, args: tuple, kwargs: dict) -> Dict[str, Any]:
        signatures = self.__dict__.setdefault("_signatures", {})  # per class: adapters are shared
        sig = signatures.get(type(model))
        if sig is None:
            sig = signatures[type(model)] = inspect.signature(type(model).forward)
        try:
            return sig.bind_partial(model, *args, **kwargs).arguments
        except TypeError:
            return dict(kwargs)

    def observe(self, model: nn.Module, args: tuple, kwargs: dict, state) -> Any:
        """Record the token grid of this denoiser call on ``state``; return its timestep."""
        bound = self._bind(model, args, kwargs)
        sample = bound.get(self.sample_arg)
        if isinstance(sample, Tensor):
            state.latent_hw = tuple(int(s) for s in sample.shape[-2:])
            state.grid = self.grid(model, sample, bound)
        return bound.get(self.timestep_arg)

    def grid(self, model: nn.Module, sample: Tensor, bound: Dict[str, Any]) -> Optional[Tuple[int, ...]]:
        """The image token grid of a ``(B, C, H, W)`` latent cut in ``patch_size`` patches."""
        p = int(getattr(model.config, "patch_size", 1) or 1)
        return (int(sample.shape[-2]) // p, int(sample.shape[-1]) // p)

    def block_input(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """The block's input image tokens (the merge metric): its first argument."""
        x = args[0] if args else kwargs.get("hidden_states")
        return x if isinstance(x, Tensor) else None

    # ------------------------------------------------------------- one attention call
    def prepare(self, layer: LayerSpec, attn: nn.Module, state, hidden_states: Tensor,
                encoder_hidden_states: Optional[Tensor], attention_mask: Optional[Tensor],
                kwargs: dict) -> Optional[Call]:
        """The :class:`Call` of this attention call, or ``None`` to hand it to the stock processor."""
        if attention_mask is not None or kwargs or hidden_states.ndim != 3:
            return None
        grid = self.token_grid(layer, state, hidden_states.shape[1])
        if layer.kind == "joint":
            if encoder_hidden_states is None:
                return None
            return Call(hidden_states, grid, self.image_stream(attn), encoder_hidden_states, self.text_stream(attn))
        if encoder_hidden_states is not None:
            return None
        return Call(hidden_states, grid, self.image_stream(attn))

    def token_grid(self, layer: LayerSpec, state, num_tokens: int) -> Tuple[int, ...]:
        """The grid of ``num_tokens`` image tokens: the denoiser call's grid (a mismatch is an error,
        never a silent fallback)."""
        grid = state.grid
        if grid is None or grid_numel(grid) != num_tokens:
            raise RuntimeError(
                f"AgentSD ({self.name}): {layer.name} received {num_tokens} image tokens, but the denoiser's "
                f"token grid is {grid}; the {self.name} adapter does not know this model's layout")
        return grid

    def image_stream(self, attn: nn.Module) -> Stream:
        return Stream(attn.to_q, attn.to_k, attn.to_v, attn.heads, attn.norm_q, attn.norm_k)

    def text_stream(self, attn: nn.Module) -> Stream:
        return Stream(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.heads,
                      getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None))

    def scale(self, attn: nn.Module) -> float:
        """The softmax scale of the layer."""
        return float(attn.scale)

    def fp32(self, attn: nn.Module, settings) -> bool:
        precision = settings.attn_precision
        return precision == "fp32" or (precision is None and bool(getattr(attn, "upcast_attention", False)))

    def project_out(self, attn: nn.Module, image_rows: Tensor) -> Tensor:
        """The layer's output projection, applied to the reduced image rows (it acts token by token)."""
        return attn.to_out[1](attn.to_out[0](image_rows))

    def finish(self, layer: LayerSpec, attn: nn.Module, call: Call, image: Tensor, text: Optional[Tensor]) -> Any:
        """The value the layer returns, from the expanded image output and the text rows."""
        if call.text is None:
            return image
        if not getattr(attn, "context_pre_only", False):
            text = attn.to_add_out(text)
        return image, text
