"""Apply / remove AgentSD on a diffusers pipeline or UNet, and the paper's step schedule.

    >>> from agent_attention.diffusion import apply_agentsd, remove_agentsd, AgentSDSchedule
    >>> schedule = AgentSDSchedule(switch_step=20)          # the paper: 20 of 50 steps, then ToMe
    >>> state = apply_agentsd(pipe, schedule=schedule)       # doctest: +SKIP
    >>> image = pipe(prompt, num_inference_steps=50, callback_on_step_end=schedule).images[0]  # doctest: +SKIP
    >>> remove_agentsd(pipe)                                 # doctest: +SKIP

``apply_agentsd`` installs an :class:`~.processor.AgentSDProcessor` on the self-attention (``attn1``)
of every ``BasicTransformerBlock`` at the selected resolutions, through ``Attention.set_processor``,
a forward pre-hook on each of these blocks that hands the block's input ``x`` (before ``norm1``) to
its processor as the matching metric, and a forward pre-hook on the UNet that records the latent
size and the denoising step of each call.  Cross-attention and the other layers keep their processors.  ``remove_agentsd`` puts the
original processor objects back and removes the hook.  Both are idempotent.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .processor import AgentSDProcessor, AgentSDSettings, AgentSDState

__all__ = ["apply_agentsd", "remove_agentsd", "AgentSDSchedule", "self_attention_layers", "get_agentsd_state"]

_ATTR = "_agentsd_state"
PAPER_LATE = dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)


def _find_unet(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, nn.Module):
        return unet
    if isinstance(pipe_or_unet, nn.Module):
        return pipe_or_unet
    raise TypeError(
        "AgentSD: expected a diffusers pipeline with a `unet` or a UNet module, "
        f"got {type(pipe_or_unet).__name__}"
    )


def _is_transformer_block(module: nn.Module) -> bool:
    return any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__)


def _block_levels(unet: nn.Module) -> Dict[int, int]:
    """``id(module) -> downsampling factor`` for the modules of a UNet2DConditionModel-like UNet
    (``down_blocks`` / ``mid_block`` / ``up_blocks``, each down block but the last halving the map
    at its end, each up block but the last doubling it)."""
    levels: Dict[int, int] = {}
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        return levels
    factor = 1
    for block in unet.down_blocks:
        levels.update((id(m), factor) for m in block.modules())
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        levels.update((id(m), factor) for m in unet.mid_block.modules())
    for block in unet.up_blocks:
        levels.update((id(m), factor) for m in block.modules())
        if getattr(block, "upsamplers", None) is not None:
            factor = max(1, factor // 2)
    return levels


def self_attention_layers(pipe_or_unet: Any) -> List[Tuple[str, nn.Module, Optional[int]]]:
    """``(name, attention module, downsampling factor or None)`` of every UNet self-attention that
    AgentSD can patch: ``attn1`` of the ``BasicTransformerBlock`` s, unless it is a cross-attention
    (``only_cross_attention``)."""
    unet = _find_unet(pipe_or_unet)
    levels = _block_levels(unet)
    layers = []
    for name, module in unet.named_modules():
        if not _is_transformer_block(module):
            continue
        attn = getattr(module, "attn1", None)
        if attn is None or getattr(attn, "is_cross_attention", False) or not hasattr(attn, "set_processor"):
            continue
        layers.append((f"{name}.attn1" if name else "attn1", attn, levels.get(id(attn))))
    return layers


def get_agentsd_state(pipe_or_unet: Any) -> Optional[AgentSDState]:
    """The :class:`AgentSDState` of a patched pipeline/UNet, or ``None``."""
    return getattr(_find_unet(pipe_or_unet), _ATTR, None)


def _resolve_max_downsample(settings: AgentSDSettings, layers) -> int:
    known = sorted({level for _, _, level in layers if level is not None})
    if settings.max_downsample is None:
        return known[0] if known else 1
    if known and settings.max_downsample < known[0]:
        raise ValueError(
            f"AgentSD: max_downsample={settings.max_downsample} selects no self-attention layer; this UNet "
            f"has self-attention at downsampling {known} (use max_downsample=None for the highest resolution)"
        )
    return settings.max_downsample


def _make_block_hook(state: AgentSDState, name: str):
    """Forward pre-hook of a ``BasicTransformerBlock``: keep its input ``x`` (before ``norm1``) for
    the processor of its ``attn1``, which matches the tokens on it (official ``compute_merge(x)``).
    Only the first argument is read, so new block arguments do not matter."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            state.block_inputs[name] = x
        return None

    return pre_hook


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _set_settings(unet: nn.Module, state: AgentSDState, settings: AgentSDSettings) -> None:
    """Make ``settings`` current and (re)install the processors on the layers it selects."""
    layers = self_attention_layers(unet)
    max_downsample = _resolve_max_downsample(settings, layers)
    state.settings, state.max_downsample = settings, max_downsample
    modules = None
    for name, attn, level in layers:
        current = attn.processor
        ours = isinstance(current, AgentSDProcessor) and current.state is state
        if level is None or level <= max_downsample:
            if not ours:
                state.originals.setdefault(name, current)
                attn.set_processor(AgentSDProcessor(state, state.originals[name], name=name, level=level))
            if name not in state.block_hooks:
                modules = dict(unet.named_modules()) if modules is None else modules
                block = modules[_parent_name(name)]
                state.block_hooks[name] = block.register_forward_pre_hook(_make_block_hook(state, name), with_kwargs=True)
            state.levels[name] = level
        elif name in state.originals:
            if ours:
                attn.set_processor(state.originals[name])
            del state.originals[name]
            state.levels.pop(name, None)
            _drop_block_hook(state, name)


