"""The AgentSD attention processor for 🤗 diffusers.

:class:`AgentSDProcessor` replaces the processor of a UNet self-attention layer (``attn1`` of a
``BasicTransformerBlock``) through ``Attention.set_processor``.  On each call it

1. matches the tokens by cosine similarity of the **block input** ``x`` (before ``norm1``; the
   official ``compute_merge(x)``, handed over by a forward pre-hook on the ``BasicTransformerBlock``)
   with :func:`~agent_attention.diffusion.merge.match_tokens`, merges the tokens it receives
   (``norm1(x)``) and builds the agent tokens from them by the stronger merge;
2. runs ``agent_attention(q, k, v, to_q(agents), scale=s, query_scale=s**k_scale2) + k_shortcut·v``
   on the merged tokens, or plain softmax attention on them (ToMe) when the agents are not fewer
   than half the merged tokens;
3. applies ``to_out`` on the merged tokens (it acts token by token, so projecting ``N - r`` rows and
   copying them back is exactly equal to copying first, and cheaper), then unmerges.

A processor called outside a hooked block (a bare ``Attention``) matches on its own input instead
and counts the call under ``calls["metric=attention input"]``.
The latent size, the current settings and the random generator come from a shared
:class:`AgentSDState` that a UNet forward pre-hook keeps up to date (see ``patch.py``).
Calls the processor cannot handle (cross-attention, an attention mask, a token count that is not a
grid of the latent, a layer deeper than ``max_downsample``) go to the layer's original processor
unchanged.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import agent_attention
from .merge import match_tokens
from .todo import pool_tokens, pooled_size, project

__all__ = ["AgentSDSettings", "AgentSDState", "AgentSDProcessor", "latent_grid", "METHODS"]

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
        sx, sy: destination stride of the merge (one destination per ``sy × sx`` cell).
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
    """

    method: str = "agentsd"
    todo_factor: float = 2.0
    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    max_downsample: Optional[int] = None
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    attn_precision: Optional[str] = None
    use_rand: bool = True
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        for name in ("ratio", "agent_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"AgentSD: {name} must be a number in [0, 1], got {value!r}")
        for name in ("sx", "sy"):
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"AgentSD: seed must be an int or None, got {self.seed!r}")

    def updated(self, **changes: Any) -> "AgentSDSettings":
        """A copy with ``changes``; unknown names raise ``TypeError``."""
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise TypeError(f"AgentSD: unknown setting(s) {sorted(unknown)}; known: {sorted(asdict(self))}")
        return replace(self, **changes)


