"""Which blocks use which AgentSD settings at which denoising steps: one schedule for every denoiser.

An :class:`AgentSDConfig` is a list of :class:`Rule` s.  At a step, the settings of a block are those
of the first rule that selects both the block and the step; a block no rule selects runs its stock
attention.  ``Rule(None, ...)`` turns blocks off explicitly.

    >>> from agent_attention.diffusion import AgentSDConfig, AgentSDSettings, Rule
    >>> paper = AgentSDConfig.paper()        # agents for the first 40 % of the steps, then ToMe
    >>> dit = AgentSDConfig([
    ...     Rule(None, blocks="last:2"),                                 # the last two blocks exact
    ...     Rule(AgentSDSettings(), steps=(0.0, 0.5)),                   # agents in the first half
    ...     Rule(AgentSDSettings(method="todo"), blocks=range(0, 8)),    # then ToDo in blocks 0-7
    ... ])
    >>> dit.settings_for(step=30, num_steps=50, block=3, num_blocks=28).method
    'todo'

Blocks are the indices of the patched attention blocks in model order (``adapter.layers``):
``None`` (all), an int, a ``range``/``slice``/sequence of ints (negative from the end), or the
strings ``"first:K"``, ``"last:K"``, ``"A:B"``.  Steps are ``None`` (all) or ``(start, stop)``,
``stop=None`` for the end: ints are step indices (the paper's ``(0, 20)`` of 50), floats fractions
of the run (``(0.0, 0.4)``), which need the number of steps (known when a pipeline is patched; for a
bare model set ``num_inference_steps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

from .settings import AgentSDSettings

__all__ = ["AgentSDConfig", "Rule", "PAPER_LATE", "select_blocks"]

PAPER_LATE = dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)


def select_blocks(spec: Any, num_blocks: int) -> Tuple[int, ...]:
    """The block indices ``spec`` selects among ``num_blocks`` (see the module docstring)."""
    if spec is None:
        return tuple(range(num_blocks))
    if isinstance(spec, str):
        head, sep, tail = spec.partition(":")
        try:
            if head in ("first", "last"):
                k = int(tail)
                if k < 0:
                    raise ValueError
                spec = slice(0, k) if head == "first" else slice(max(num_blocks - k, 0), num_blocks)
            elif sep:
                spec = slice(int(head) if head else None, int(tail) if tail else None)
            else:
                spec = int(head)
        except ValueError:
            raise ValueError(f"AgentSD: blocks={spec!r}: expected 'first:K', 'last:K', 'A:B' or an index") from None
    if isinstance(spec, slice):
        return tuple(range(num_blocks))[spec]
    if isinstance(spec, bool):
        raise TypeError(f"AgentSD: blocks must be indices, got {spec!r}")
    if isinstance(spec, int):
        spec = (spec,)
    try:
        indices = [int(i) for i in spec]
    except TypeError:
        raise TypeError(f"AgentSD: blocks must be None, an int, a range/slice/list of ints or a string, got {spec!r}") from None
    return tuple(sorted({i % num_blocks for i in indices if -num_blocks <= i < num_blocks}))


def _check_steps(steps: Any) -> Optional[Tuple[Any, Any]]:
    if steps is None:
        return None
    try:
        start, stop = steps
    except (TypeError, ValueError):
        raise TypeError(f"AgentSD: steps must be None or (start, stop), got {steps!r}") from None
    values = [v for v in (start, stop) if v is not None]
    kinds = {type(v) for v in values}
    if start is None or kinds - {int, float} or len(kinds) > 1 or any(isinstance(v, bool) for v in values):
        raise TypeError(f"AgentSD: steps=(start, stop) must be two ints (step indices) or two floats "
                        f"(fractions of the run; stop may be None), got {steps!r}")
    if float in kinds and not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"AgentSD: step fractions must be in [0, 1], got {steps!r}")
    if any(v < 0 for v in values) or (stop is not None and stop <= start):
        raise ValueError(f"AgentSD: steps=(start, stop) must satisfy 0 <= start < stop, got {steps!r}")
    return (start, stop)


@dataclass(frozen=True)
class Rule:
    """``settings`` (``None``: stock attention) for the ``blocks`` during the ``steps``."""

    settings: Optional[AgentSDSettings] = field(default_factory=AgentSDSettings)
    blocks: Any = None
    steps: Any = None

    def __post_init__(self) -> None:
        if self.settings is not None and not isinstance(self.settings, AgentSDSettings):
            raise TypeError(f"AgentSD: Rule.settings must be AgentSDSettings or None, got {type(self.settings).__name__}")
        object.__setattr__(self, "steps", _check_steps(self.steps))
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        select_blocks(self.blocks, 1)  # validates the spelling

    @property
    def uses_fractions(self) -> bool:
        return self.steps is not None and isinstance(self.steps[0], float)

    def covers_step(self, step: int, num_steps: Optional[int]) -> bool:
        if self.steps is None:
            return True
        start, stop = self.steps
        if self.uses_fractions and step > 0:
            if not num_steps:
                raise RuntimeError(
                    "AgentSD: a rule gives steps as fractions of the run but the number of steps is unknown; "
                    "patch the pipeline (not the bare model) or set AgentSDConfig(num_inference_steps=...)")
            at = step / num_steps
        elif self.uses_fractions:
            at = 0.0  # the first step is at 0 whatever the length of the run
        else:
            at = step
        return at >= start and (stop is None or at < stop)


@dataclass(frozen=True)
class AgentSDConfig:
    """The AgentSD configuration of one denoiser: :class:`Rule` s, first match wins.

    Attributes:
        rules: the rules (a single :class:`~.settings.AgentSDSettings` is one rule for everything).
        num_inference_steps: the run's number of steps, for step fractions on a bare model (a
            patched pipeline reports its own).
    """

    rules: Sequence[Rule] = (Rule(),)
    num_inference_steps: Optional[int] = None

    def __post_init__(self) -> None:
        rules = self.rules
        if isinstance(rules, (AgentSDSettings, Rule)):
            rules = (rules,)
        rules = tuple(Rule(r) if isinstance(r, AgentSDSettings) else r for r in rules)
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise TypeError("AgentSDConfig: rules must be a non-empty list of Rule or AgentSDSettings")
        object.__setattr__(self, "rules", rules)
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"AgentSDConfig: num_inference_steps must be a positive int, got {n!r}")

    @classmethod
    def paper(cls, switch: Any = 20, early: Optional[dict] = None, late: Optional[dict] = None) -> "AgentSDConfig":
        """The paper's schedule: agents (``sx=sy=4, ratio=0.4, agent_ratio=0.95``) before ``switch``
        (a step index, or a fraction of the run), then ToMe (``sx=sy=2, agent_ratio=0.5``)."""
        first = AgentSDSettings().updated(**(early or {}))
        second = first.updated(**(PAPER_LATE if late is None else late))
        kind = float if isinstance(switch, float) else int
        return cls((Rule(first, steps=(kind(0), switch)), Rule(second, steps=(switch, None))))

    @property
    def uses_fractions(self) -> bool:
        return any(r.uses_fractions for r in self.rules)

    def settings_for(self, step: int, num_steps: Optional[int], block: int, num_blocks: int) -> Optional[AgentSDSettings]:
        """The settings of block ``block`` (of ``num_blocks``) at step ``step``; ``None``: stock."""
        num_steps = num_steps or self.num_inference_steps
        for rule in self.rules:
            if block in select_blocks(rule.blocks, num_blocks) and rule.covers_step(step, num_steps):
                return rule.settings
        return None

    def check_blocks(self, num_blocks: int) -> None:
        """Raise if a rule selects none of the ``num_blocks`` blocks, or no rule turns anything on."""
        for rule in self.rules:
            if not select_blocks(rule.blocks, num_blocks):
                raise ValueError(f"AgentSD: blocks={rule.blocks!r} selects none of the {num_blocks} attention blocks")
        if all(r.settings is None for r in self.rules):
            raise ValueError("AgentSD: every rule is off (settings=None): nothing would be accelerated")