def _drop_block_hook(state: AgentSDState, name: str) -> None:
    hook = state.block_hooks.pop(name, None)
    if hook is not None:
        hook.remove()
    state.block_inputs.pop(name, None)


def _timestep_value(t: Any) -> Optional[float]:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def _new_timesteps(state: AgentSDState) -> bool:
    """Whether the patched pipeline's scheduler holds a timesteps tensor not seen before: every
    diffusers pipeline calls ``scheduler.set_timesteps`` (which builds a new tensor) once at the
    start of a generation, so this marks a new generation even when the timestep does not rise
    (one-step pipelines, img2img with a lower strength, custom timesteps)."""
    pipe = state.pipeline() if state.pipeline is not None else None
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None or timesteps is state._seen_timesteps:
        return False
    state._seen_timesteps = timesteps  # a reference, so the identity check can never be fooled by a reused id
    return True


def _make_pre_hook(state: AgentSDState):
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim >= 3:
            state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        state.block_inputs.clear()
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        step = state.observe_timestep(_timestep_value(timestep), new_generation=_new_timesteps(state))
        if state.schedule is not None:
            settings = state.schedule.settings_for(step)
            if settings != state.settings:
                _set_settings(module, state, settings)
        return None

    return pre_hook


def apply_agentsd(pipe_or_unet: Any, *, schedule: Optional["AgentSDSchedule"] = None, **settings: Any) -> AgentSDState:
    """Patch a diffusers pipeline (its ``unet``) or a UNet with AgentSD; returns the shared state.

    Args:
        pipe_or_unet: a pipeline with a ``unet`` (SD 1.x/2.x, SDXL, ...) or a ``UNet2DConditionModel``.
        schedule: an :class:`AgentSDSchedule`; the settings then follow the denoising step.
        **settings: the fields of :class:`~.processor.AgentSDSettings` (default: the paper's first
            phase, ``sx=sy=4, ratio=0.4, agent_ratio=0.95, k_scale2=0.3, k_shortcut=0.075`` at the
            highest-resolution self-attention layers).  Not allowed together with ``schedule``.

    Calling it again replaces the settings (unspecified ones return to their defaults) and keeps
    the original processors saved by the first call.
    """
    unet = _find_unet(pipe_or_unet)
    if schedule is not None and settings:
        raise ValueError("apply_agentsd: pass either settings or a schedule (put the settings in the schedule)")
    if schedule is not None and not hasattr(schedule, "settings_for"):
        raise TypeError(f"apply_agentsd: schedule must have settings_for(step), got {type(schedule).__name__}")
    new = schedule.settings_for(0) if schedule is not None else AgentSDSettings().updated(**settings)
    if not self_attention_layers(unet):
        raise ValueError(f"AgentSD: {type(unet).__name__} has no BasicTransformerBlock self-attention to patch")
    state = getattr(unet, _ATTR, None)
    if state is None:
        state = AgentSDState(settings=new)
        state.hook = unet.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
        setattr(unet, _ATTR, state)
    state.schedule = schedule
    if unet is not pipe_or_unet:
        _remember_pipeline(state, pipe_or_unet)
    _set_settings(unet, state, new)
    return state


