"""agent-attention: Agent Attention (Han et al., ECCV 2024) as a library.

    >>> import torch
    >>> from agent_attention import AgentAttention
    >>> attn = AgentAttention(dim=64, num_heads=4, agent_num=9)
    >>> attn(torch.randn(2, 7 * 9, 64), hw=(7, 9)).shape
    torch.Size([2, 63, 64])

The model zoo is registered with timm by this import, without importing timm now: if timm is
already imported the models are registered at once, otherwise right after timm's own import, so
``timm.create_model("agent_swin_t")`` and ``timm.list_models("agent_*")`` see them either way.
Heavier parts load on first use: ``create_model`` / ``list_models`` (the zoo), ``apply_agentsd`` /
``remove_agentsd`` (AgentSD on diffusers).
"""
import importlib.abc
import importlib.util
import sys
import warnings
from importlib import import_module

from .functional import agent_attention, agent_attention_math, agent_feature_maps
from .layers import AgentAttention

__version__ = "0.1.0"

_LAZY = {
    "create_model": "agent_attention.models",
    "list_models": "agent_attention.models",
    "load_official_checkpoint": "agent_attention.weights",
    "load_checkpoint_state": "agent_attention.weights",
    "export_safetensors": "agent_attention.weights",
    "apply_agentsd": "agent_attention.diffusion.patch",
    "remove_agentsd": "agent_attention.diffusion.patch",
    "AgentSDSchedule": "agent_attention.diffusion.patch",
}

__all__ = ["agent_attention", "agent_attention_math", "agent_feature_maps", "AgentAttention", "__version__", *_LAZY]


def _register_models() -> None:
    try:
        import_module("agent_attention.models")
    except Exception as e:  # never break `import timm` for the user
        warnings.warn(f"agent_attention: could not register the model zoo with timm: {e!r}", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """One-shot import hook: when ``timm`` is first imported, register the zoo right after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_timm = loader.exec_module

        def exec_module(module):
            exec_timm(module)
            _register_models()

        loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    _register_models()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agent_attention' has no attribute {name!r}")
