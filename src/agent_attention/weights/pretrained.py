"""Released weights for ``pretrained=True``: download URLs, the local cache, safe loading.

Interface used by the model builders (``build`` in the model registry):

* ``official_url(name) -> str``: the download URL of a registered model's released weights, as
  its timm pretrained cfg declares it (the family file's ``default_cfgs``); '' if none;
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

Nothing here knows a model family: names are resolved through timm's registry.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import one_line
from .download import WeightsDownloadError, download_file
from .safe_load import (
    UnsafeCheckpointError,
    _is_safetensors,
    check_safetensors,
    has_ema_weights,
    load_checkpoint,
    select_state_dict,
)
from .safe_save import export_safetensors

__all__ = [
    "ENV_CACHE",
    "ENV_PROGRESS",
    "ENV_URL",
    "RELEASE_URL",
    "WeightsDownloadError",
    "cache_dir",
    "cached_weights_path",
    "convert_local_file",
    "fetch_pretrained",
    "official_name",
    "official_url",
    "prepare_pretrained",
    "release_id",
]

#: the released files' URLs on Tsinghua cloud (official agent_transformer/README.md): one file id each
RELEASE_URL = re.compile(r"https://cloud\.tsinghua\.edu\.cn/f/([0-9a-f]+)/\?dl=1")
#: a mirror of the released files: a template with ``{id}`` and/or ``{name}`` (official name)
ENV_URL = "AGENT_ATTENTION_WEIGHTS_URL"
ENV_CACHE = "AGENT_ATTENTION_CACHE"
#: ``0`` hides the download progress bar
ENV_PROGRESS = "AGENT_ATTENTION_PROGRESS"


def official_name(name: str) -> str:
    """The registered model function behind ``name``: an alias (a model function wrapping another,
    ``__wrapped__``) resolves to the official name; a timm tag (``'.in1k'``) is dropped."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    import timm

    base = name.split(".", 1)[0]  # timm pretrained tags: 'agent_swin_tiny.in1k'
    if not timm.is_model(base):
        return base
    return inspect.unwrap(timm.models.model_entrypoint(base)).__name__


def release_id(url: str) -> str:
    """The file id of a released-weights URL (``RELEASE_URL``), or '' for another URL."""
    match = RELEASE_URL.fullmatch(url or "")
    return match.group(1) if match else ""


def _mirrored(url: str, official: str) -> str:
    """``url``, or its mirror when ``$AGENT_ATTENTION_WEIGHTS_URL`` is set and ``url`` is a released file."""
    template, file_id = os.environ.get(ENV_URL), release_id(url)
    return template.format(id=file_id, name=official) if template and file_id else url


def _registered_url(official: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(official)
    url = (cfg.url if cfg is not None else "") or ""
    return url[0] if isinstance(url, (tuple, list)) else url


def official_url(name: str) -> str:
    """The download URL of the released weights of ``name`` (official name or alias); '' if none.

    The URL is the one of the model's timm pretrained cfg (declared in its family file);
    ``$AGENT_ATTENTION_WEIGHTS_URL`` (a template with ``{id}`` / ``{name}``) points at a mirror.
    """
    official = official_name(name)
    return _mirrored(_registered_url(official), official)


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


def _released(official: str, url: str) -> str:
    """The file id when ``url`` is ``official``'s registered release (or its mirror), else ''."""
    registered = _registered_url(official)
    return release_id(registered) if registered and url in (registered, _mirrored(registered, official)) else ""


def cached_weights_path(name: str, url: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The cache file of ``name``'s weights downloaded from ``url`` (default: the registered URL)."""
    official = official_name(name)
    url = url or _registered_url(official)
    if not url:
        raise ValueError(f"{name}: no released weights are known; pass pretrained_cfg_overlay=dict(file=PATH)")
    file_id = _released(official, url)
    tag = file_id[:8] if file_id else _short_hash(url)
    return cache_dir(cache) / f"{official}-{tag}.safetensors"


def _read_weights(path: Path, source: str, prefer_ema: bool = False) -> tuple[dict[str, Tensor], str]:
    """The weights of a checkpoint file (safe loader; ``'model'`` first, or with ``prefer_ema`` the
    EMA entry when the file has one), or a one-line ValueError."""
    size = path.stat().st_size
    try:
        ckpt = load_checkpoint(path)
        return select_state_dict(ckpt, use_ema=prefer_ema and has_ema_weights(ckpt))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{source}: {one_line(e)}") from None
    except ValueError as e:
        reason = one_line(e).replace(f" '{path}'", "")
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

    The checkpoint filter registered for the model's class is applied first, as at load time. Raises a one-line
    ValueError naming the expected model and what the file holds.
    """
    from .checkpoints import check_state_dict, checkpoint_filter

    official = official_name(name)
    ref = _reference_model(official)
    filter_fn = checkpoint_filter(ref)
    try:
        fitted = dict(filter_fn(dict(state), ref)) if filter_fn is not None else dict(state)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{source} does not hold the {official} weights ({_found(state)}): {one_line(e)}") from None
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
    official = official_name(name)
    url = url or _registered_url(official)
    target = cached_weights_path(official, url, cache)
    if target.is_file():
        with open(target, "rb") as f:
            if _is_safetensors(f.read(16)):
                return target
        target.unlink()  # not ours (or damaged): fetch again
    verify = bool(_released(official, url)) if verify is None else verify
    url = _mirrored(url, official)
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
        check_safetensors(p)  # timm reads it: a damaged header is a one-line error here, not timm's raw one
        return p
    st = p.stat()
    resolved = str(p.resolve())
    stem = f"{p.stem}-{_short_hash(resolved)}"
    target = cache_dir(cache) / "local" / f"{stem}-{_short_hash(f'{st.st_size}:{st.st_mtime_ns}')}.safetensors"
    if target.is_file():
        return target
    state, used = _read_weights(p, f"pretrained file '{p}'", prefer_ema=True)
    export_safetensors(state, target, metadata={"source": resolved, "entry": used or "(raw)"})
    for old in target.parent.glob(f"{stem}-*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def prepare_pretrained(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs for ``build_model_with_cfg`` so that timm loads safe, local weights.

    timm resolves the pretrained cfg (registered cfg, ``pretrained_cfg``, ``pretrained_cfg_overlay``)
    and picks its source, in its own order, with its own functions; of its sources two would unpickle
    a ``.pth`` with timm's loader, and are replaced by a safe, converted ``.safetensors`` file:

    * ``file`` (a local checkpoint, e.g. an official ``.pth``): :func:`convert_local_file`
      (``.safetensors`` files are used as they are);
    * ``url`` (the released weights, or another URL): :func:`fetch_pretrained`.

    The others (a ``state_dict``, the Hub, ``local-dir:``) are left to timm. No source at all is a
    ValueError (timm would silently keep random weights).
    """
    if not pretrained:
        return kwargs
    from timm.models import resolve_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source  # the source order build_model_with_cfg uses

    variant = official_name(variant)
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    cache = kwargs.get("cache_dir")
    if load_from == "file":
        overlay["file"] = os.fspath(convert_local_file(location, cache))
    elif load_from == "url":
        overlay["file"] = os.fspath(fetch_pretrained(variant, url=location, cache=cache))
    elif not load_from:
        raise ValueError(f"{variant}: no released weights are known for this model; pass "
                         "pretrained_cfg_overlay=dict(file=PATH) or pretrained=False")
    else:
        return kwargs
    return {**kwargs, "pretrained_cfg_overlay": overlay}
