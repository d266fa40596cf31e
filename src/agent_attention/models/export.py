"""Export a zoo model: ``torch.export`` (``.pt2``) and ONNX (dynamo exporter), dynamic batch and H×W.

The exported graph keeps the model's "any resolution" behaviour: batch, height and width are
dynamic, the height / width being multiples of the model's coarsest stride (``max`` reduction of
``feature_info``: 16 for Agent-DeiT/16, 32 for the hierarchical families), which every stage grid
then divides exactly. Sizes off that multiple (which the eager model pads or rejects) are not part
of the exported graph.

    >>> import torch, agent_attention.models as zoo
    >>> from agent_attention.models.export import export_program
    >>> m = zoo.create_model("agent_pvt_tiny", img_size=64, embed_dims=[16, 32, 48, 64],
    ...                      num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], agent_num=[4, 9, 4, 4]).eval()
    >>> ep = export_program(m, (2, 3, 64, 96))             # doctest: +SKIP
    >>> ep.module()(torch.randn(1, 3, 128, 64)).shape      # doctest: +SKIP
    torch.Size([1, 1000])
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["size_multiple", "min_size", "example_input", "dynamic_shapes", "export_program", "save_program", "export_onnx"]

Size = Union[int, Sequence[int]]


def size_multiple(model: nn.Module) -> int:
    """Height / width step of the exported graph: the model's coarsest feature stride."""
    info = getattr(model, "feature_info", None) or []
    red = [int(i["reduction"]) for i in info if isinstance(i, dict) and "reduction" in i]
    return max(red) if red else 32


def example_input(model: nn.Module, size: Optional[Size] = None, batch: int = 2) -> torch.Tensor:
    """A random input ``(batch, C, H, W)``: ``size`` (int or (H, W)) or the cfg's input size, rounded
    up to :func:`size_multiple`. The batch is any (a dynamic export traces batch 1 as 2)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    m = size_multiple(model)
    h, w = -(-int(h) // m) * m, -(-int(w) // m) * m
    p = next(iter(model.parameters()), None)
    return torch.randn(batch, int(getattr(model, "in_chans", c)), h, w,
                       dtype=p.dtype if p is not None else None, device=p.device if p is not None else None)


def min_size(model: nn.Module) -> int:
    """Smallest height / width (pixels) of the dynamic-size graph: one :func:`size_multiple` step,
    or the model's own ``export_min_size()`` (Swin window blocks: their full window and shift at
    every stage, 224 for the released Swin models), rounded up to the step."""
    m = size_multiple(model)
    own = getattr(model, "export_min_size", None)
    low = int(own()) if callable(own) else m
    return max(m, -(-low // m) * m)


def dynamic_shapes(model: nn.Module, max_size: int = 4096, max_batch: int = 1024) -> Dict[str, Dict[int, object]]:
    """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export``: batch ``B`` and ``H = m·h``,
    ``W = m·w`` (``m`` = :func:`size_multiple`), from :func:`min_size` up to ``max_size`` pixels."""
    from torch.export import Dim

    m = size_multiple(model)
    low = min_size(model) // m
    top = max(low, max_size // m)
    return {"x": {0: Dim("batch", min=1, max=max_batch), 2: m * Dim("h", min=low, max=top),
                  3: m * Dim("w", min=low, max=top)}}


def _check_dynamic_example(model: nn.Module, args: Tuple[torch.Tensor]) -> None:
    low = min_size(model)
    h, w = args[0].shape[-2:]
    if min(h, w) < low:
        raise ValueError(f"a dynamic-size export of this model needs an example of at least {low}x{low} pixels "
                         f"(got {h}x{w}): smaller maps take a different window geometry; export a larger "
                         f"example or a fixed size (dynamic=False / --static)")


def _args(model: nn.Module, example) -> Tuple[torch.Tensor]:
    if example is None or isinstance(example, (int, tuple, list)) and not isinstance(example, torch.Tensor):
        if isinstance(example, (tuple, list)) and len(example) == 4:
            return (example_input(model, example[2:], batch=int(example[0])),)
        return (example_input(model, example),)
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(f"example must be an image batch (B, C, H, W), a size or None, got {example!r}")
    return (example,)


def _trace_args(model: nn.Module, example, dynamic: bool) -> Tuple[torch.Tensor]:
    """The example to trace: a dynamic export traces a batch of at least 2 (an example of batch 1
    would fix the batch at 1; the program then runs at any batch, 1 included)."""
    args = _args(model, example)
    if dynamic:
        _check_dynamic_example(model, args)
        if args[0].shape[0] == 1:
            args = (args[0].expand(2, *args[0].shape[1:]).contiguous(),)
    return args


def _dynamic_context(model: nn.Module, dynamic: bool):
    """For models that ask for it (``export_size_oblivious = True``: Swin, whose window counts per
    stage are 1 at some sizes and more at others), trace treating every dynamic size as possibly 1
    without specialising on it (``backed_size_oblivious``); a plain trace would guard the example's
    window counts. Other models trace as usual (the oblivious mode would add a batch > 1 guard to
    their convolutions)."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older torch
        fx_config = None
    if not (dynamic and getattr(model, "export_size_oblivious", False)) or not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def export_program(model: nn.Module, example=None, *, dynamic: bool = True, strict: bool = False):
    """``torch.export.export`` of ``model`` (put in eval mode) with dynamic batch and H×W
    (``dynamic=False``: the example's shape only). ``example``: a tensor, ``(B, C, H, W)``, a size
    or ``None`` (the cfg's input size); any batch, 1 included."""
    model = model.eval()
    args = _trace_args(model, example, dynamic)
    shapes = dynamic_shapes(model) if dynamic else None
    with torch.no_grad(), _dynamic_context(model, dynamic):
        return torch.export.export(model, args, dynamic_shapes=shapes, strict=strict)


def save_program(model: nn.Module, path: Union[str, os.PathLike], example=None, *, dynamic: bool = True) -> str:
    """Export with :func:`export_program` and save the program to ``path`` (``.pt2``), atomically."""
    import io

    from .._atomic import write_bytes

    buf = io.BytesIO()
    torch.export.save(export_program(model, example, dynamic=dynamic), buf)
    write_bytes(path, buf.getvalue())
    return str(path)


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], example=None, *, dynamic: bool = True,
                opset: Optional[int] = None) -> str:
    """ONNX export through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with dynamic
    batch and H×W (input ``x``, output ``logits``), saved atomically to ``path``."""
    model = model.eval()
    args = _trace_args(model, example, dynamic)
    shapes = dynamic_shapes(model) if dynamic else None
    extra = {} if opset is None else {"opset_version": opset}
    with torch.no_grad(), _dynamic_context(model, dynamic):
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, input_names=["x"],
                                    output_names=["logits"], **extra)
    from .._atomic import atomic_path

    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return str(path)
