"""``agent-attention export``: a zoo model to ONNX (dynamo exporter) or a ``torch.export`` program.

    agent-attention export --model agent_swin_t --format onnx --output agent_swin_t.onnx
    agent-attention export --model agent_pvt_t --format pt2 --checkpoint run/best.pth --verify

Batch, height and width are dynamic (H, W multiples of the model's coarsest stride; ``--static``
exports the example size only). ``--verify`` runs the export (onnxruntime for ONNX) at batch 1 and
3 and two other sizes and compares with the eager model (max abs difference, must be <= 1e-4); a
file that fails it is not written.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention export", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", required=True, help="zoo model name (see `agent-attention models`)")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="ONNX file or torch.export program")
    p.add_argument("--output", default=None, help="output file (default: <model>.<format>)")
    p.add_argument("--checkpoint", default=None, help="weights to load (ours, an official .pth or .safetensors)")
    p.add_argument("--pretrained", action="store_true", help="the released weights (timm's pretrained=True)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--model-kwargs", default=None, help="JSON dict of extra create_model arguments")
    p.add_argument("--size", type=int, nargs="+", default=None, help="example H [W] (default: the cfg's input size)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--static", action="store_true", help="fixed shapes: the example's only")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--verify", action="store_true", help="compare the export with eager at batch 1 and 3 and two other sizes; nothing is written if it fails")
    return p


class VerifyError(RuntimeError):
    """The export does not reproduce the eager model (raised by :func:`_verify`)."""


def _verify(model, path: str, fmt: str, example, dynamic: bool) -> float:
    """Run the export at batch 1 and 3 and two other (non-square) sizes (dynamic) or at the example's
    shape (static) against eager; returns the worst max abs difference, :class:`VerifyError` if a
    shape does not run."""
    import torch

    from ..models.export import example_input, size_multiple

    m = size_multiple(model)
    h, w = example.shape[-2:]
    b = example.shape[0]
    h1 = h + m if h + m != w else h + 2 * m  # two non-square sizes other than the example's
    w2 = w + 2 * m if w + 2 * m != h else w + m
    shapes = [(1, h1, w), (3, h, w2)] if dynamic else [(b, h, w)]
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])  # noqa: E731
    else:
        import io
        from pathlib import Path

        prog = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()  # the temp file's name is not *.pt2
        run = prog
    worst = 0.0
    for bs, hh, ww in shapes:
        x = example_input(model, (hh, ww), batch=bs)
        with torch.no_grad():
            try:
                got = run(x)
            except Exception as e:  # a guard of the program, an onnxruntime shape error ...
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise VerifyError(f"the export does not run at {tuple(x.shape)}: {first}") from None
            diff = (got.float() - model(x).float()).abs().max().item()
        print(f"  verify {tuple(x.shape)}: max |export - eager| = {diff:.3g}")
        worst = max(worst, diff)
    return worst


def _export_to(model, path, fmt: str, example, dynamic: bool, opset: Optional[int]) -> None:
    from ..models.export import export_onnx, save_program

    if fmt == "onnx":
        export_onnx(model, path, example, dynamic=dynamic, opset=opset)
    else:
        save_program(model, path, example, dynamic=dynamic)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .._atomic import atomic_path
    from ..models import create_model
    from ..models.export import _args

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        print("agent-attention export: --model-kwargs must be a JSON object", file=sys.stderr)
        return 2
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.batch < 1:
        print(f"agent-attention export: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    out = args.output or f"{args.model}.{args.format}"
    dynamic = not args.static
    try:
        from ._weights import cli_weights_hint

        with cli_weights_hint():
            model = create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint or "",
                                 **kwargs).eval()
        size = None if not args.size else (args.size * 2)[:2]
        example = _args(model, (args.batch, 3, *size) if size else None)[0]
        if size is None and args.batch != example.shape[0]:
            example = _args(model, (args.batch, 3, *example.shape[-2:]))[0]
        # written to a temp file next to the output, verified there, then renamed: a file that
        # failed verification never takes the output's name
        with atomic_path(out) as tmp:
            _export_to(model, tmp, args.format, example, dynamic, args.opset)
            if args.verify:
                worst = _verify(model, str(tmp), args.format, example, dynamic)
                if worst > 1e-4:
                    raise VerifyError(f"export differs from eager by {worst:.3g} (> 1e-4)")
    except VerifyError as e:
        print(f"agent-attention export: verification failed, nothing written to {out}: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"agent-attention export: {e}", file=sys.stderr)
        return 2
    kind = "dynamic batch and HxW" if dynamic else f"fixed shape {tuple(example.shape)}"
    print(f"exported {args.model} ({kind}) to {out}" + (" (verified)" if args.verify else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
