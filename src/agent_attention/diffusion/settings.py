"""AgentSD settings of one attention call: the method (token merging + agents, ToDo, ToDo + agents)
and its parameters.  Plain data, no diffusers dependency; validated on construction."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

__all__ = ["AgentSDSettings", "METHODS"]

_PRECISIONS = (None, "fp32", "native")
METHODS = ("agentsd", "todo", "todo+agents")


@dataclass(frozen=True)
class AgentSDSettings:
    """AgentSD settings; the defaults are the paper's first phase (steps 0-19 of 50).

    Attributes:
        method: ``"agentsd"`` (the paper: token merging + agents), ``"todo"`` (ToDo: all queries,
            keys/values average-pooled by ``todo_factor``), ``"todo+agents"`` (agent attention over
            ToDo's pooled keys/values, agents pooled on the ``sy × sx`` grid); see ``todo.py``.
        todo_factor: ToDo's pooling factor per side (2: ``2 × 2`` average pooling, keys/values
            ÷ 4); :func:`~.todo.todo_factor_for_ratio` gives the factor that keeps as many
            keys/values as ToMe at a ratio.
        ratio: fraction of the tokens merged away (ToMe ``r = int(N·ratio)``).
        agent_ratio: the same for the agent set (agents = ``N - int(N·agent_ratio)`` tokens, at
            least one per ``sy × sx`` cell); agents are used only when fewer than half the merged
            tokens.
        sx, sy: destination stride of the merge (one destination per ``sy × sx`` cell); also the
            cell of the pooled agents of ``todo+agents``.
        st: the temporal stride of a video's ``(t, h, w)`` token grid (cells of ``st × sy × sx``;
            ignored on 2-D grids).
        max_downsample: patch the self-attention layers whose feature map is downsampled at most
            this much from the latent (1 = full latent resolution).  ``None``: the highest-resolution
            level that has self-attention (1 for SD 1.x/2.x, 2 for SDXL).
        k_scale2: exponent of the second softmax's scale, ``s ** k_scale2``.
        k_shortcut: weight of the ``V`` shortcut added to the agent attention output.
        attn_precision: ``"fp32"``: attention (both softmax steps) and the merge similarities in
            float32, cast back; ``"native"``: the model's dtype; ``None``: float32 for layers built
            with ``upcast_attention=True`` (SD 2.1), native otherwise.
        use_rand: random destination in each cell (disabled for odd batches, as in the official
            code, so that the conditional and unconditional halves of a CFG batch agree).
        seed: seed of the destination generator, re-seeded at every new generation (reproducible);
            ``None`` draws the seed from torch's global RNG at every new generation.
        merge_crossattn: ``agentsd`` only: the block's cross-attention to the text (UNet, PixArt,
            Wan) also runs on the merged rows (its queries merged, the text keys/values exact, the
            output unmerged by copy); the official option of the same name, off by default.
        merge_mlp: ``agentsd`` only: the block's feed-forward runs on the merged rows too (not in
            FLUX's single-stream blocks); the official option, off by default.
            Both act token by token, so they only trade the detail of merged tokens for speed;
            see ``tokenwise.py``.
    """

    method: str = "agentsd"
    todo_factor: float = 2.0
    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    st: int = 1
    max_downsample: Optional[int] = None
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    attn_precision: Optional[str] = None
    use_rand: bool = True
    seed: Optional[int] = 0
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self) -> None:
        for name in ("ratio", "agent_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"AgentSD: {name} must be a number in [0, 1], got {value!r}")
        for name in ("sx", "sy", "st"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentSD: {name} must be a positive int, got {value!r}")
        md = self.max_downsample
        if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
            raise ValueError(f"AgentSD: max_downsample must be a positive int or None, got {md!r}")
        if self.method not in METHODS:
            raise ValueError(f"AgentSD: method must be one of {METHODS}, got {self.method!r}")
        f = self.todo_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
            raise ValueError(f"AgentSD: todo_factor must be a number >= 1, got {f!r}")
        if self.attn_precision not in _PRECISIONS:
            raise ValueError(f"AgentSD: attn_precision must be one of {_PRECISIONS}, got {self.attn_precision!r}")
        for name in ("k_scale2", "k_shortcut"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AgentSD: {name} must be a finite number, got {value!r}")
        for name in ("merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AgentSD: {name} must be True or False, got {getattr(self, name)!r}")
            if getattr(self, name) and self.method != "agentsd":
                raise ValueError(f"AgentSD: {name} runs sub-layers on merged tokens: it needs method='agentsd', "
                                 f"got method={self.method!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"AgentSD: seed must be an int or None, got {self.seed!r}")

    def updated(self, **changes: Any) -> "AgentSDSettings":
        """A copy with ``changes``; unknown names raise ``TypeError``."""
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise TypeError(f"AgentSD: unknown setting(s) {sorted(unknown)}; known: {sorted(asdict(self))}")
        return replace(self, **changes)
