"""AgentSD: training-free agent attention for Stable Diffusion on 🤗 diffusers.

Token merging (ToMe for SD) plus agent attention inside the UNet self-attention layers (or ToDo,
``method="todo"``), installed as a diffusers attention processor:

    >>> from agent_attention.diffusion import apply_agentsd, remove_agentsd, AgentSDSchedule

See ``docs/agentsd.md``.  ``merge`` has no diffusers dependency; ``processor`` and ``patch`` use
diffusers objects only through their public attributes.
"""
from .merge import TokenMatch, match_tokens, merge_counts, merge_tokens
from .patch import AgentSDSchedule, apply_agentsd, get_agentsd_state, remove_agentsd, self_attention_layers
from .processor import METHODS, AgentSDProcessor, AgentSDSettings, AgentSDState, latent_grid
from .todo import todo_factor_for_ratio

__all__ = [
    "apply_agentsd", "remove_agentsd", "AgentSDSchedule", "AgentSDSettings", "AgentSDState",
    "AgentSDProcessor", "get_agentsd_state", "self_attention_layers", "latent_grid",
    "TokenMatch", "match_tokens", "merge_tokens", "merge_counts", "METHODS", "todo_factor_for_ratio",
]
