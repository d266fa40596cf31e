"""Released weights for ``pretrained=True``: official download URLs, the local cache, safe loading.

Interface used by the model builders (``build`` in the shared model helpers):

* ``official_url(name) -> str``: the official download URL of a released model ('' if none);
* ``prepare_pretrained(variant, pretrained, kwargs) -> kwargs``: called right before
  ``timm.models.build_model_with_cfg``; when ``pretrained`` it makes sure timm will load a safe
  local file (download + cache + safetensors conversion) and returns the kwargs to build with.

The official files are training checkpoints that pickle a yacs config, which timm's
``weights_only`` loader refuses (and a full unpickle could run code). So timm is never handed the
URL or a ``.pth``: the file is downloaded (or read, for ``pretrained_cfg_overlay=dict(file=...pth)``)
by the package's safe loader, its ``'model'`` weights are checked against the released
architecture and written as ``.safetensors`` in the cache, and timm loads that file
(``pretrained_cfg_overlay=dict(file=...)``). The second load reads only the safetensors file.

Cache (``cache_dir()``): timm's ``cache_dir=`` argument if given, else ``$AGENT_ATTENTION_CACHE``,
else ``torch.hub.get_dir()/checkpoints/agent_attention`` (``$TORCH_HOME/hub/...``)::

    <cache>/agent_swin_tiny-a2ddc119.safetensors        # released weights ('model' entry), by URL
    <cache>/local/<stem>-<path hash>-<version hash>.safetensors   # converted local .pth files
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._download import WeightsDownloadError, download_file
from ._safe_load import (
    UnsafeCheckpointError,
    _is_safetensors,
    load_checkpoint,
    select_state_dict,
)
from ._safe_save import export_safetensors
from .registry import ALIASES

__all__ = [
    "ENV_CACHE",
    "ENV_PROGRESS",
    "ENV_URL",
    "RELEASE_IDS",
    "URL_TEMPLATE",
    "WeightsDownloadError",
    "cache_dir",
    "cached_weights_path",
    "convert_local_file",
    "fetch_pretrained",
    "official_url",
    "prepare_pretrained",
]

#: Tsinghua-cloud file ids of the released ImageNet-1k checkpoints (official agent_transformer/README.md)
RELEASE_IDS = {
    "agent_deit_tiny": "57e0904221824ee7b7af",
    "agent_deit_small": "fdd43304372541db8ea7",
    "agent_deit_small_448": "a228f86241c445f1969b",
    "agent_deit_base": "5115f15fdd7e4ab58fbc",
    "agent_pvt_tiny": "13fdf0e0a7c5498c934f",
    "agent_pvt_small": "36b8be9a8863456685a3",
    "agent_pvt_medium": "4d00ecacf18b45f9b88c",
    "agent_pvt_medium_256": "654df734121643b19c52",
    "agent_pvt_large": "040cfe0cfbbe4762ad09",
    "agent_swin_tiny": "a2ddc1190c224f768a41",
    "agent_swin_small": "f607172c9fea4d6e99bb",
    "agent_swin_small_288": "09760394e93b4046a25e",
    "agent_swin_base": "4fcd2d0114bb490483c3",
    "agent_swin_base_384": "bb84ee9058954706a557",
    "agent_cswin_tiny": "8c562a74441e46d5902b",
    "agent_cswin_small": "30eb8af675bc4b7a8747",
    "agent_cswin_base": "c8035b0839b2410c8c9f",
    "agent_cswin_base_384": "1239be0df44b47719432",
}
URL_TEMPLATE = "https://cloud.tsinghua.edu.cn/f/{id}/?dl=1"
#: a mirror of the released files: a template with ``{id}`` and/or ``{name}`` (official name)
ENV_URL = "AGENT_ATTENTION_WEIGHTS_URL"
ENV_CACHE = "AGENT_ATTENTION_CACHE"
#: ``0`` hides the download progress bar
ENV_PROGRESS = "AGENT_ATTENTION_PROGRESS"


def _official_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    base = name.split(".", 1)[0]  # timm pretrained tags: 'agent_swin_tiny.in1k'
    return ALIASES.get(base, base)


def official_url(name: str) -> str:
    """The download URL of the released weights of ``name`` (official name or alias); '' if none.

    ``$AGENT_ATTENTION_WEIGHTS_URL`` (a template with ``{id}`` / ``{name}``) points at a mirror.
    """
    official = _official_name(name)
    file_id = RELEASE_IDS.get(official)
    if file_id is None:
        return ""
    return (os.environ.get(ENV_URL) or URL_TEMPLATE).format(id=file_id, name=official)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloaded / converted weights live (see the module docstring)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / "agent_attention"


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def cached_weights_path(name: str, url: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The cache file of ``name``'s weights downloaded from ``url`` (default: the official URL)."""
    official = _official_name(name)
    url = url or official_url(official)
    if not url:
        raise ValueError(f"{name}: no released weights are known; pass pretrained_cfg_overlay=dict(file=PATH)")
    file_id = RELEASE_IDS.get(official, "")
    released = file_id and url in (official_url(official), URL_TEMPLATE.format(id=file_id, name=official))
    tag = file_id[:8] if released else _short_hash(url)
    return cache_dir(cache) / f"{official}-{tag}.safetensors"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _read_weights(path: Path, source: str, use_ema: bool = False) -> tuple[dict[str, Tensor], str]:
    """The weights of a checkpoint file (safe loader; ``'model'`` first, or the EMA entry first with
    ``use_ema``), or a one-line ValueError."""
    size = path.stat().st_size
    try:
        return select_state_dict(load_checkpoint(path), use_ema=use_ema)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{source}: {_one_line(e)}") from None
    except ValueError as e:
        reason = _one_line(e).replace(f" '{path}'", "")
        raise ValueError(f"{source} ({size} bytes) is not a usable checkpoint (truncated or not a checkpoint?): "
                         f"{reason}") from None


