"""Optional dependencies: import one, or say in one line which extra installs it.

The core install (the op, the modules, the model zoo, ``pretrained=True``, training on image folders)
needs only torch, torchvision, timm, safetensors, numpy, pyyaml and tqdm. Others come with extras::

    pip install "agent-attention[train]"   # scikit-learn (the embedded digits set), matplotlib (curves)
    pip install "agent-attention[viz]"     # matplotlib, scikit-image (``show``'s sample photo)
    pip install "agent-attention[bench]"   # matplotlib (benchmark plots)
    pip install "agent-attention[cli]"     # all three: every command of ``agent-attention``
    pip install "agent-attention[quality]" # torchmetrics, torch-fidelity (``sd-eval``: FID, CLIP score)
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: import name -> (distribution, extra that installs it)
EXTRAS = {
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "viz"),
    "skimage": ("scikit-image", "viz"),
    "torchmetrics": ("torchmetrics", "quality"),
    "torch_fidelity": ("torch-fidelity", "quality"),
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
        extra = extra or default_extra
        how = f"pip install 'agent-attention[{extra}]'" if extra else f"pip install {dist}"
        raise MissingExtraError(f"{purpose} needs {dist}, which is not installed: {how}", name=top) from None
