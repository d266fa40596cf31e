"""Parameter and FLOP counts of the model zoo (the library behind ``agent-attention models``).

FLOPs follow the convention of the official numbers (fvcore ``FlopCountAnalysis``, batch 1):
**one multiply-add is one FLOP**. fvcore counts matrix products (``linear``/``addmm``, ``matmul``,
``bmm``, ``einsum``) and convolutions by their multiply-adds, bias additions excluded; and, as rough
extras, ``layer_norm``/``group_norm`` 5 per element (4 without affine), eval ``batch_norm`` 2 per
element, ``upsample_bilinear2d`` 4 per output element, ``upsample_nearest2d`` 1, ``adaptive_avg_pool2d``
1 per input element, ``grid_sampler`` 4 per output element. Everything else (softmax, GELU,
additions, ``mean``, 1-D pooling, 1-D interpolation) is free.

We count with :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add, so the
total is halved) plus handlers for fvcore's extras, on a **meta-device** model and input (shapes
only: nothing is allocated or computed). Fused kernels hide their work from counters (CPU
``scaled_dot_product_attention`` counts 0), so counting runs agent attention through its math path
(:func:`agent_attention.functional.fused` ``(False)``) and softmax attention through the SDPA MATH
backend.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ModelStats", "count_params", "count_flops", "count_flops_by_op", "model_stats", "collect", "collect_with_progress", "format_rows", "model_table"]

aten = torch.ops.aten


def _prod(shape) -> int:
    return math.prod(shape) if shape is not None else 0


# fvcore's extra handlers, in FlopCounterMode units (2 per multiply-add): receive shapes
def _norm(affine_index: int, training_index: Optional[int] = None):
    def count(*args, out_shape=None, **kwargs) -> int:
        numel = _prod(args[0])
        affine = len(args) > affine_index and args[affine_index] is not None
        if training_index is not None and not args[training_index]:
            return 2 * numel * (2 if affine else 1)  # eval batch norm: scale and shift
        return 2 * numel * (5 if affine else 4)

    return count


def _per_output(scale: int):
    return lambda *args, out_shape=None, **kwargs: 2 * scale * _prod(out_shape)


def _per_input(*args, out_shape=None, **kwargs) -> int:
    return 2 * _prod(args[0])


FVCORE_EXTRA_OPS = {
    aten.native_layer_norm: _norm(2),
    aten.native_group_norm: _norm(1),
    aten.native_batch_norm: _norm(1, training_index=5),
    aten.upsample_bilinear2d: _per_output(4),
    aten.upsample_nearest2d: _per_output(1),
    aten.grid_sampler_2d: _per_output(4),
    aten._adaptive_avg_pool2d: _per_input,
}


def count_params(model: nn.Module) -> int:
    """``sum(p.numel() for p in model.parameters())`` (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def _input_size(model: nn.Module, input_size) -> Tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size=(C, H, W)")
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    if len(input_size) == 2:
        input_size = (3, *input_size)
    return tuple(int(s) for s in input_size)  # type: ignore[return-value]


def count_flops_by_op(model: nn.Module, input_size: Optional[Sequence[int]] = None, *,
                      fvcore_extras: bool = True) -> Dict[str, int]:
    """FLOPs (one multiply-add = one FLOP) of one batch-1 forward pass, per aten op.

    ``input_size`` is ``(C, H, W)``, ``(H, W)`` or ``H``; default: the model's
    ``pretrained_cfg['input_size']``. Build the model under ``torch.device("meta")`` to count
    without allocating anything. ``fvcore_extras=False`` counts only matrix products and
    convolutions.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ..functional import fused

    c, h, w = _input_size(model, input_size)
    param = next(model.parameters(), None)
    x = torch.zeros(1, c, h, w, device=param.device if param is not None else "meta",
                    dtype=param.dtype if param is not None else torch.float32)
    counter = FlopCounterMode(display=False, custom_mapping=FVCORE_EXTRA_OPS if fvcore_extras else {})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fused(False), sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
    finally:
        model.train(was_training)
    by_op = counter.get_flop_counts().get("Global", {})
    return {str(op).replace("aten.", ""): int(n) // 2 for op, n in by_op.items() if n}


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None, *, fvcore_extras: bool = True) -> int:
    """Total of :func:`count_flops_by_op`: the number the official tables (fvcore) report."""
    return sum(count_flops_by_op(model, input_size, fvcore_extras=fvcore_extras).values())


@dataclass
class ModelStats:
    """One row of the model table."""

    name: str
    aliases: List[str] = field(default_factory=list)
    input_size: Tuple[int, int, int] = (3, 224, 224)
    params: int = 0
    flops: Optional[int] = None
    paper_top1: Optional[float] = None

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / 1e9


def _build_meta(name: str) -> nn.Module:
    from . import create_model

    with torch.device("meta"):
        return create_model(name)


def model_stats(name: str, flops: bool = False) -> ModelStats:
    """Params (and with ``flops=True`` GFLOPs at the default input size) of a registered model."""
    from .registry import ALIASES, PAPER_TOP1

    official = ALIASES.get(name, name)
    try:
        model = _build_meta(official)
        n_flops = count_flops(model) if flops else None
    except (NotImplementedError, RuntimeError):  # an op without meta support: count for real
        from . import create_model

        model = create_model(official)
        n_flops = count_flops(model) if flops else None
    return ModelStats(
        name=official,
        aliases=sorted(a for a, o in ALIASES.items() if o == official),
        input_size=_input_size(model, None),
        params=count_params(model),
        flops=n_flops,
        paper_top1=PAPER_TOP1.get(official),
    )


def _names(which: str) -> List[str]:
    from . import list_models
    from .registry import PAPER_TOP1

    if which == "official":
        return list(PAPER_TOP1)
    if which == "all":
        registered = list_models(aliases=False)
        return list(PAPER_TOP1) + [n for n in registered if n not in PAPER_TOP1]
    raise ValueError(f"names must be 'official' or 'all', got {which!r}")


def collect(names: str = "official", flops: bool = False, progress: bool = False) -> List[ModelStats]:
    """:func:`model_stats` of every official (or every registered) model, in zoo order."""
    todo = _names(names)
    rows = []
    for i, name in enumerate(todo):
        if progress:
            print(f"[{i + 1}/{len(todo)}] {name}", file=sys.stderr, flush=True)
        rows.append(model_stats(name, flops=flops))
    return rows


def collect_with_progress(names: str = "official", flops: bool = False, stream=None) -> List[ModelStats]:
    """:func:`collect` telling ``stream`` (default: stderr) what it does: on a terminal one line
    updated per model, in a pipe or log one line before it starts (counting FLOPs traces a forward
    pass of each model, about a second per model)."""
    stream = sys.stderr if stream is None else stream
    todo = _names(names)
    what = "params and GFLOPs" if flops else "params"
    tty = stream.isatty()
    if not tty:
        hint = " (--no-flops skips the FLOP count)" if flops else ""
        print(f"counting {what} of {len(todo)} models{hint} ...", file=stream, flush=True)
    rows = []
    for i, name in enumerate(todo):
        if tty:
            print(f"\rcounting {what}: [{i + 1}/{len(todo)}] {name}\033[K", end="", file=stream, flush=True)
        rows.append(model_stats(name, flops=flops))
    if tty:
        print("\r\033[K", end="", file=stream, flush=True)
    return rows


def format_rows(rows: Iterable[ModelStats], fmt: str = "table", aliases: bool = True) -> str:
    """Render rows as an aligned text ``table``, GitHub ``markdown`` or ``csv``."""
    rows = list(rows)
    with_flops = any(r.flops is not None for r in rows)
    head = ["model"] + (["aliases"] if aliases else []) + ["input", "params (M)"]
    head += (["GFLOPs"] if with_flops else []) + ["paper top-1 (%)"]
    body = []
    for r in rows:
        size = f"{r.input_size[1]}{'x' if fmt == 'csv' else '×'}{r.input_size[2]}"
        cells = [r.name] + ([", ".join(r.aliases)] if aliases else []) + [size, f"{r.params_m:.2f}"]
        cells += ([f"{r.gflops:.2f}" if r.gflops is not None else ""] if with_flops else [])
        cells += [f"{r.paper_top1:.1f}" if r.paper_top1 is not None else ""]
        body.append(cells)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(body)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        right = [h in ("params (M)", "GFLOPs", "paper top-1 (%)") for h in head]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    if fmt == "table":
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        numeric = [h in ("params (M)", "GFLOPs", "paper top-1 (%)") for h in head]

        def line(cells) -> str:
            return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in body])
    raise ValueError(f"format must be 'table', 'markdown' or 'csv', got {fmt!r}")


def model_table(markdown: bool = True, names: str = "official", flops: bool = True, aliases: bool = False) -> str:
    """The README model table: model, input size, params (M), GFLOPs, paper top-1."""
    return format_rows(collect(names, flops=flops), "markdown" if markdown else "table", aliases=aliases)
