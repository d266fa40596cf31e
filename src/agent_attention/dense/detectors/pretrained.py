"""Released detectors by name: build the official configuration and load its weights.

The file is downloaded once and kept as ``.safetensors`` in the cache by
:func:`agent_attention.dense.pretrained.fetch_release` (safe loader, no code unpickled); its
``state_dict`` is checked against the detector's layout through the official key map first.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from torch import Tensor

from ..releases import get_release
from . import build_detector
from .detector import Detector

__all__ = ["build_released_detector", "pretrained_detector", "check_official_layout"]


def build_released_detector(name: str, *, test_cfg: Optional[Dict[str, dict]] = None, **kwargs) -> Detector:
    """The detector of a released name (``mask_rcnn_agent_swin_t_1x`` …), randomly initialised, with the
    official settings (80 classes, 800 × 1333, the config's drop-path rate for training)."""
    r = get_release(name, task="det")
    bb_kwargs = dict(drop_path_rate=r.drop_path_rate, **r.backbone_kwargs)
    bb_kwargs.update(kwargs.pop("backbone_kwargs", None) or {})
    return build_detector(r.head, r.backbone, r.num_classes, backbone_kwargs=bb_kwargs, test_cfg=test_cfg, **kwargs)


def check_official_layout(model: Detector, state: Mapping[str, Tensor], name: str = "the detector") -> None:
    """One-line ValueError unless ``state`` (official keys) fits ``model`` exactly."""
    own = model.state_dict()
    mapped = {model.official_to_ours(k): v for k, v in state.items()}
    bad = sorted(set(own) ^ set(mapped)) + sorted(k for k in set(own) & set(mapped)
                                                  if tuple(own[k].shape) != tuple(mapped[k].shape))
    if bad:
        raise ValueError(f"{len(state)} tensors, {len(bad)} keys differ from the {name} layout (e.g. {bad[0]!r})")


def pretrained_detector(name: str, *, checkpoint=None, url: Optional[str] = None, cache=None,
                        progress: Optional[bool] = None, test_cfg: Optional[Dict[str, dict]] = None) -> Detector:
    """A released detector with its weights (downloaded once, or ``checkpoint``: a local official
    ``.pth`` / safetensors file), in eval mode."""
    from safetensors.torch import load_file

    from ..pretrained import fetch_release, load_release_state

    model = build_released_detector(name, test_cfg=test_cfg)
    if checkpoint is not None:
        state = load_release_state(checkpoint)
        check_official_layout(model, state, name)
    else:
        path = fetch_release(name, url=url, cache=cache, progress=progress,
                             verify=lambda s: check_official_layout(model, s, name))
        state = load_file(str(path))
    model.load_official(state, strict=True)
    return model.eval()
