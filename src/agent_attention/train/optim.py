"""Optimizer and learning-rate schedule of the official recipe (spec §4.3)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Set, Tuple

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "no_decay_names"]


def _model_set(model: nn.Module, attr: str) -> Set[str]:
    fn = getattr(model, attr, None)
    return set(fn()) if callable(fn) else set()


def no_decay_names(model: nn.Module) -> Tuple[Set[str], Set[str]]:
    """The model's ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` keywords."""
    return _model_set(model, "no_weight_decay"), _model_set(model, "no_weight_decay_keywords")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups, the official rule: no decay for parameters that are 1-D, whose name ends
    in ``.bias``, that are in ``no_weight_decay()`` or contain a ``no_weight_decay_keywords()``
    keyword; everything else (including the ≥2-D agent biases ``an_bias`` ...) is decayed."""
    skip, keywords = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float = 1e-8,
                    betas: Iterable[float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=eps, betas=tuple(betas),
                             weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, warmup_epochs: int, updates_per_epoch: int,
                    min_lr: float, warmup_lr: float) -> CosineLRScheduler:
    """timm ``CosineLRScheduler`` stepped per iteration (``t_in_epochs=False``): cosine over
    ``epochs · iters`` steps from the optimizer's lr to ``min_lr``, linear warm-up from
    ``warmup_lr`` over ``warmup_epochs · iters`` steps on the absolute step (no warm-up prefix);
    after the cosine (cool-down epochs) the lr stays at ``min_lr``."""
    return CosineLRScheduler(
        optimizer, t_initial=int(epochs * updates_per_epoch), lr_min=min_lr, warmup_lr_init=warmup_lr,
        warmup_t=int(warmup_epochs * updates_per_epoch), cycle_limit=1, t_in_epochs=False, warmup_prefix=False,
    )
