"""Released detection / segmentation weights: download, safe loading, the cache.

The released files are mmdetection / mmsegmentation training checkpoints (``state_dict``, ``meta``,
``optimizer``). :func:`fetch_release` downloads one (once), reads it with the package's safe loader
(no code is unpickled), checks its ``state_dict`` with the caller's ``verify`` (the model's key map
and layout), and keeps only the weights, as ``.safetensors`` in the cache shared with the
classifiers (``$AGENT_ATTENTION_CACHE``, else ``torch.hub``'s folder)::

    <cache>/dense/upernet_agent_swin_t_160k-280481ee.safetensors

Later calls read only that file. ``$AGENT_ATTENTION_WEIGHTS_URL`` (a template with ``{id}`` /
``{name}``) points every release at a mirror. :func:`pretrained_segmenter` builds a released
segmenter and loads its weights in one call.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from torch import Tensor

from .._errors import one_line
from .releases import DenseRelease, get_release

__all__ = ["fetch_release", "load_release_state", "release_cache_path", "build_released_segmenter",
           "pretrained_segmenter"]


def release_cache_path(name: str, url: str, cache=None) -> Path:
    """Cache file of ``name`` downloaded from ``url`` (tagged by the file id, or a hash of another URL)."""
    from ..weights.pretrained import cache_dir

    r = get_release(name)
    tag = r.file_id[:8] if (r.file_id and url in (r.url, r.official_url)) else hashlib.sha256(url.encode()).hexdigest()[:8]
    return cache_dir(cache) / "dense" / f"{name}-{tag}.safetensors"


def fetch_release(name: str, *, url: Optional[str] = None, cache=None, progress: Optional[bool] = None,
                  verify: Optional[Callable[[Dict[str, Tensor]], None]] = None) -> Path:
    """Download (once) the released weights of ``name``; returns the cached ``.safetensors`` path.

    ``verify(state)`` raises a ValueError when the file's ``state_dict`` does not fit the model.
    Errors are one line: no release, download errors (:class:`WeightsDownloadError`), unsafe or
    damaged files, wrong model.
    """
    from ..weights.download import download_file
    from ..weights.safe_load import UnsafeCheckpointError, _is_safetensors, load_checkpoint, select_state_dict
    from ..weights.safe_save import export_safetensors
    from ..weights.pretrained import ENV_PROGRESS

    r = get_release(name)
    url = url or r.url
    if not url:
        raise ValueError(f"{name} has no released file (the official repository gives no link); "
                         f"pass a local checkpoint instead")
    target = release_cache_path(name, url, cache)
    if target.is_file():
        with open(target, "rb") as f:
            if _is_safetensors(f.read(16)):
                return target
        target.unlink()  # not ours (or damaged): fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = target.with_suffix(".pth")
    if progress is None:
        progress = os.environ.get(ENV_PROGRESS, "1").strip().lower() not in ("0", "false", "no", "off")
    sha256 = download_file(url, raw, what=f"{name} weights", progress=progress)
    source = f"the file downloaded from {url}"
    try:
        try:
            state, entry = select_state_dict(load_checkpoint(raw))  # mmdet / mmseg: 'state_dict' 
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{source}: {one_line(e)}") from None
        except (ValueError, KeyError) as e:
            raise ValueError(f"{source} is not a usable {r.task} checkpoint: {one_line(e)}") from None
        if verify is not None:
            try:
                verify(state)
            except ValueError as e:
                raise ValueError(f"{source} does not hold the {name} weights: {one_line(e)}") from None
        export_safetensors(state, target, metadata={"model": name, "source": url, "entry": entry or "(raw)",
                                                    "source_sha256": sha256})
    finally:
        raw.unlink(missing_ok=True)
    return target


def load_release_state(path) -> Dict[str, Tensor]:
    """The official-layout state dict of a local file: a cached ``.safetensors`` or an official
    ``.pth`` (safe loader, its ``state_dict`` entry)."""
    from ..weights.safe_load import load_checkpoint, select_state_dict

    return select_state_dict(load_checkpoint(str(path)))[0]


def build_released_segmenter(name: str, **backbone_kwargs):
    """The segmenter of a released (or configured) name, randomly initialised, in training layout."""
    from .segmentation import build_segmenter

    r: DenseRelease = get_release(name, task="seg")
    kwargs = dict(drop_path_rate=r.drop_path_rate, **r.backbone_kwargs)
    kwargs.update(backbone_kwargs)
    return build_segmenter(r.head, r.backbone, r.num_classes, backbone_kwargs=kwargs)


def pretrained_segmenter(name: str, *, checkpoint=None, url: Optional[str] = None, cache=None,
                         progress: Optional[bool] = None):
    """A released segmenter with its weights (downloaded once, or ``checkpoint``: a local official
    ``.pth`` / safetensors file), in eval mode."""
    from safetensors.torch import load_file

    model = build_released_segmenter(name)

    def verify(state: Mapping[str, Tensor]) -> None:
        own = model.state_dict()
        mapped = model.convert_official(state)
        bad = sorted(set(own) ^ set(mapped)) + sorted(k for k in set(own) & set(mapped)
                                                      if tuple(own[k].shape) != tuple(mapped[k].shape))
        if bad:
            raise ValueError(f"{len(state)} tensors, {len(bad)} keys differ from the {name} layout (e.g. {bad[0]!r})")

    if checkpoint is not None:
        state = load_release_state(checkpoint)
    else:
        state = load_file(str(fetch_release(name, url=url, cache=cache, progress=progress, verify=verify)))
    model.load_official_state_dict(state, strict=True)
    return model.eval()
