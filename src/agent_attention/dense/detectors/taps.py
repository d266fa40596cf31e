"""Intermediate outputs ("taps") of the detectors, recorded on request for parity checks.

``with recording() as taps: model.predict(...)`` fills ``taps`` with the tensors the official
references store under the same names (``rpn_head.cls_score.0``, ``roi.1.bbox_pred`` …).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Dict, Iterator, Optional

from torch import Tensor

_TAPS: ContextVar[Optional[Dict[str, Tensor]]] = ContextVar("detector_taps", default=None)


def tap(name: str, value: Tensor) -> None:
    taps = _TAPS.get()
    if taps is not None:
        taps[name] = value.detach().clone()


@contextmanager
def recording() -> Iterator[Dict[str, Tensor]]:
    taps: Dict[str, Tensor] = {}
    token = _TAPS.set(taps)
    try:
        yield taps
    finally:
        _TAPS.reset(token)
