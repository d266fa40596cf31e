"""The state one AgentSD installation shares between its denoiser hook and its processors: the
current step (from the denoiser's timesteps), the token grid, the settings of each layer, the seeded
destination generator and the call counters.  No diffusers dependency."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .settings import AgentSDSettings

__all__ = ["AgentSDState"]


@dataclass
class AgentSDState:
    """State shared by the processors of one denoiser, updated by the denoiser hook.

    Attributes:
        settings: the settings of the first active rule at the current step (what the seed and the
            bare-layer processors use).
        max_downsample: UNet only: the resolved ``settings.max_downsample`` (an int).
        latent_hw: spatial size of the latent of the current denoiser call.
        grid: the image token grid of the current call of a transformer denoiser (``(h, w)`` or
            ``(t, h, w)``), set by its adapter.
        step: denoising step of the current call (from the schedule callback when one runs,
            otherwise counted from the timesteps); ``num_steps`` the steps of the run when known.
        active: the settings of each patched layer at the current step (``None``: stock attention).
        calls: how many attention calls took each path: ``"agent"`` (agent attention), ``"tome"``
            (merged softmax attention), ``"todo"``, ``"todo+agents"``, ``"stock"`` (handed to the
            original processor).
    """

    settings: AgentSDSettings
    max_downsample: int = 1
    latent_hw: Optional[Tuple[int, int]] = None
    step: int = 0
    schedule: Any = None
    calls: Counter = field(default_factory=Counter)
    originals: Dict[str, Any] = field(default_factory=dict)
    levels: Dict[str, Optional[int]] = field(default_factory=dict)
    hook: Any = None
    block_hooks: Dict[str, Any] = field(default_factory=dict)
    tokenwise_hooks: Dict[str, Any] = field(default_factory=dict)  # sub-layer name -> hook handle (merge_crossattn/mlp)
    block_inputs: Dict[str, Tensor] = field(default_factory=dict)
    _generators: Dict[str, torch.Generator] = field(default_factory=dict)
    _run_seed: Optional[int] = None
    _last_timestep: Optional[float] = None
    _counted_step: int = 0
    _callback_step: Optional[int] = None
    _pending_new: bool = False
    pipeline: Any = None  # weakref.ref to the patched pipeline, if a pipeline was patched
    _seen_timesteps: Any = None
    grid: Optional[Tuple[int, ...]] = None
    num_steps: Optional[int] = None
    active: Dict[str, Optional[AgentSDSettings]] = field(default_factory=dict)
    config: Any = None
    adapter: Any = None
    layers: Dict[str, Any] = field(default_factory=dict)  # name -> LayerSpec of the patched layers
    processors: Dict[str, Any] = field(default_factory=dict)  # name -> our processor on that layer
    model: Any = None  # weakref.ref to the patched denoiser
    _active_key: Any = None
    num_blocks: int = 0
    all_layers: list = field(default_factory=list)  # every layer the adapter could patch
    known_levels: list = field(default_factory=list)
    block_matches: Dict[str, Any] = field(default_factory=dict)
    warned: set = field(default_factory=set)

    def settings_of(self, name: str) -> Optional[AgentSDSettings]:
        """The settings of layer ``name`` at the current step (a bare processor: ``settings``)."""
        return self.active[name] if name in self.active else self.settings

    def begin_run(self) -> None:
        """A new generation starts: step 0, generators re-seeded (see :meth:`new_generation`)."""
        self._counted_step = 0
        self._callback_step = None
        self._last_timestep = None
        self._generators.clear()
        seed = self.settings.seed
        self._run_seed = int(torch.randint(2**62, (1,)).item()) if seed is None else seed

    def new_generation(self) -> None:
        """Declare that the next UNet call starts a new generation (step 0, the destination
        generator re-seeded).  Patching a *pipeline* detects this by itself (the scheduler's
        ``set_timesteps``); with a bare UNet in a hand-written loop whose timesteps do not rise
        between generations (one-step / few-step sampling), call this before each generation."""
        self._pending_new = True

    def observe_timestep(self, t: Optional[float], new_generation: bool = False) -> int:
        """Advance the step counter from the timestep of a UNet call; returns the current step.

        A new generation starts when ``new_generation`` is true (the pipeline set new timesteps),
        after :meth:`new_generation`, at the first call, or when the timestep rises (timesteps
        decrease during a generation).  A lower timestep is the next step; an equal one the same
        step (second-order samplers call the UNet twice per step)."""
        if new_generation or self._pending_new or self._run_seed is None or (
                t is not None and self._last_timestep is not None and t > self._last_timestep):
            self._pending_new = False
            self.begin_run()
        elif t is not None and self._last_timestep is not None and t < self._last_timestep:
            self._counted_step += 1
        if t is not None:
            self._last_timestep = t
        self.step = self._counted_step if self._callback_step is None else self._callback_step
        return self.step

    def generator(self, device: torch.device) -> torch.Generator:
        """The destination generator for ``device`` (created from the run's seed on first use)."""
        gen_device = torch.device("cpu") if device.type == "mps" else device
        key = str(gen_device)
        if key not in self._generators:
            if self._run_seed is None:
                self.begin_run()
            self._generators[key] = torch.Generator(device=gen_device).manual_seed(self._run_seed)
        return self._generators[key]
