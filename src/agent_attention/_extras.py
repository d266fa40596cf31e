"""Optional dependencies: import one, or say in one line which extra installs it.

The core install (the op, the modules, the model zoo, ``pretrained=True``, training on image folders)
needs only torch, torchvision, timm, safetensors, numpy, pyyaml and tqdm. Others come with extras::

    pip install "agent-attention[train]"   # scikit-learn (the embedded digits set), matplotlib (curves)
    pip install "agent-attention[viz]"     # matplotlib, scikit-image (``show``'s sample photo)
    pip install "agent-attention[bench]"   # matplotlib (benchmark plots)
    pip install "agent-attention[cli]"     # all three: every command of ``agent-attention``
    pip install "agent-attention[quality]" # torchmetrics, torch-fidelity (``sd-eval``: FID, CLIP score)
    pip install "agent-attention[diffusers]"  # AgentSD, ``sd``, ``bench sd`` (diffusers, transformers, tomesd, accelerate)
    pip install "agent-attention[export]"  # ONNX export (onnx, onnxscript, onnxruntime)
    pip install "agent-attention[dense]"   # ``train-det`` / ``train-seg`` (segmentation-models-pytorch, pycocotools)

A command that stops on a missing optional package says which extra installs it
(:func:`missing_extra`, used by the command line for every command).
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require", "missing_extra", "install_hint"]

#: import name -> (distribution, extra that installs it)
EXTRAS = {
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "viz"),
    "skimage": ("scikit-image", "viz"),
    "torchmetrics": ("torchmetrics", "quality"),
    "torch_fidelity": ("torch-fidelity", "quality"),
    "diffusers": ("diffusers", "diffusers"),
    "transformers": ("transformers", "diffusers"),
    "tomesd": ("tomesd", "diffusers"),
    "accelerate": ("accelerate", "diffusers"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "segmentation_models_pytorch": ("segmentation-models-pytorch", "dense"),
    "pycocotools": ("pycocotools", "dense"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, purpose: str, extra: str = "") -> ModuleType:
    """``import module`` (e.g. ``"sklearn.datasets"``), or raise :class:`MissingExtraError`:
    ``"<purpose> needs scikit-learn: pip install 'agent-attention[train]'"``."""
    top = module.split(".", 1)[0]
    try:
        importlib.import_module(top)  # first: a submodule already imported does not prove the package is there
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".", 1)[0] != top:
            raise  # the package is there but one of its own dependencies is missing: show that
        dist, default_extra = EXTRAS.get(top, (top, ""))
        raise MissingExtraError(f"{purpose} needs {dist}, which is not installed: {install_hint(top, extra)}",
                                name=top) from None


def install_hint(top: str, extra: str = "") -> str:
    """``pip install "agent-attention[<extra>]"`` for import name ``top`` (else ``pip install <dist>``)."""
    dist, default_extra = EXTRAS.get(top, (top, ""))
    extra = extra or default_extra
    return f'pip install "agent-attention[{extra}]"' if extra else f"pip install {dist}"


def missing_extra(exc: BaseException):
    """A :class:`MissingExtraError` naming the extra for a ``ModuleNotFoundError`` of an optional
    package of :data:`EXTRAS` (also one raised deep inside a command), else None."""
    if isinstance(exc, MissingExtraError) or not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".", 1)[0]
    if top not in EXTRAS:
        return None
    dist = EXTRAS[top][0]
    return MissingExtraError(f"this command needs {dist}, which is not installed: {install_hint(top)}", name=top)
