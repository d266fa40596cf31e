"""Downloading one file over HTTP(S) into the weight cache: streamed, with a progress bar, atomic.

The bytes go to a temp file next to the target (:func:`agent_attention._atomic.atomic_path`) that
replaces the target only when the whole body has arrived (``Content-Length`` checked), so a cut
connection never leaves a partial file where a complete one is expected. Every failure is a
:class:`WeightsDownloadError` with a one-line message: offline / connection refused, HTTP status,
a body cut short.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from .._atomic import atomic_path

__all__ = ["WeightsDownloadError", "download_file"]

_CHUNK = 1 << 20


class WeightsDownloadError(OSError):
    """The released weights could not be downloaded (offline, HTTP error, truncated transfer)."""


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    text = str(reason) or type(reason).__name__
    return " ".join(text.split())  # one line


def download_file(url: str, dest: str | os.PathLike, *, what: str, progress: bool = True,
                  timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` atomically; returns the SHA-256 of the body (hex).

    ``what`` names the download in the progress bar and in errors (e.g. ``"agent_swin_tiny weights"``).
    Raises :class:`WeightsDownloadError` (an ``OSError``) with a one-line message.
    """
    from tqdm.auto import tqdm

    hint = "check the connection, or download the file yourself and pass pretrained_cfg_overlay=dict(file=PATH)"
    request = urllib.request.Request(url, headers={"User-Agent": "agent-attention"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise WeightsDownloadError(f"cannot download the {what} from {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise WeightsDownloadError(f"cannot download the {what} from {url}: {_reason(e)} (offline? {hint})") from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts, resets, bad URLs
        raise WeightsDownloadError(f"cannot download the {what} from {url}: {_reason(e)} ({hint})") from None
    digest = hashlib.sha256()
    got = 0
    with response:
        total = int(response.headers.get("Content-Length") or 0)
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as f, tqdm(
                total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{what}",
                disable=not progress, leave=False,
            ) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                if total and got != total:
                    raise WeightsDownloadError(
                        f"download of the {what} from {url} was cut short: got {got} of {total} bytes; try again"
                    )
        except WeightsDownloadError:
            raise
        except (TimeoutError, http.client.IncompleteRead, ConnectionError) as e:
            where = f" of {total}" if total else ""
            raise WeightsDownloadError(
                f"download of the {what} from {url} was cut short after {got}{where} bytes ({_reason(e)}); try again"
            ) from None
    if not Path(dest).is_file():  # pragma: no cover - atomic_path guarantees it
        raise WeightsDownloadError(f"download of the {what} from {url} left no file at {dest}")
    return digest.hexdigest()
