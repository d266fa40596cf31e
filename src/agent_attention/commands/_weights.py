"""Where a command's model comes from: the model name, kwargs, image size and class count stored in
our checkpoints (a training ``.pth``'s ``config``, a ``.safetensors``'s metadata), or the flags."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["read_checkpoint", "stored_config", "num_classes_in", "check_model", "cli_weights_hint"]

_PYTHON_HINT = re.compile(r"pretrained_cfg_overlay=dict\(file=PATH\)( or pretrained=False)?")


@contextlib.contextmanager
def cli_weights_hint():
    """Errors of ``pretrained=True`` (offline, unknown weights) name the command line's way to use a
    local file, ``--checkpoint PATH``, instead of the Python argument."""
    try:
        yield
    except (OSError, ValueError) as e:
        text = str(e)
        if not _PYTHON_HINT.search(text):
            raise
        text = _PYTHON_HINT.sub("--checkpoint PATH instead of --pretrained", text)
        raise (OSError if isinstance(e, OSError) else ValueError)(text) from None


def read_checkpoint(path: str) -> Tuple[Any, Dict[str, Any]]:
    """``(checkpoint, stored recipe fields)`` of a weights file, read safely; a usage error
    (ValueError) naming the file when it is missing or not a checkpoint."""
    from ..weights import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    if p.is_dir():
        raise ValueError(f"--checkpoint {path} is a directory, not a weights file")
    try:
        ckpt = load_checkpoint(path)
        return ckpt, stored_config(ckpt, path)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # safetensors' SafetensorError on a corrupt header, zip errors of torch.load ...
        from ._dispatch import one_line

        raise ValueError(f"--checkpoint {path}: not a readable checkpoint ({one_line(e)})") from e


def stored_config(obj: Any, path: str) -> Dict[str, Any]:
    """Recipe fields stored by our training runs (``config`` of a .pth, metadata of a .safetensors)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "model" in obj["config"]:
        cfg = dict(obj["config"])
        return cfg if isinstance(cfg.get("model"), str) else {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        out: Dict[str, Any] = {}
        if "model" in meta:
            out["model"] = meta["model"]
        if "model_kwargs" in meta:
            try:
                out["model_kwargs"] = json.loads(meta["model_kwargs"])
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: metadata 'model_kwargs' is not JSON ({e})") from None
        for k in ("img_size", "num_classes"):
            if k in meta:
                try:
                    out[k] = int(meta[k])
                except ValueError:
                    raise ValueError(f"{path}: metadata {k!r} is not an integer: {meta[k]!r}") from None
        if "recipe" in meta:
            out["recipe"] = meta["recipe"]
        return out
    return {}


def num_classes_in(ckpt: Any, model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                   img_size: Optional[int] = None, use_ema: bool = False) -> Optional[int]:
    """The classifier size of the weights in ``ckpt`` for ``model_name`` (None if it cannot be told):
    the rows of the checkpoint entry that the model's ``get_classifier()`` weight is named by."""
    import torch

    from ..weights import select_state_dict
    from ..train.evaluation import build_model

    try:
        state, _ = select_state_dict(ckpt, use_ema=use_ema)
        with torch.device("meta"):
            model = build_model(model_name, 1000, img_size=img_size, model_kwargs={
                k: v for k, v in (model_kwargs or {}).items() if k != "num_classes"})
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    except Exception:  # noqa: BLE001 - best effort; the real build reports real errors
        return None
    names = [n for n, m in model.named_modules() if m is classifier and n]
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and getattr(weight, "ndim", 0) >= 1:
            return int(weight.shape[0])
    return None


def check_model(name: str, model_kwargs: Optional[Dict[str, Any]] = None, img_size: Optional[int] = None,
                num_classes: Optional[int] = None) -> None:
    """Build ``name`` on the meta device (nothing allocated) so that an unknown model or a wrong
    ``model_kwargs`` entry is reported before any work starts (ValueError / TypeError)."""
    import torch

    from ..train.evaluation import build_model

    try:
        with torch.device("meta"):
            build_model(name, num_classes, img_size=img_size, model_kwargs=model_kwargs)
    except TypeError as e:  # the constructor's "unexpected keyword argument 'x'"
        raise TypeError(f"model {name!r} with model_kwargs {model_kwargs or {}}: {e}") from e
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - an op without meta support: the real build will tell
        pass
