"""Optimizers and learning-rate schedules: the official classification recipe and the
dense recipes, with one parameter-group rule for both."""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Set, Tuple

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from torch import nn

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "no_decay_names", "build_dense_scheduler",
           "MMCVMultiStepLRScheduler", "MMCVPolyLRScheduler"]


def _model_set(model: nn.Module, attr: str) -> Set[str]:
    fn = getattr(model, attr, None)
    return set(fn()) if callable(fn) else set()


def no_decay_names(model: nn.Module) -> Tuple[Set[str], Set[str]]:
    """The model's ``no_weight_decay()`` names and ``no_weight_decay_keywords()`` keywords."""
    return _model_set(model, "no_weight_decay"), _model_set(model, "no_weight_decay_keywords")


def _model_no_decay(model: nn.Module) -> Set[str]:
    """Full names of the parameters that the model, or any submodule (the backbone inside a detector),
    excludes from weight decay through ``no_weight_decay()`` / ``no_weight_decay_keywords()``."""
    names = [n for n, _ in model.named_parameters()]
    skip: Set[str] = set()
    for prefix, module in model.named_modules():
        exact, keywords = no_decay_names(module)
        if not exact and not keywords:
            continue
        pre = f"{prefix}." if prefix else ""
        for n in names:
            if n.startswith(pre):
                rel = n[len(pre):]
                if rel in exact or any(k in rel for k in keywords):
                    skip.add(n)
    return skip


def param_groups(model: nn.Module, weight_decay: float, *, no_decay_1d: bool = True, model_no_decay: bool = True,
                 no_decay_keys: Sequence[str] = ()) -> List[Dict]:
    """AdamW groups ``[decay, no_decay]`` (the second left out when empty). A trainable parameter gets
    no weight decay when

    * ``no_decay_1d`` and it is 1-D or its name ends in ``.bias`` (the official classification rule,
      as timm's ``param_groups_weight_decay``; the ≥2-D agent biases ``an_bias`` ... are decayed);
    * ``model_no_decay`` and the model or a submodule lists it in ``no_weight_decay()`` or its name
      (below that module) contains one of its ``no_weight_decay_keywords()``;
    * its name contains one of ``no_decay_keys`` (mmcv's ``paramwise_cfg.custom_keys`` with
      ``decay_mult=0`` of the dense recipes, e.g. ``norm``).

    Classification: the defaults. Dense recipes: ``no_decay_1d=False`` (mmcv decays biases and 1-D
    parameters unless a custom key names them), ``model_no_decay`` and ``no_decay_keys`` from the recipe.
    """
    skip = _model_no_decay(model) if model_no_decay else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ((no_decay_1d and (p.ndim == 1 or name.endswith(".bias"))) or name in skip
                or any(k in name for k in no_decay_keys)):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float = 1e-8,
                    betas: Iterable[float] = (0.9, 0.999), **rule) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (``rule``: its keyword arguments)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, **rule), lr=lr, eps=eps, betas=tuple(betas),
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


# ------------------------------------------------------------------------------- dense (mmcv) schedules
class _MMCVWarmup:
    """mmcv's linear warm-up over a timm decay schedule, stepped per iteration with ``step_update(t)``.

    Why not timm's own ``warmup_t``: timm's warm-up interpolates from ``warmup_lr_init`` to the *base*
    lr and ignores the decay meanwhile; mmcv (the official detection/segmentation code) multiplies the
    *decayed* lr by ``1 - (1 - t / warmup_iters) · (1 - warmup_ratio)``. That matters when the decay
    starts inside the warm-up (the poly schedule of UperNet 160k decays from step 0). timm computes
    the decay factor (its rule on unit base values); the lr is ``base · (factor · warm-up)``, the
    operation order of the former ``dense.engine.Schedule``, so every lr is bit-identical to it.
    """

    def _setup_mmcv(self, warmup_iters: int, warmup_ratio: float) -> None:
        self.mmcv_warmup_iters, self.mmcv_warmup_ratio = int(warmup_iters), float(warmup_ratio)
        self.lr_base, self.base_values = list(self.base_values), [1.0] * len(self.base_values)
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> List[float]:
        factors = super()._get_lr(t)
        if t < self.mmcv_warmup_iters:
            warm = 1 - (1 - t / self.mmcv_warmup_iters) * (1 - self.mmcv_warmup_ratio)
            factors = [f * warm for f in factors]
        return [b * f for b, f in zip(self.lr_base, factors)]


class MMCVMultiStepLRScheduler(_MMCVWarmup, MultiStepLRScheduler):
    """mmcv ``step`` policy: ×``gamma`` at each milestone (iterations: ``t >= m``), mmcv warm-up."""

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_ratio: float = 1e-3):
        # timm's milestone m applies at t == m - 1 (its documented convention): pass m + 1
        super().__init__(optimizer, decay_t=sorted(int(m) + 1 for m in milestones), decay_rate=gamma,
                         t_in_epochs=False)
        self._setup_mmcv(warmup_iters, warmup_ratio)


class MMCVPolyLRScheduler(_MMCVWarmup, PolyLRScheduler):
    """mmcv ``poly`` policy: ``(1 - t / total) ** power`` down to 0 at ``total``, mmcv warm-up."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9,
                 warmup_iters: int = 0, warmup_ratio: float = 1e-3):
        super().__init__(optimizer, t_initial=int(total_steps), power=power, lr_min=0.0, t_in_epochs=False)
        self._setup_mmcv(warmup_iters, warmup_ratio)


def build_dense_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, *, warmup_iters: int = 0,
                          warmup_ratio: float = 1e-3, milestones: Sequence[int] = (), power: float = 0.9):
    """The per-iteration schedule of a dense recipe: ``step`` (detection) or ``poly`` (segmentation)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
    if kind == "step":
        return MMCVMultiStepLRScheduler(optimizer, milestones, warmup_iters=warmup_iters, warmup_ratio=warmup_ratio)
    if kind == "poly":
        return MMCVPolyLRScheduler(optimizer, total_steps, power, warmup_iters=warmup_iters, warmup_ratio=warmup_ratio)
    raise ValueError(f"schedule kind must be 'step' or 'poly', got {kind!r}")
