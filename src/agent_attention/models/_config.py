"""Constructor-argument parsing shared by the model families.

Per-stage values (``'a-b-c-d'`` strings, one value for all stages, or lists), agent counts,
the ``attn_type`` letters and the norm layer as the official configs spell them.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, List, Sequence, Union

from torch import nn

AgentNum = Union[int, str, Sequence[Union[int, str]]]

__all__ = ["AgentNum", "resolve_norm_layer", "per_stage", "parse_int_list", "parse_agent_num", "parse_attn_type"]


def resolve_norm_layer(norm_layer) -> Callable[..., nn.Module]:
    """``None`` / ``"LayerNorm"`` (as the manifests spell it) -> ``nn.LayerNorm`` with eps 1e-5."""
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() in ("layernorm", "ln")):
        return partial(nn.LayerNorm, eps=1e-5)
    if isinstance(norm_layer, str):
        raise ValueError(f"unknown norm_layer {norm_layer!r}; pass 'LayerNorm' or a callable")
    return norm_layer


def per_stage(value, num: int, what: str, *, cast=int, truncate: bool = False, positive: bool = True) -> list:
    """One value per stage from a scalar (all stages), a ``'a-b-c'`` string or a sequence.

    ``truncate``: a longer sequence keeps its first ``num`` entries (the official PVT does so for
    ``num_stages < 4``); otherwise the length must be ``num``.
    """
    if isinstance(value, str):
        value = value.split("-")
    elif isinstance(value, (int, float)):
        value = [value] * num
    try:
        out = [cast(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or {num} numbers, got {value!r}") from None
    if truncate and len(out) > num:
        out = out[:num]
    if len(out) != num or (positive and any(v <= 0 for v in out)):
        if truncate and len(out) < num:
            raise ValueError(f"{what} needs {num} entries (one per stage), got {value}")
        raise ValueError(f"{what} must have {num} positive entries (one per stage), got {value!r}")
    return out


def parse_int_list(value, num: int, what: str) -> List[int]:
    """An int, a ``'a-b-c-d'`` string or a sequence of ints/strings -> ``num`` positive ints."""
    return per_stage(value, num, what)


def parse_agent_num(agent_num: AgentNum) -> List[int]:
    """Agent counts as a list of ints from an int, ``"9-16-49-49"``, or a list of ints/strings."""
    if isinstance(agent_num, str):
        items: Sequence = agent_num.split("-")
    elif isinstance(agent_num, int):
        items = [agent_num]
    else:
        items = list(agent_num)
    try:
        out = [int(a) for a in items]
    except (TypeError, ValueError):
        raise ValueError(f"agent_num must be an int or a list of ints, got {agent_num!r}") from None
    if not out or any(a <= 0 for a in out):
        raise ValueError(f"agent_num must be positive, got {agent_num!r}")
    return out


def parse_attn_type(attn_type: str, depths: Sequence[int]) -> List[List[bool]]:
    """Per stage, per block: ``True`` for agent attention.

    One letter per stage: ``'A'`` agent, ``'B'`` the family's own attention, ``'M'`` mixed, where the
    integer after the letters (``'AAMB2'``) is how many leading blocks of an ``'M'`` stage are agent
    blocks.
    """
    n = len(depths)
    if not isinstance(attn_type, str) or len(attn_type) < n:
        raise ValueError(f"attn_type must be a string with one letter per stage ({n}), got {attn_type!r}")
    letters, rest = attn_type[:n].upper(), attn_type[n:]
    if any(c not in "ABM" for c in letters):
        raise ValueError(f"attn_type letters must be A (agent), B (original) or M (mixed), got {attn_type!r}")
    mixed = 0
    if "M" in letters or rest:
        if not re.fullmatch(r"\d+", rest):
            raise ValueError(f"attn_type {attn_type!r}: an 'M' stage needs the agent block count after the letters, e.g. 'AAMB2'")
        mixed = int(rest)
    plan = []
    for c, d in zip(letters, depths):
        if c == "M" and mixed > d:
            raise ValueError(f"attn_type {attn_type!r}: {mixed} agent blocks requested in a stage of depth {d}")
        plan.append([c == "A" or (c == "M" and j < mixed) for j in range(d)])
    return plan
