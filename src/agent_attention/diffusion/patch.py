"""Apply / remove AgentSD on a diffusers pipeline or denoiser, and the paper's two-phase schedule.

    >>> from agent_attention.diffusion import AgentSDConfig, apply_agentsd, remove_agentsd
    >>> state = apply_agentsd(pipe, AgentSDConfig.paper(switch=0.4))   # doctest: +SKIP
    >>> image = pipe(prompt, num_inference_steps=50).images[0]          # doctest: +SKIP
    >>> remove_agentsd(pipe)                                            # doctest: +SKIP

``apply_agentsd`` finds the denoiser(s) of a pipeline (or takes a denoiser module), picks the adapter
of its class (``adapters/``), installs an :class:`~.processor.AgentSDProcessor` on every attention
layer some rule of the configuration uses (``Attention.set_processor``: no class swaps), a
:class:`~.hooks.BlockHook` on their blocks and a :class:`~.hooks.DenoiserHook` on the denoiser
(diffusers' ``HookRegistry``).  Other layers keep their processors.  ``remove_agentsd`` puts the
original processor objects back and removes the hooks; both are idempotent, and applying again
replaces the configuration.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

from torch import nn

from .adapters import Adapter, find_adapter, supported_classes
from .hooks import BLOCK_HOOK, DENOISER_HOOK, BlockHook, DenoiserHook, register
from .processor import AgentSDProcessor
from .schedule import PAPER_LATE, AgentSDConfig, Rule
from .settings import AgentSDSettings
from .state import AgentSDState

__all__ = ["apply_agentsd", "remove_agentsd", "AgentSDSchedule", "self_attention_layers", "get_agentsd_state", "agentsd_calls",
           "denoisers", "PAPER_LATE"]

_ATTR = "_agentsd_state"
_PIPELINE_ATTRS = ("unet", "transformer")


def denoisers(pipe_or_model: Any) -> List[Tuple[nn.Module, Adapter]]:
    """``(denoiser, adapter)`` of a pipeline (its ``unet`` / ``transformer``) or of a denoiser module."""
    if isinstance(pipe_or_model, nn.Module):
        return [(pipe_or_model, find_adapter(pipe_or_model))]
    found = []
    attrs = list(_PIPELINE_ATTRS)
    from .adapters import ADAPTERS

    for adapter in ADAPTERS:
        attrs += [a for a in adapter.denoiser_attrs if a not in attrs]
    for attr in attrs:
        module = getattr(pipe_or_model, attr, None)
        if isinstance(module, nn.Module):
            found.append((module, find_adapter(module)))
    if not found:
        raise TypeError(
            "AgentSD: expected a diffusers pipeline with a `unet` or `transformer`, or a denoiser module "
            f"({', '.join(supported_classes())}), got {type(pipe_or_model).__name__}")
    return found


def _find_unet(pipe_or_model: Any) -> nn.Module:
    return denoisers(pipe_or_model)[0][0]


def self_attention_layers(pipe_or_model: Any) -> List[Tuple[str, nn.Module, Optional[int]]]:
    """``(name, attention module, UNet downsampling factor or None)`` of every layer AgentSD can patch."""
    model, adapter = denoisers(pipe_or_model)[0]
    return [(spec.name, spec.attn, spec.level) for spec in adapter.layers(model)]


def get_agentsd_state(pipe_or_model: Any) -> Optional[AgentSDState]:
    """The :class:`AgentSDState` of a patched pipeline/denoiser, or ``None``."""
    return getattr(_find_unet(pipe_or_model), _ATTR, None)


def agentsd_calls(pipe_or_model: Any, clear: bool = False) -> Dict[str, int]:
    """The attention-call counts of every patched denoiser of a pipeline added together (Wan 2.2 has
    two: ``transformer`` and ``transformer_2``); ``clear`` resets them afterwards."""
    total: Dict[str, int] = {}
    for model, _ in denoisers(pipe_or_model):
        state = getattr(model, _ATTR, None)
        if state is None:
            continue
        for key, n in state.calls.items():
            total[key] = total.get(key, 0) + n
        if clear:
            state.calls.clear()
    return total


def _as_config(config: Any, schedule: Any, settings: Dict[str, Any]) -> Tuple[AgentSDConfig, Any]:
    given = [x for x in (config, schedule) if x is not None]
    if len(given) > 1 or (given and settings):
        raise ValueError("apply_agentsd: pass one of a config, a schedule or settings (put the settings in the config)")
    config = given[0] if given else AgentSDSettings().updated(**settings)
    legacy = config if hasattr(config, "settings_for") and hasattr(config, "to_config") else None
    if legacy is not None:
        config = legacy.to_config()
    if isinstance(config, (AgentSDSettings, Rule)):
        config = AgentSDConfig((config,))
    if not isinstance(config, AgentSDConfig):
        raise TypeError(f"apply_agentsd: config must be an AgentSDConfig, AgentSDSettings or AgentSDSchedule, got {type(config).__name__}")
    return config, legacy


def _warn_identity(config: AgentSDConfig) -> None:
    for rule in config.rules:
        s = rule.settings
        what = None
        if s is not None and s.method == "agentsd" and s.ratio == 0:
            what = "agentsd with ratio=0"
        elif s is not None and s.method == "todo" and s.todo_factor == 1:
            what = "todo with todo_factor=1"
        if what:
            warnings.warn(f"AgentSD: {what} reduces no token: these layers compute plain attention",
                          RuntimeWarning, stacklevel=3)


def apply_agentsd(pipe_or_model: Any, config: Any = None, *, schedule: Any = None, **settings: Any) -> AgentSDState:
    """Patch a diffusers pipeline (its denoiser) or a denoiser module with AgentSD; returns the state.

    Args:
        pipe_or_model: a pipeline with a ``unet``/``transformer`` or a supported denoiser module.
        config: an :class:`~.schedule.AgentSDConfig` (rules: which blocks, which steps, which
            settings), an :class:`~.settings.AgentSDSettings` (everywhere, every step) or an
            :class:`AgentSDSchedule`.
        schedule: the same as ``config`` (the older spelling).
        **settings: the fields of :class:`~.settings.AgentSDSettings` (default: the paper's first
            phase at the highest-resolution self-attention layers), instead of a config.

    Calling it again replaces the configuration and keeps the original processors saved first.
    """
    config, legacy = _as_config(config, schedule, settings)
    _warn_identity(config)
    states = [_install(model, adapter, config, legacy, pipe_or_model) for model, adapter in denoisers(pipe_or_model)]
    return states[0]


def _install(model: nn.Module, adapter: Adapter, config: AgentSDConfig, legacy: Any, owner: Any) -> AgentSDState:
    layers = adapter.layers(model)
    if not layers:
        raise ValueError(f"AgentSD: {type(model).__name__} has no attention layer to patch")
    num_blocks = max(spec.index for spec in layers) + 1
    config.check_blocks(num_blocks)
    used = {}
    for spec in layers:  # a layer is patched if some rule may turn it on (adapter.selects raises on bad levels)
        settings = [r.settings for r in config.rules if r.settings is not None and spec.index in _blocks(r, num_blocks)]
        if any(adapter.selects(spec, s, layers) for s in settings):
            used[spec.name] = spec
    if not used:
        raise ValueError(f"AgentSD: this configuration selects none of the {len(layers)} attention layers of {type(model).__name__}")
    state = getattr(model, _ATTR, None)
    if state is None:
        first = next(r.settings for r in config.rules if r.settings is not None)
        state = AgentSDState(settings=first)
        state.model = weakref.ref(model)
        state.adapter = adapter
        setattr(model, _ATTR, state)
    state.config, state.schedule = config, legacy
    state.num_blocks = num_blocks
    if model is not owner:
        _remember_pipeline(state, owner)
    modules = None
    for spec in layers:
        ours = state.processors.get(spec.name)
        if spec.name in used:
            if ours is None:
                state.originals[spec.name] = spec.attn.processor
                ours = AgentSDProcessor(state, spec.attn.processor, layer=spec, adapter=adapter)
                spec.attn.set_processor(ours)
                state.processors[spec.name] = ours
        elif ours is not None:
            _restore(state, spec.name, spec.attn)
    state.layers, state.all_layers = dict(used), layers
    state.levels = {name: spec.level for name, spec in used.items()}
    state.known_levels = [spec.level for spec in layers]  # what max_downsample=None resolves against
    blocks = {spec.block for spec in used.values()}
    for block in set(state.block_hooks) - blocks:
        state.block_hooks.pop(block).remove()
    for block in sorted(blocks - set(state.block_hooks)):
        modules = dict(model.named_modules()) if modules is None else modules
        state.block_hooks[block] = register(modules[block], BlockHook(state, block, adapter), BLOCK_HOOK)
    _install_tokenwise(model, adapter, state, config)
    if state.hook is None:
        state.hook = register(model, DenoiserHook(state, adapter, update_active), DENOISER_HOOK)
    state._active_key = None
    update_active(model, state)
    return state


def _install_tokenwise(model: nn.Module, adapter: Adapter, state: AgentSDState, config: AgentSDConfig) -> None:
    """(Re)install the :class:`~.tokenwise.TokenwiseHook` s of the patched blocks when a rule asks for
    ``merge_crossattn`` / ``merge_mlp``; warn about a flag this model has no sub-layer for."""
    for handle in state.tokenwise_hooks.values():
        handle.remove()
    state.tokenwise_hooks.clear()
    wanted = {kind for r in config.rules if r.settings is not None
              for kind in ("crossattn", "mlp") if getattr(r.settings, f"merge_{kind}")}
    if not wanted:
        return
    from .tokenwise import TOKENWISE_HOOK, TokenwiseHook

    modules = dict(model.named_modules())
    first: Dict[str, Any] = {}
    for spec in state.layers.values():  # a block's settings are those of its patched layers
        first.setdefault(spec.block, spec)
    found = set()
    for block, layer in first.items():
        for sub in adapter.tokenwise(block, modules[block]):
            if sub.kind in wanted and sub.name not in state.tokenwise_hooks:
                found.add(sub.kind)
                hook = TokenwiseHook(state, sub, layer, adapter)
                state.tokenwise_hooks[sub.name] = register(sub.module, hook, TOKENWISE_HOOK)
    for kind in sorted(wanted - found):
        warnings.warn(f"AgentSD: merge_{kind}=True does nothing on {type(model).__name__}: its patched blocks have no "
                      f"{'cross-attention to the text' if kind == 'crossattn' else 'feed-forward'} sub-layer",
                      RuntimeWarning, stacklevel=4)


def _blocks(rule: Rule, num_blocks: int):
    from .schedule import select_blocks

    return select_blocks(rule.blocks, num_blocks)


def update_active(model: nn.Module, state: AgentSDState) -> None:
    """Select each patched layer's settings for the current step (once per step)."""
    key = (state.step, state.num_steps)
    if key == state._active_key:
        return
    state._active_key = key
    specs = list(state.layers.values())
    first = None
    for spec in specs:
        s = state.config.settings_for(state.step, state.num_steps, spec.index, state.num_blocks)
        if s is not None and not state.adapter.selects(spec, s, state.all_layers):
            s = None
        state.active[spec.name] = s
        first = first or s
    if first is not None:
        state.settings = first
    if hasattr(state.adapter, "max_downsample"):
        state.max_downsample = state.adapter.max_downsample(state.settings, state.known_levels)


