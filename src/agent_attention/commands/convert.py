"""``agent-attention convert IN.pth OUT.safetensors``: official checkpoint -> safetensors, read safely."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main"]

PROG = "agent-attention convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an official .pth checkpoint to .safetensors (read without running pickled code, "
                    "written atomically). The output must be a new file name, not the input or a folder.",
    )
    p.add_argument("src", help="input checkpoint (.pth/.pt/.bin/.safetensors)")
    p.add_argument("dst", help="output .safetensors file (not the input file, not a folder)")
    p.add_argument("--key", default=None,
                   help="entry holding the weights (default: model, model_ema, state_dict_ema, state_dict, raw)")
    p.add_argument("--ema", action="store_true", help="the EMA weights (state_dict_ema / model_ema; an error if the file has none)")
    p.add_argument("--model", default=None,
                   help="validate against this model (strict load) and store its filtered layout")
    return p


def _check_paths(src: Path, dst: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"input {src}: no such file")
    if src.is_dir():
        raise ValueError(f"input {src} is a directory, not a checkpoint file")
    if dst.is_dir():
        raise ValueError(f"output {dst} is a directory; give a file name, e.g. {dst / (src.stem + '.safetensors')}")
    if src.resolve() == dst.resolve() or (dst.exists() and src.samefile(dst)):  # same path, or a hard/sym link
        raise ValueError(f"output {dst} is the input file; refusing to overwrite the source")


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention convert IN.pth OUT.safetensors [--key K] [--ema] [--model NAME]``."""
    from ..weights import export_safetensors, load_checkpoint, prepare_state_dict, select_state_dict

    args = build_parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    with usage_errors():
        _check_paths(src, dst)
        model = None
        if args.model:
            from ..models import create_model  # imports the model families

            model = create_model(args.model)  # real buffers: the filter may copy them into the state
    ckpt = load_checkpoint(args.src)
    state, used = select_state_dict(ckpt, key=args.key, use_ema=args.ema)
    meta: Dict[str, Any] = {"source": src.name, "key": used or "(raw)"}
    if isinstance(ckpt, Mapping):
        meta.update({k: ckpt[k] for k in ("epoch", "max_accuracy", "max_accuracy_e")
                     if isinstance(ckpt.get(k), (int, float)) and not isinstance(ckpt.get(k), bool)})
    if model is not None:
        state = prepare_state_dict(model, state, strict=True)
        meta["model"] = args.model
    export_safetensors(state, dst, metadata=meta)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {dst}: {len(state)} tensors, {n / 1e6:.2f}M values (entry {meta['key']!r})")
    return 0