def _remember_pipeline(state: AgentSDState, pipe: Any) -> None:
    try:
        state.pipeline = weakref.ref(pipe)
    except TypeError:  # an object without weak references: fall back to the timesteps alone
        state.pipeline = None


def remove_agentsd(pipe_or_unet: Any) -> None:
    """Restore the original processor objects and remove the hook (no-op if not patched)."""
    unet = _find_unet(pipe_or_unet)
    state = getattr(unet, _ATTR, None)
    if state is None:
        return
    modules = dict(unet.named_modules())
    for name, original in state.originals.items():
        attn = modules.get(name)
        if attn is not None and isinstance(attn.processor, AgentSDProcessor) and attn.processor.state is state:
            attn.set_processor(original)
    for name in list(state.block_hooks):
        _drop_block_hook(state, name)
    state.originals.clear()
    state.levels.clear()
    if state.hook is not None:
        state.hook.remove()
        state.hook = None
    delattr(unet, _ATTR)


class AgentSDSchedule:
    """Settings that change at a denoising step: ``early`` before ``switch_step``, ``late`` after.

    Defaults are the paper's: ``sx=sy=4, ratio=0.4, agent_ratio=0.95`` for steps 0-19, then
    ``sx=sy=2, ratio=0.4, agent_ratio=0.5`` (agents then fail the size condition: plain ToMe).
    ``early`` overrides the :class:`~.processor.AgentSDSettings` defaults; ``late`` overrides
    ``early`` (so e.g. ``early=dict(attn_precision="fp32")`` holds in both phases).

    Use it with ``apply_agentsd(pipe, schedule=schedule)`` (the UNet pre-hook counts the steps from
    the timesteps) and, for the pipeline's exact step index, also as
    ``pipe(..., callback_on_step_end=schedule)``.  ``settings_for(step)`` works standalone.
    """

    tensor_inputs: List[str] = []

    def __init__(self, switch_step: int = 20, early: Optional[Dict[str, Any]] = None, late: Optional[Dict[str, Any]] = None):
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"AgentSDSchedule: switch_step must be a non-negative int, got {switch_step!r}")
        self.switch_step = switch_step
        self.early = AgentSDSettings().updated(**(early or {}))
        self.late = self.early.updated(**(PAPER_LATE if late is None else late))

    def __repr__(self) -> str:
        return f"AgentSDSchedule(switch_step={self.switch_step}, early={self.early}, late={self.late})"

    def settings_for(self, step: int) -> AgentSDSettings:
        """The settings of denoising step ``step`` (0-based)."""
        return self.early if step < self.switch_step else self.late

    def phases(self) -> Iterator[Tuple[int, AgentSDSettings]]:
        """``(first step, settings)`` of each phase."""
        yield 0, self.early
        yield self.switch_step, self.late

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``callback_on_step_end``: after step ``step``, select the settings of step ``step + 1``."""
        unet = _find_unet(pipe)
        state = getattr(unet, _ATTR, None)
        if state is None:
            raise RuntimeError("AgentSDSchedule: AgentSD is not applied; call apply_agentsd(pipe, schedule=schedule) first")
        state.schedule = self
        if state.pipeline is None and pipe is not unet:
            _remember_pipeline(state, pipe)
        state._callback_step = state.step = step + 1
        total = getattr(pipe, "num_timesteps", None)
        if isinstance(total, int) and step + 1 >= total:  # the generation is over
            state.new_generation()
        settings = self.settings_for(step + 1)
        if settings != state.settings:
            _set_settings(unet, state, settings)
        return callback_kwargs
