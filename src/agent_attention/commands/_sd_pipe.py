"""What ``sd`` and ``sd-eval`` share: load a local diffusers pipeline of any kind (UNet or
transformer denoiser, image or video), call it with only the arguments its ``__call__`` accepts,
and turn what it returns into PIL images (a video: its first, middle and last frames side by side).
"""
from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._dispatch import UsageError

__all__ = ["DTYPES", "load_pipeline", "pipeline_kwargs", "generate", "to_pil", "side_by_side", "grid", "save_image", "image_format",
           "resolve_device", "model_dir"]

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def model_dir(path: str) -> Path:
    """``path`` as a local diffusers pipeline directory, or a usage error."""
    model = Path(path)
    if not (model / "model_index.json").is_file():
        raise UsageError(f"--model {model} is not a local diffusers pipeline directory (no model_index.json)")
    return model


def resolve_device(name: Optional[str], dtype_name: Optional[str], prog: str = "agent-attention sd"):
    """``(torch.device, torch.dtype, dtype name)`` from ``--device`` / ``--dtype`` (defaults: cuda
    if available; fp16 on cuda, fp32 elsewhere). A device this machine lacks is a usage error; a
    dtype without fast kernels on this CPU gets a one-line warning."""
    import torch

    from .._device import resolve_device as _resolve
    from .._dtypes import warn_slow_dtype

    try:
        device = _resolve(name or "auto")
    except ValueError as e:
        raise UsageError(f"--device {name}: {str(e).partition(': ')[2] or e}; use --device cpu") from None
    dtype_name = dtype_name or ("fp16" if device.type == "cuda" else "fp32")
    warn_slow_dtype(dtype_name, device, f"--dtype {dtype_name}", prog)
    return device, getattr(torch, DTYPES[dtype_name]), dtype_name


def load_pipeline(model: Path, device, dtype):
    """``DiffusionPipeline.from_pretrained(model, local_files_only=True)`` on ``device`` in ``dtype``,
    progress bar off."""
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones only know torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(pipe, **kwargs: Any) -> Dict[str, Any]:
    """The ``kwargs`` that ``pipe.__call__`` takes and that are not ``None`` (a Flux pipeline has
    no ``negative_prompt`` in older releases, a video pipeline takes ``num_frames`` ...)."""
    params = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in kwargs.items() if v is not None}
    return {k: v for k, v in kwargs.items() if v is not None and k in params}


def to_pil(output) -> List[Any]:
    """PIL images of a pipeline output: ``.images`` as they are, each video of ``.frames`` as its
    first, middle and last frames side by side."""
    from PIL import Image
    import numpy as np

    def one(im):
        if isinstance(im, Image.Image):
            return im
        arr = np.asarray(im.detach().float().cpu() if hasattr(im, "detach") else im)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)

    images = getattr(output, "images", None)
    if images is not None:
        return [one(im) for im in images]
    frames = getattr(output, "frames", None)
    if frames is None:
        raise ValueError(f"{type(output).__name__} has neither images nor frames")
    videos = []
    for video in frames:
        n = len(video)
        picks = sorted({0, n // 2, n - 1})
        videos.append(side_by_side([one(video[i]) for i in picks]))
    return videos


def generate(pipe, prompt, *, seed: int, steps: int, device, callback: Optional[Callable] = None,
             **options: Any) -> Tuple[List[Any], float]:
    """One call of ``pipe`` with a CPU generator seeded with ``seed``: ``(PIL images, seconds)``."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = pipeline_kwargs(pipe, num_inference_steps=steps, generator=generator, **options)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    start = time.perf_counter()
    out = pipe(prompt, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return to_pil(out), time.perf_counter() - start


def side_by_side(images: Sequence[Any], labels: Optional[List[str]] = None):
    """Paste PIL images left to right (with optional captions) into one image."""
    return grid([list(images)], labels)


def grid(rows: Sequence[Sequence[Any]], labels: Optional[List[str]] = None):
    """Paste rows of PIL images into one image (captions ``labels`` over the columns)."""
    from PIL import Image, ImageDraw

    caption = 14 if labels else 0
    width = max(sum(im.width for im in row) for row in rows)
    heights = [max(im.height for im in row) for row in rows]
    canvas = Image.new("RGB", (width, sum(heights) + caption), "white")
    draw = ImageDraw.Draw(canvas)
    y = caption
    for row, h in zip(rows, heights):
        x = 0
        for im in row:
            canvas.paste(im.convert("RGB"), (x, y))
            x += im.width
        y += h
    if labels:
        x = 0
        for im, label in zip(rows[0], labels):
            draw.text((x + 2, 1), label, fill="black")
            x += im.width
    return canvas


_WRITABLE = {"PNG", "JPEG", "WEBP", "BMP", "TIFF"}


def image_format(path) -> str:
    """The PIL format that ``path``'s extension names (``.png`` -> PNG, ``.jpg`` -> JPEG ...); a
    usage error for a name without a known image extension."""
    from PIL import Image

    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt not in _WRITABLE:
        raise UsageError(f"--out {path}: give an image file name ending in .png, .jpg or .webp")
    return fmt


def save_image(image, path: Path) -> None:
    """Write ``image`` atomically in the format of ``path``'s extension."""
    from .._atomic import atomic_path

    fmt = image_format(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
