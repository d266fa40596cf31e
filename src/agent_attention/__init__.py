"""agent-attention: Agent Attention (Han et al., ECCV 2024) as a library.

    >>> import torch
    >>> from agent_attention import AgentAttention
    >>> attn = AgentAttention(dim=64, num_heads=4, agent_num=9)
    >>> attn(torch.randn(2, 7 * 9, 64), hw=(7, 9)).shape
    torch.Size([2, 63, 64])

Heavier parts load on first use: ``create_model`` / ``list_models`` (the timm model zoo, also
registered with timm by ``import agent_attention.models``), ``apply_agentsd`` /
``remove_agentsd`` (AgentSD on diffusers).
"""
from importlib import import_module

from .functional import agent_attention, agent_attention_math, agent_feature_maps
from .layers import AgentAttention

__version__ = "0.1.0"

_LAZY = {
    "create_model": "agent_attention.models",
    "list_models": "agent_attention.models",
    "load_official_checkpoint": "agent_attention.models.checkpoints",
    "load_checkpoint_state": "agent_attention.models.checkpoints",
    "export_safetensors": "agent_attention.models.checkpoints",
    "apply_agentsd": "agent_attention.diffusion.patch",
    "remove_agentsd": "agent_attention.diffusion.patch",
    "AgentSDSchedule": "agent_attention.diffusion.patch",
}

__all__ = ["agent_attention", "agent_attention_math", "agent_feature_maps", "AgentAttention", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agent_attention' has no attribute {name!r}")
