"""Validation of recipe values: the allowed range of every numeric field, relations between fields,
and which fields a resumed run must share with its checkpoint.

Every check raises a one-line ``ValueError`` naming the field and what is allowed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["RANGES", "check_range", "validate", "RESUME_IGNORED", "recipe_diff"]


# --------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class _Range:
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False
    note: str = ""  # what special values mean, appended to the message

    def ok(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


_PIXELS = "a fraction of the 0-1 pixel range, not 0-255"
_POS, _NONNEG, _ONE_UP = _Range(0, lo_open=True), _Range(0), _Range(1)
_PROB, _RATE = _Range(0, 1), _Range(0, 1, hi_open=True)
#: allowed values of the numeric fields (each element for lists); every float must also be finite
RANGES: Dict[str, _Range] = {
    "num_classes": _ONE_UP, "drop_path": _RATE, "model_ema_decay": _PROB, "img_size": _ONE_UP,
    "crop_pct": _Range(0, 1, lo_open=True), "mean": _Range(0, 1, note=_PIXELS), "std": _Range(0, 1, lo_open=True, note=_PIXELS), "batch_size": _ONE_UP, "eval_batch_size": _ONE_UP,
    "num_workers": _NONNEG, "train_subset": _ONE_UP, "val_subset": _ONE_UP, "val_fraction": _Range(0, 1, True, True),
    "scale": _Range(0, 1, lo_open=True), "ratio": _POS, "hflip": _PROB, "color_jitter": _NONNEG, "reprob": _PROB,
    "recount": _ONE_UP, "mixup": _Range(0, note="0: off"), "cutmix": _Range(0, note="0: off"),
    "cutmix_minmax": _Range(0, 1, lo_open=True), "mixup_prob": _PROB, "mixup_switch_prob": _PROB,
    "label_smoothing": _RATE, "repeated_aug": _Range(0, note="0: off"), "epochs": _ONE_UP, "warmup_epochs": _NONNEG,
    "cooldown_epochs": _NONNEG, "base_lr": _POS, "warmup_lr": _NONNEG, "min_lr": _NONNEG,
    "lr_scale_batch": _ONE_UP, "weight_decay": _NONNEG, "opt_eps": _POS, "opt_betas": _RATE,
    "clip_grad": _Range(0, note="0 or none: no clipping"), "accum_steps": _ONE_UP, "seed": _Range(0, 2**63 - 1),
    "save_freq": _Range(0, note="0: no checkpoint-<epoch>.pth"), "keep_ckpts": _Range(0, note="0: keep all"),
    "ckpt_every_steps": _Range(0, note="0: only at epoch ends"), "eval_freq": _ONE_UP,
    "print_freq": _Range(0, note="0: never"), "threads": _ONE_UP,
}
#: list fields with a fixed length, and those whose two values are a (low, high) pair
_LENGTHS = {"scale": 2, "ratio": 2, "cutmix_minmax": 2, "opt_betas": 2, "mean": 3, "std": 3}
_WHY = {"mean": " (one per RGB channel: images are read as RGB)", "std": " (one per RGB channel: images are read as RGB)"}
_PAIRS = ("scale", "ratio", "cutmix_minmax")


def check_range(name: str, value: Any) -> Any:
    """``value`` if it is allowed for field ``name`` (:data:`RANGES`, finite floats, list lengths), else a
    one-line ValueError naming the field and the allowed range."""
    if value is None or isinstance(value, (str, bool, dict)):
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if name in _LENGTHS and len(items) != _LENGTHS[name]:
        raise ValueError(f"recipe field {name!r} needs {_LENGTHS[name]} values{_WHY.get(name, '')}, got {value!r}")
    if isinstance(value, (list, tuple)) and not items:
        raise ValueError(f"recipe field {name!r} needs at least one value, got {value!r}")
    r = RANGES.get(name)
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"recipe field {name!r} must be a finite number, got {value!r}")
        if r is not None and isinstance(v, (int, float)) and not r.ok(v):
            note = f" ({r.note})" if r.note else ""
            raise ValueError(f"recipe field {name!r} must be {r.text()}{note}, got {value!r}")
    if name in _PAIRS and items[0] > items[1]:
        raise ValueError(f"recipe field {name!r} is a (low, high) pair: low must be <= high, got {value!r}")
    return value


def validate(cfg: Mapping[str, Any], warn: bool = True) -> None:
    """Check every field's range (:func:`check_range`) and the relations between fields.

    ``warmup_epochs`` must be ``<= epochs`` (a warning when equal: the cosine decay never starts).
    """
    for name, value in cfg.items():
        check_range(name, value)
    warm, epochs = cfg.get("warmup_epochs"), cfg.get("epochs")
    if isinstance(warm, int) and isinstance(epochs, int):
        if warm > epochs:
            raise ValueError(f"recipe field 'warmup_epochs' must be <= epochs ({epochs}), got {warm}")
        if warm == epochs and warn:
            warnings.warn(f"warmup_epochs ({warm}) >= epochs ({epochs}): the lr warms up for the whole run and the "
                          "cosine decay never starts", UserWarning, stacklevel=2)


#: fields that may differ between a checkpoint and the run resuming it (paths, logging, speed knobs)
RESUME_IGNORED = frozenset({
    "data", "output", "resume", "resume_override", "device", "num_workers", "pin_memory", "eval_batch_size",
    "eval_freq", "print_freq", "progress", "plot", "export", "save_freq", "keep_ckpts", "ckpt_every_steps",
    "threads", "compile", "finetune_from", "pretrained",
})


def recipe_diff(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> List[str]:
    """``field: saved -> current`` for each field (not in :data:`RESUME_IGNORED`) whose value differs
    between a checkpoint's recipe and the current one; a field missing from ``saved`` counts as its default."""
    out = []
    for name, default in defaults.items():
        if name in RESUME_IGNORED or name not in current:
            continue
        old, new = saved.get(name, default), current[name]
        if not _same(old, new):
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b