def _restore(state: AgentSDState, name: str, attn: nn.Module) -> None:
    ours = state.processors.pop(name, None)
    original = state.originals.pop(name, None)
    if ours is not None and attn.processor is ours:
        attn.set_processor(original)
    state.active.pop(name, None)


def _remember_pipeline(state: AgentSDState, pipe: Any) -> None:
    try:
        state.pipeline = weakref.ref(pipe)
    except TypeError:  # an object without weak references: fall back to the timesteps alone
        state.pipeline = None


def remove_agentsd(pipe_or_model: Any) -> None:
    """Restore the original processor objects and remove the hooks (no-op if not patched)."""
    for model, _ in denoisers(pipe_or_model):
        state = getattr(model, _ATTR, None)
        if state is None:
            continue
        for name, spec in list(state.layers.items()):
            _restore(state, name, spec.attn)
        for block in list(state.block_hooks):
            state.block_hooks.pop(block).remove()
        for name in list(state.tokenwise_hooks):
            state.tokenwise_hooks.pop(name).remove()
        state.block_inputs.clear()
        state.layers.clear()
        state.levels.clear()
        if state.hook is not None:
            state.hook.remove()
            state.hook = None
        delattr(model, _ATTR)


class AgentSDSchedule:
    """Settings that change at a denoising step: ``early`` before ``switch_step``, ``late`` after
    (the paper's schedule; :meth:`AgentSDConfig.paper` is the same with step fractions).

    Defaults are the paper's: ``sx=sy=4, ratio=0.4, agent_ratio=0.95`` for steps 0-19, then
    ``sx=sy=2, ratio=0.4, agent_ratio=0.5`` (agents then fail the size condition: plain ToMe).
    ``early`` overrides the :class:`~.settings.AgentSDSettings` defaults; ``late`` overrides
    ``early`` (so e.g. ``early=dict(attn_precision="fp32")`` holds in both phases).

    Use it with ``apply_agentsd(pipe, schedule)`` (the denoiser hook counts the steps from the
    timesteps) and, for the pipeline's exact step index, also as
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

    def to_config(self) -> AgentSDConfig:
        if self.switch_step == 0:
            return AgentSDConfig((Rule(self.late),))
        return AgentSDConfig((Rule(self.early, steps=(0, self.switch_step)), Rule(self.late, steps=(self.switch_step, None))))

    def phases(self) -> Iterator[Tuple[int, AgentSDSettings]]:
        """``(first step, settings)`` of each phase."""
        yield 0, self.early
        yield self.switch_step, self.late

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``callback_on_step_end``: after step ``step``, select the settings of step ``step + 1``."""
        for model, _ in denoisers(pipe):
            state = getattr(model, _ATTR, None)
            if state is None:
                raise RuntimeError("AgentSDSchedule: AgentSD is not applied; call apply_agentsd(pipe, schedule) first")
            if state.schedule is not self:
                state.schedule, state.config = self, self.to_config()
            if state.pipeline is None and pipe is not model:
                _remember_pipeline(state, pipe)
            state._callback_step = state.step = step + 1
            total = getattr(pipe, "num_timesteps", None)
            if isinstance(total, int) and step + 1 >= total:  # the generation is over
                state.new_generation()
            update_active(model, state)
        return callback_kwargs
