"""AgentSD against the unpatched model on a prompt list: seconds per image, peak memory per image
and image quality (FID, CLIP score), with torchmetrics.

* **s/image**: each prompt generated once without and once with AgentSD, same seed (``seed + i``
  for the ``i``-th prompt); the mean wall time per image.
* **peak memory per image**: the official AgentSD protocol, the change of the peak memory of a
  generation when the batch grows by one image (``num_images_per_prompt`` 1 → 2), which removes
  the weights and everything else that does not grow with the batch.
* **FID** of the AgentSD images against the unpatched model's images of the same prompts and seeds
  (``torchmetrics.image.fid.FrechetInceptionDistance``): with Inception-v3 (``feature=2048``; needs
  ``torch-fidelity`` and its weights) or any feature extractor module, e.g. the image tower of a
  CLIP model (:class:`ClipImageFeatures`). FID needs many images (thousands for Inception's 2048
  features); on a few prompts it only says "close" or "far".
* **CLIP score** of each set against its prompts (``torchmetrics.multimodal.CLIPScore``, with a
  local CLIP model: ``100 · max(cos(image, text), 0)``, averaged).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .._extras import require

__all__ = ["ClipImageFeatures", "load_clip", "images_to_tensor", "fid", "clip_score", "memory_per_image", "evaluate"]


def images_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL images of one size → ``uint8`` tensor ``(N, 3, H, W)``."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images of different sizes: {sorted({a.shape[:2] for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_clip(path: str):
    """``(CLIPModel, CLIPProcessor)`` from a local directory (no hub access)."""
    transformers = require("transformers", "CLIP score", "diffusers")
    model = transformers.CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


class ClipImageFeatures(nn.Module):
    """FID features from a CLIP image tower: images in ``[0, 1]`` ``(N, 3, H, W)`` → projected image
    embeddings ``(N, projection_dim)`` (resized to the tower's input size, normalised with the
    processor's mean/std)."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model
        ip = processor.image_processor
        self.size = int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(ip.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std).view(1, -1, 1, 1), persistent=False)
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.max() > 1.5:  # uint8 range
            x = x / 255.0
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                      antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        return _tensor(self.model.get_image_features(pixel_values=x.to(self.model.dtype))).float()


def fid(reference: torch.Tensor, generated: torch.Tensor, feature: Any = 2048, weights: Optional[str] = None) -> float:
    """FID between two ``uint8`` image sets ``(N, 3, H, W)``: ``feature`` is 64/192/768/2048
    (Inception-v3 via torch-fidelity; ``weights`` a local copy of its weights) or a module mapping
    images in ``[0, 1]`` to features."""
    require("torchmetrics", "FID", "quality")
    if isinstance(feature, int):
        require("torch_fidelity", "FID with Inception-v3", "quality")
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(reference), len(generated)) < 2:
        raise ValueError("FID needs at least 2 images per set")
    metric = FrechetInceptionDistance(feature=feature, normalize=True, feature_extractor_weights_path=weights)
    metric.update(reference.float() / 255.0, real=True)
    metric.update(generated.float() / 255.0, real=False)
    return float(metric.compute())


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _FeaturesAsTensors(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return tensors: transformers 5
    returns a model output there, which torchmetrics' CLIPScore (1.9) cannot normalise."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.inner.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.inner.get_text_features(*args, **kwargs))


def clip_score(images: torch.Tensor, prompts: Sequence[str], model, processor) -> float:
    """Mean CLIP score of ``uint8`` images ``(N, 3, H, W)`` against their prompts."""
    require("torchmetrics", "CLIP score", "quality")
    from torchmetrics.multimodal.clip_score import CLIPScore

    wrapped = _FeaturesAsTensors(model)
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor))
    metric.update(list(images), list(prompts))
    return float(metric.compute())


def memory_per_image(run: Callable[[int], object], device: torch.device, batches: Sequence[int] = (1, 2)) -> Dict[str, int]:
    """Peak memory of ``run(batch)`` at each batch size, and the change per +1 image between the
    first two (the official protocol)."""
    from . import common

    peaks = {b: common.peak_memory(lambda b=b: run(b), device) for b in batches}
    b0, b1 = batches[0], batches[1]
    return dict(peaks={str(b): p for b, p in peaks.items()}, per_image=(peaks[b1] - peaks[b0]) // (b1 - b0))


def evaluate(generate: Callable[[str, int, Optional[Callable]], tuple], prompts: Sequence[str], *,
             apply: Callable[[], Any], remove: Callable[[], None], seed: int = 0,
             memory_run: Optional[Callable[[int], object]] = None, device: torch.device = torch.device("cpu"),
             clip=None, fid_feature: Any = None, fid_weights: Optional[str] = None) -> Dict[str, Any]:
    """Generate every prompt without and with AgentSD and measure both.

    ``generate(prompt, seed, callback)`` returns ``(PIL images, seconds)``; ``apply()`` patches the
    model and returns ``(state, callback)``; ``remove()`` unpatches it.  ``memory_run(batch)`` runs
    one generation of ``batch`` images (memory per image, skipped if ``None``).  ``clip`` is
    ``(CLIPModel, CLIPProcessor)`` or ``None``; ``fid_feature`` as :func:`fid` (``None``: no FID).
    Returns ``{"baseline": {...}, "agentsd": {...}, "images": {...}, "calls": {...}}``."""
    results: Dict[str, Dict[str, Any]] = {"baseline": {}, "agentsd": {}}
    images: Dict[str, List[Any]] = {"baseline": [], "agentsd": []}
    seconds: Dict[str, List[float]] = {"baseline": [], "agentsd": []}

    def run_all(name: str, callback) -> None:
        for i, prompt in enumerate(prompts):
            ims, s = generate(prompt, seed + i, callback)
            images[name].append(ims[0])
            seconds[name].append(s)

    run_all("baseline", None)
    if memory_run is not None:
        results["baseline"]["memory"] = memory_per_image(memory_run, device)
    state, callback = apply()
    try:
        state.calls.clear()
        run_all("agentsd", callback)
        calls = dict(state.calls)
        if memory_run is not None:
            results["agentsd"]["memory"] = memory_per_image(memory_run, device)
    finally:
        remove()
    tensors = {k: images_to_tensor(v) for k, v in images.items()}
    for name in results:
        results[name]["s_per_image"] = statistics.mean(seconds[name])
        results[name]["seconds"] = seconds[name]
        if clip is not None:
            results[name]["clip_score"] = clip_score(tensors[name], prompts, *clip)
    if fid_feature is not None:
        results["agentsd"]["fid_vs_baseline"] = fid(tensors["baseline"], tensors["agentsd"], fid_feature, fid_weights)
        results["baseline"]["fid_vs_baseline"] = 0.0
    return dict(results, images=images, calls=calls)
