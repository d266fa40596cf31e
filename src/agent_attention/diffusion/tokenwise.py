"""``merge_crossattn`` / ``merge_mlp``: a block's token-wise sub-layers on the merged rows.

A transformer block's cross-attention (each image query attends to the text on its own) and its
feed-forward act token by token, so they can run on the ``N - r`` merged rows of the block's
AgentSD merge and have their output copied back to every token, as the self-attention output is
(the official AgentSD / ToMe for SD options of the same names).  In a diffusion transformer these
layers hold most of the work that agent attention does not touch: at 2048² the feed-forward and the
projections are half of an AgentSD block.

:class:`TokenwiseHook` is a diffusers ``ModelHook`` on such a sub-layer (``attn2``, ``ff``, ``ffn``;
the adapter names them: :meth:`Adapter.tokenwise`).  On a call it takes the reduction the running
block's self-attention computed (on the block input), merges the sub-layer's input rows, calls the
sub-layer and unmerges its output.  It merges nothing when the block's settings at this step are not
``agentsd`` with the flag set, when the block's attention did not run AgentSD in this call (an input
AgentSD does not handle), or when the input is not the block's ``N`` image tokens (a chunked
feed-forward).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from diffusers.hooks import ModelHook
from torch import Tensor

__all__ = ["TokenwiseHook", "TOKENWISE_HOOK"]

TOKENWISE_HOOK = "agentsd_tokenwise"
_INPUT_NAMES = ("hidden_states", "input", "x")


def _first_input(args: tuple, kwargs: dict) -> Tuple[Optional[Tensor], Optional[str]]:
    """The sub-layer's input tokens and where they are (``None``: positional 0)."""
    if args:
        return (args[0], None) if isinstance(args[0], Tensor) else (None, None)
    for name in _INPUT_NAMES:
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name], name
    return None, None


class TokenwiseHook(ModelHook):
    """Runs one token-wise sub-layer (``spec``: a :class:`~.adapters.base.TokenwiseSpec`) of the block
    of the patched layer ``layer`` on the block's merged rows; see the module docstring."""

    def __init__(self, state, spec, layer, adapter):
        super().__init__()
        self.state, self.spec, self.layer, self.adapter = state, spec, layer, adapter

    def new_forward(self, module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x, where = _first_input(args, kwargs)
        red = self._reduction(x) if x is not None else None
        if red is None:
            return forward(*args, **kwargs)
        merged = red.queries(x)
        if where is None:
            args = (merged,) + args[1:]
        else:
            kwargs = dict(kwargs, **{where: merged})
        out = forward(*args, **kwargs)
        self.state.calls[f"merged {self.spec.kind}"] += 1
        return red.expand(out)

    def _reduction(self, x: Tensor):
        """The block's reduction to merge ``x`` with, or ``None``."""
        state, spec, layer = self.state, self.spec, self.layer
        settings = state.active.get(layer.name)
        if settings is None or settings.method != "agentsd" or not getattr(settings, f"merge_{spec.kind}"):
            return None
        entry = state.block_inputs.get(spec.block)
        if entry is None or x.ndim != 3 or x.shape[:2] != entry[0].shape[:2]:
            return None
        if entry[1] is None or entry[1][0] != settings:  # the block's attention did not run AgentSD in this call
            return None
        red = entry[1][1]
        return red if red.merges else None
