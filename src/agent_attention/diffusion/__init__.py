"""AgentSD: training-free agent attention for diffusion models on 🤗 diffusers.

Token merging plus agent attention (or ToDo) inside the attention layers of a denoiser: the SD
1.x/2.x/SDXL UNet, PixArt-α/Σ, SD3/SD3.5, FLUX.1, Wan 2.x (see ``adapters/``), installed with diffusers' hooks and
attention processors:

    >>> from agent_attention.diffusion import AgentSDConfig, apply_agentsd, remove_agentsd

See ``docs/agentsd.md``.  ``merge``, ``todo``, ``core``, ``settings``, ``schedule`` and ``state``
have no diffusers dependency; ``adapters``, ``processor``, ``hooks`` and ``patch`` know diffusers.
"""
from .adapters import ADAPTERS, Adapter, LayerSpec, find_adapter, register_adapter, supported_classes
from .core import Reduction, Stream, attention_call, reduce_tokens
from .merge import TokenMatch, match_tokens, merge_counts, merge_tokens
from .patch import AgentSDSchedule, apply_agentsd, denoisers, get_agentsd_state, remove_agentsd, self_attention_layers
from .processor import AgentSDProcessor, latent_grid
from .schedule import AgentSDConfig, Rule
from .settings import METHODS, AgentSDSettings
from .state import AgentSDState
from .todo import todo_factor_for_ratio

__all__ = [
    "apply_agentsd", "remove_agentsd", "AgentSDConfig", "Rule", "AgentSDSchedule", "AgentSDSettings", "AgentSDState",
    "AgentSDProcessor", "get_agentsd_state", "self_attention_layers", "denoisers", "latent_grid",
    "TokenMatch", "match_tokens", "merge_tokens", "merge_counts", "METHODS", "todo_factor_for_ratio",
    "Adapter", "LayerSpec", "ADAPTERS", "find_adapter", "register_adapter", "supported_classes",
    "Stream", "Reduction", "reduce_tokens", "attention_call",
]
