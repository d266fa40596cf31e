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

__all__ = ["build_released_detector", "pretrained_detector", "check_official_layout", "init_from_official"]


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


#: class-specific layers (official keys end with these): re-initialised when the class count differs
CLASS_LAYERS = ("fc_cls.weight", "fc_cls.bias", "fc_reg.weight", "fc_reg.bias", "conv_logits.weight",
                "conv_logits.bias", "retina_cls.weight", "retina_cls.bias")


def init_from_official(model: Detector, source: str, *, cache=None, progress: Optional[bool] = None) -> Dict[str, object]:
    """Start ``model`` from a released detector (``source``: a release name, or a local official
    ``.pth`` / safetensors file) to fine-tune it. Every entry must fit, except the class-specific
    layers when the data has another number of classes (those keep their fresh initialisation).
    Returns ``{"loaded": n, "fresh": [keys]}``."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..pretrained import fetch_release, load_release_state
    from ..releases import CONFIGS

    if source in CONFIGS:
        state = load_file(str(fetch_release(source, cache=cache, progress=progress)))
    elif Path(source).is_file():
        state = load_release_state(source)
    else:
        raise ValueError(f"--init {source!r} is neither a detection release name nor a file")
    own = model.state_dict()
    mapped, fresh, bad = {}, [], []
    for k, v in state.items():
        ours = model.official_to_ours(k)
        if ours not in own:
            bad.append(f"unexpected {k!r}")
        elif tuple(own[ours].shape) != tuple(v.shape):
            (fresh if k.endswith(CLASS_LAYERS) else bad).append(k if k.endswith(CLASS_LAYERS) else
                                                               f"{k!r} {tuple(v.shape)} vs {tuple(own[ours].shape)}")
        else:
            mapped[ours] = v
    missing = sorted(set(own) - set(mapped) - {model.official_to_ours(k) for k in fresh})
    if bad or missing:
        example = (bad or [f"missing {missing[0]!r}"])[0]
        raise ValueError(f"{source} does not fit this {model.kind} ({len(bad)} mismatched or unexpected, "
                         f"{len(missing)} missing entries, e.g. {example})")
    model.load_state_dict(mapped, strict=False)
    return {"loaded": len(mapped), "fresh": fresh}