def _found(state: Mapping[str, Tensor]) -> str:
    first = next(iter(state.items()))
    return f"{len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.2f}M values, " \
           f"first {first[0]!r} {tuple(first[1].shape)}"


@functools.cache
def _reference_model(official: str) -> torch.nn.Module:
    """The released architecture on the meta device (no memory, ~0.1-1 s to build once)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(official)


def verify_weights(name: str, state: Mapping[str, Tensor], source: str) -> None:
    """Check that ``state`` fits the released ``name`` architecture (built on the meta device).

    The family's ``checkpoint_filter_fn`` is applied first, as at load time. Raises a one-line
    ValueError naming the expected model and what the file holds.
    """
    from .checkpoints import _family_filter, check_state_dict

    official = _official_name(name)
    ref = _reference_model(official)
    filter_fn = _family_filter(ref)
    try:
        fitted = dict(filter_fn(dict(state), ref)) if filter_fn is not None else dict(state)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{source} does not hold the {official} weights ({_found(state)}): {_one_line(e)}") from None
    transient = {n for n, _ in ref.named_buffers()} - set(ref.state_dict())
    fitted = {k: v for k, v in fitted.items() if k not in transient}
    missing, unexpected, mismatched = check_state_dict(ref, fitted)
    if missing or unexpected or mismatched:
        example = (mismatched or [f"missing {k!r}" for k in missing] or [f"unexpected {k!r}" for k in unexpected])[0]
        raise ValueError(
            f"{source} does not hold the {official} weights: it has {_found(state)}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched keys (e.g. {example})"
        )


def _progress_default() -> bool:
    return os.environ.get(ENV_PROGRESS, "1").strip().lower() not in ("0", "false", "no", "off")


def fetch_pretrained(name: str, *, url: str | None = None, cache: str | os.PathLike | None = None,
                     progress: bool | None = None, verify: bool | None = None) -> Path:
    """Download (once) the released weights of ``name`` and return the cached ``.safetensors`` path.

    The downloaded ``.pth`` is read by the safe loader, its ``'model'`` weights are checked against
    the ``name`` architecture (``verify``, default: when ``url`` is the official one) and written as
    safetensors (atomically); the ``.pth`` is then deleted. Later calls return the cached file
    without any download or unpickling.
    """
    official = _official_name(name)
    default_url = official_url(official)
    url = url or default_url
    target = cached_weights_path(official, url, cache)
    if target.is_file():
        with open(target, "rb") as f:
            if _is_safetensors(f.read(16)):
                return target
        target.unlink()  # not ours (or damaged): fetch again
    verify = (url == default_url) if verify is None else verify
    raw = target.with_name(target.name[: -len(".safetensors")] + ".pth")
    what = f"{official} weights"
    sha256 = download_file(url, raw, what=what, progress=_progress_default() if progress is None else progress)
    try:
        state, used = _read_weights(raw, f"the file downloaded from {url}")
        if verify:
            verify_weights(official, state, f"the file downloaded from {url}")
        export_safetensors(state, target, metadata={"model": official, "source": url, "entry": used or "(raw)",
                                                    "source_sha256": sha256})
    finally:
        raw.unlink(missing_ok=True)
    return target


def convert_local_file(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """A ``.safetensors`` file with the weights of the local checkpoint ``path``, loaded safely.

    ``.safetensors`` files are returned as they are. Others (official ``.pth``, our own training
    checkpoints) are converted once into ``<cache>/local/`` (keyed by path, size and mtime; older
    conversions of the same path are removed). As timm's own file loader, the EMA weights
    (``state_dict_ema`` / ``model_ema``) are preferred when the file has them, then ``model``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"pretrained file '{p}' does not exist")
    with open(p, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head) and p.suffix == ".safetensors":
        return p
    st = p.stat()
    resolved = str(p.resolve())
    stem = f"{p.stem}-{_short_hash(resolved)}"
    target = cache_dir(cache) / "local" / f"{stem}-{_short_hash(f'{st.st_size}:{st.st_mtime_ns}')}.safetensors"
    if target.is_file():
        return target
    state, used = _read_weights(p, f"pretrained file '{p}'", use_ema=True)
    export_safetensors(state, target, metadata={"source": resolved, "entry": used or "(raw)"})
    for old in target.parent.glob(f"{stem}-*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):  # timm PretrainedCfg
        return cfg.to_dict()
    return {}  # None or a pretrained tag string


def prepare_pretrained(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs for ``build_model_with_cfg`` so that timm loads safe, local weights.

    * ``pretrained_cfg_overlay=dict(state_dict=...)``, an ``hf_hub_id`` (or timm's ``hf-hub:`` /
      ``local-dir:`` names) and ``.safetensors`` files are left to timm;
    * ``file=`` any other checkpoint (an official ``.pth``): converted with :func:`convert_local_file`;
    * otherwise the ``url`` of the cfg / overlay, else the official URL of ``variant``:
      downloaded and converted with :func:`fetch_pretrained`.
    """
    if not pretrained:
        return kwargs
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    merged = {**_cfg_dict(kwargs.get("pretrained_cfg")), **overlay}
    if merged.get("state_dict") is not None or merged.get("source") in ("hf-hub", "local-dir"):
        return kwargs
    cache = kwargs.get("cache_dir")
    if merged.get("file"):
        overlay["file"] = os.fspath(convert_local_file(merged["file"], cache))
    elif merged.get("hf_hub_id"):
        return kwargs
    else:
        default_url = official_url(variant)
        url = merged.get("url") or default_url
        if isinstance(url, (tuple, list)):
            url = url[0]
        if not url:
            raise ValueError(f"{variant}: no released weights are known for this model; pass "
                             "pretrained_cfg_overlay=dict(file=PATH) or pretrained=False")
        if url == URL_TEMPLATE.format(id=RELEASE_IDS.get(_official_name(variant), ""), name=_official_name(variant)):
            url = default_url  # the cfg's official URL: honour a mirror set in the environment
        overlay["file"] = os.fspath(fetch_pretrained(variant, url=url, cache=cache))
    return {**kwargs, "pretrained_cfg_overlay": overlay}