def latent_grid(num_tokens: int, latent_hw: Tuple[int, int], max_levels: int = 8) -> Optional[Tuple[int, int, int]]:
    """``(downsample, h, w)`` of a feature map with ``num_tokens`` tokens in a UNet whose latent is
    ``latent_hw``: the latent halved (rounding up, as stride-2 convolutions do) until the token count
    matches; ``None`` if no level matches."""
    h, w = latent_hw
    downsample = 1
    for _ in range(max_levels + 1):
        if h * w == num_tokens:
            return downsample, h, w
        if h * w < num_tokens:
            return None
        h, w, downsample = -(-h // 2), -(-w // 2), downsample * 2
    return None


@dataclass
class AgentSDState:
    """State shared by the processors of one UNet, updated by the UNet forward pre-hook.

    Attributes:
        settings: the settings in force for the current step.
        max_downsample: the resolved ``settings.max_downsample`` (an int).
        latent_hw: spatial size of the latent of the current UNet call.
        step: denoising step of the current UNet call (from the schedule callback when one runs,
            otherwise counted from the timesteps).
        calls: how many attention calls took each path: ``"agent"`` (agent attention), ``"tome"``
            (merged softmax attention), ``"stock"`` (handed to the original processor).
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
    block_inputs: Dict[str, Tensor] = field(default_factory=dict)
    _generators: Dict[str, torch.Generator] = field(default_factory=dict)
    _run_seed: Optional[int] = None
    _last_timestep: Optional[float] = None
    _counted_step: int = 0
    _callback_step: Optional[int] = None
    _pending_new: bool = False
    pipeline: Any = None  # weakref.ref to the patched pipeline, if a pipeline was patched
    _seen_timesteps: Any = None

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


class AgentSDProcessor:
    """Diffusers attention processor running token merging + agent attention (AgentSD), or ToDo.

    Args:
        state: the shared :class:`AgentSDState` of the UNet.
        original: the layer's processor before patching; used for the calls AgentSD does not
            handle and restored by ``remove_agentsd``.
        name: the layer's module name (for messages).
        level: the layer's downsampling factor known from the UNet structure, or ``None``.
    """

    def __init__(self, state: AgentSDState, original: Any, name: str = "", level: Optional[int] = None):
        self.state = state
        self.original = original
        self.name = name
        self.level = level

    def __repr__(self) -> str:
        return f"AgentSDProcessor(name={self.name!r}, level={self.level})"

    def _grid(self, hidden_states: Tensor) -> Optional[Tuple[int, int, int]]:
        state = self.state
        if state.latent_hw is None:
            return None
        if hidden_states.ndim == 4:
            n = hidden_states.shape[2] * hidden_states.shape[3]
        else:
            n = hidden_states.shape[1]
        grid = latent_grid(n, state.latent_hw)
        if grid is None or grid[0] > state.max_downsample:
            return None
        return grid

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        state = self.state
        grid = None
        if encoder_hidden_states is None and attention_mask is None and not kwargs:
            grid = self._grid(hidden_states)
        if grid is None:
            state.calls["stock"] += 1
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )

        settings = state.settings
        hw = grid[1:]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        precision = settings.attn_precision
        fp32 = precision == "fp32" or (precision is None and getattr(attn, "upcast_attention", False))

        if settings.method == "agentsd":
            out = self._agentsd(attn, hidden_states, hw, settings, fp32)
        else:
            out = self._todo(attn, hidden_states, hw, settings, fp32)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out

    # ------------------------------------------------------------------ paths
    def _agentsd(self, attn, hidden_states: Tensor, hw, settings: AgentSDSettings, fp32: bool) -> Tensor:
        state = self.state
        batch = hidden_states.shape[0]
        metric = state.block_inputs.pop(self.name, None)
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            metric = hidden_states  # called outside a hooked block (a bare Attention layer)
            state.calls["metric=attention input"] += 1
        use_rand = settings.use_rand and batch % 2 == 0
        match = match_tokens(
            metric, hw, sx=settings.sx, sy=settings.sy, ratio=settings.ratio,
            agent_ratio=settings.agent_ratio, use_rand=use_rand,
            generator=state.generator(hidden_states.device) if use_rand else None, fp32=fp32,
        )
        tokens = match.merge(hidden_states)
        query, key, value = project(tokens, [attn.to_q, attn.to_k, attn.to_v])
        agents = None
        if match.has_agents:  # to_q(agents) = the agents' mean of the merged rows' to_q input
            agents = attn.to_q(match.agents_from_merged(tokens))
        out = self._attend(attn, query, key, value, agents, settings, fp32)
        state.calls["agent" if agents is not None else "tome"] += 1
        return match.unmerge(self._to_out(attn, out))

    def _todo(self, attn, hidden_states: Tensor, hw, settings: AgentSDSettings, fp32: bool) -> Tensor:
        f = float(settings.todo_factor)
        kv_hw = pooled_size(hw, f, f)
        pooled = pool_tokens(hidden_states, hw, kv_hw)
        agents = None
        n_kv = kv_hw[0] * kv_hw[1]
        if settings.method == "todo+agents":
            agent_hw = pooled_size(hw, settings.sy, settings.sx)
            if 2 * agent_hw[0] * agent_hw[1] < n_kv:
                agents = attn.to_q(pool_tokens(hidden_states, hw, agent_hw))
        if agents is None:
            query = attn.to_q(hidden_states)
            key, value = project(pooled, [attn.to_k, attn.to_v])
            shortcut = None
        else:  # the full values for the shortcut; pooled values = pooled full values (affine map)
            query, shortcut = project(hidden_states, [attn.to_q, attn.to_v])
            key = attn.to_k(pooled)
            value = pool_tokens(shortcut, hw, kv_hw)
        out = self._attend(attn, query, key, value, agents, settings, fp32, shortcut=shortcut)
        self.state.calls["todo+agents" if agents is not None else "todo"] += 1
        return self._to_out(attn, out)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _attend(attn, query, key, value, agents, settings, fp32, shortcut=None) -> Tensor:
        """Attention on (B, n, heads·d) tensors; returns (B, n, heads·d) in the query's dtype."""
        batch, heads = query.shape[0], attn.heads
        head_dim = key.shape[-1] // heads
        split = lambda t: t.view(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(query), split(key), split(value)
        a = None if agents is None else split(agents)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
            a = None if a is None else attn.norm_q(a)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        s = split(shortcut) if shortcut is not None else v
        dtype = q.dtype
        if fp32 and dtype != torch.float32:
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = _attention(q.float(), k.float(), v.float(), None if a is None else a.float(),
                                 s.float(), float(attn.scale), settings)
            out = out.to(dtype)
        else:
            out = _attention(q, k, v, a, s, float(attn.scale), settings)
        return out.transpose(1, 2).reshape(batch, -1, heads * head_dim)

    @staticmethod
    def _to_out(attn, out: Tensor) -> Tensor:
        return attn.to_out[1](attn.to_out[0](out))


def _attention(q, k, v, agents, shortcut, scale: float, settings: AgentSDSettings) -> Tensor:
    if agents is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = agent_attention(q, k, v, agents, scale=scale, query_scale=scale ** settings.k_scale2)
    if out.requires_grad:  # SDPA's backward needs its output
        return out + settings.k_shortcut * shortcut
    return out.add_(shortcut, alpha=settings.k_shortcut)  # in place: a fresh tensor of SDPA
