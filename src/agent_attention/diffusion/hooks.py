"""AgentSD's diffusers hooks (``diffusers.hooks.ModelHook`` in the model's ``HookRegistry``).

* :class:`DenoiserHook` on the denoiser: before each call it records the token grid (adapter) and
  the denoising step (from the timestep; a pipeline's new ``scheduler.timesteps`` starts a new
  generation and gives the number of steps), selects each layer's settings for this step, and puts
  AgentSD's processors back if something replaced them (``enable_attention_slicing``,
  ``set_attn_processor``) — loudly.  After the call it warns if every patched call fell back to the
  stock processor (a configuration that silently does nothing).
* :class:`BlockHook` on each block with a patched layer: keeps the block's input (the merge metric)
  while the block runs.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from diffusers.hooks import HookRegistry, ModelHook

__all__ = ["DenoiserHook", "BlockHook", "HookHandle", "DENOISER_HOOK", "BLOCK_HOOK", "OUR_PATHS"]

DENOISER_HOOK = "agentsd"
BLOCK_HOOK = "agentsd_block"
OUR_PATHS = ("agent", "tome", "todo", "todo+agents")


class HookHandle:
    """``remove()`` takes the hook ``name`` off ``module``'s registry (like a torch hook handle)."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module, self.name = module, name
        self.wrapper = module.forward  # the registry's wrapper, right after registration

    def remove(self) -> None:
        module = self.module
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or registry.get_hook(self.name) is None:
            return
        current = module.forward
        registry.remove_hook(self.name, recurse=False)
        if current is not self.wrapper and getattr(module, "_old_forward", None) is self.wrapper:
            # accelerate wrapped our wrapper afterwards (enable_model_cpu_offload): the registry just put the
            # bare forward back over accelerate's; keep accelerate's wrapper and point it at the bare forward
            module._old_forward, module.forward = module.forward, current


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> HookHandle:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
    registry.register_hook(hook, name)
    return HookHandle(module, name)


def _timestep_value(t: Any) -> Optional[float]:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def new_timesteps(state) -> bool:
    """Whether the patched pipeline's scheduler holds a timesteps tensor not seen before: every
    diffusers pipeline calls ``scheduler.set_timesteps`` (which builds a new tensor) once at the
    start of a generation, so this marks a new generation even when the timestep does not rise
    (one-step pipelines, img2img with a lower strength, custom timesteps).  It also gives the
    number of steps (distinct timesteps: second-order samplers repeat them)."""
    pipe = state.pipeline() if state.pipeline is not None else None
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None or timesteps is state._seen_timesteps:
        return False
    state._seen_timesteps = timesteps  # a reference, so the identity check can never be fooled by a reused id
    if isinstance(timesteps, torch.Tensor) and timesteps.numel():
        state.num_steps = int(torch.unique(timesteps.detach().cpu()).numel())
    return True


class DenoiserHook(ModelHook):
    """See the module docstring; ``update(model, state)`` selects the settings of the current step."""

    def __init__(self, state, adapter, update):
        super().__init__()
        self.state, self.adapter, self.update = state, adapter, update
        self._before = 0

    def pre_forward(self, module, *args, **kwargs):
        state = self.state
        state.block_inputs.clear()
        timestep = self.adapter.observe(module, args, kwargs, state)
        state.observe_timestep(_timestep_value(timestep), new_generation=new_timesteps(state))
        self.update(module, state)
        self._readopt(state)
        self._before = sum(state.calls[p] for p in OUR_PATHS), state.calls["stock"]
        return args, kwargs

    def post_forward(self, module, output):
        state = self.state
        ours, stock = self._before
        if (any(s is not None for s in state.active.values()) and state.calls["stock"] > stock
                and sum(state.calls[p] for p in OUR_PATHS) == ours and "fallback" not in state.warned):
            state.warned.add("fallback")
            warnings.warn(
                f"AgentSD: every patched attention call of this {type(module).__name__} call fell back to the stock "
                f"attention ({state.calls['stock'] - stock} calls): AgentSD is doing nothing here (an unsupported "
                "input layout, attention masks or extra attention arguments)", RuntimeWarning, stacklevel=2)
        return output

    @staticmethod
    def _readopt(state) -> None:
        """Processors replaced after ``apply_agentsd`` (``enable_attention_slicing``, ``set_attn_processor``):
        AgentSD stays on, the new processor serves the calls AgentSD hands over, and ``remove_agentsd``
        restores it."""
        replaced = []
        for name, processor in state.processors.items():
            attn = state.layers[name].attn
            if attn.processor is not processor:
                processor.original = state.originals[name] = attn.processor
                attn.set_processor(processor)
                replaced.append(name)
        if replaced:
            warnings.warn(
                f"AgentSD: the attention processors of {len(replaced)} patched layers were replaced after apply_agentsd "
                "(e.g. by enable_attention_slicing or set_attn_processor); AgentSD stays on and uses the new processors "
                "only for the calls it does not handle. Call remove_agentsd to turn it off.", RuntimeWarning, stacklevel=3)


class BlockHook(ModelHook):
    """Keeps ``[block input, reduction]`` in ``state.block_inputs[name]`` while the block runs."""

    def __init__(self, state, name: str, adapter):
        super().__init__()
        self.state, self.name, self.adapter = state, name, adapter

    def pre_forward(self, module, *args, **kwargs):
        x = self.adapter.block_input(args, kwargs)
        if x is not None:
            self.state.block_inputs[self.name] = [x, None]
        return args, kwargs

    def post_forward(self, module, output):
        self.state.block_inputs.pop(self.name, None)
        return output
