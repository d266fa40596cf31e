"""``agent-attention show``: what the agents of one block look at, drawn over an image.

    agent-attention show --model agent_pvt_t --block 1.0 --out agents.png    # random weights
    agent-attention show --checkpoint runs/digits/best.pth --list-blocks      # model read from the checkpoint
    agent-attention show --model agent_swin_t --pretrained --image cat.jpg --block 2.1
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from ._dispatch import command, usage_errors

__all__ = ["build_parser", "main"]

PROG = "agent-attention show"
DEFAULT_MODEL = "agent_pvt_t"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw what the agents of one agent attention block look at over an image: the agent cells, "
                    "which agent each token reads from, and one heat map per chosen agent.",
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None,
                   help=f"agent model name (default: the one stored in --checkpoint, else {DEFAULT_MODEL})")
    p.add_argument("--image", default=None, help="image file (default: scikit-image's 'astronaut' photo)")
    p.add_argument("--checkpoint", default=None,
                   help="weights to load (official .pth or ours; ours also give the model and its kwargs); "
                        "default: random weights")
    p.add_argument("--pretrained", action="store_true",
                   help="the released weights of --model (timm.create_model(name, pretrained=True))")
    p.add_argument("--block", default="1.0", help="stage.index (from 1 and 0), module name or number (default 1.0)")
    p.add_argument("--agents", type=int, nargs="+", default=None, help="agents to draw (default: up to 4 spread out)")
    p.add_argument("--head", type=int, default=None, help="one head (default: mean over heads)")
    p.add_argument("--img-size", type=int, default=None,
                   help="shorter side of the input, at least 16; the aspect ratio is kept (default: the "
                        "checkpoint's, else the model's, e.g. 224)")
    p.add_argument("--out", type=Path, default=Path("agents.png"), help="output PNG file (default agents.png)")
    p.add_argument("--list-blocks", action="store_true", help="print the agent blocks and exit")
    return p


def _build(args: argparse.Namespace):
    """The model, its pretrained cfg and the input size (usage errors only)."""
    from ..models import create_model
    from ._weights import check_model, num_classes_in, read_checkpoint

    if args.pretrained and args.checkpoint:
        raise ValueError("--pretrained and --checkpoint exclude each other")
    if args.img_size is not None and args.img_size < 16:
        raise ValueError(f"--img-size must be at least 16, got {args.img_size}")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a .png file name, e.g. {args.out / 'agents.png'}")
    ckpt, stored = read_checkpoint(args.checkpoint) if args.checkpoint else (None, {})
    name = args.model or stored.get("model") or DEFAULT_MODEL
    kwargs = dict(stored.get("model_kwargs") or {})
    if ckpt is not None:
        n = stored.get("num_classes") or num_classes_in(ckpt, name, kwargs, stored.get("img_size"))
        if n:
            kwargs["num_classes"] = n
    if args.img_size:
        kwargs["img_size"] = args.img_size
    elif stored.get("img_size"):
        kwargs.setdefault("img_size", stored["img_size"])
    size = kwargs.get("img_size")
    check_model(name, kwargs, None, None)
    from ._weights import cli_weights_hint

    with cli_weights_hint():
        model = create_model(name, pretrained=args.pretrained, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = size or int(cfg.get("input_size", (3, 224, 224))[-1])
    return model, ckpt, cfg, name, size


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    from .. import viz
    from ..weights import load_official_checkpoint

    args = build_parser().parse_args(argv)
    with usage_errors():
        model, ckpt, cfg, name, size = _build(args)
        image = viz.load_image(args.image, size, keep_aspect=True)
    if ckpt is not None:
        load_official_checkpoint(model, ckpt)
    x = viz._to_tensor(image, cfg.get("mean", viz.IMAGENET_MEAN), cfg.get("std", viz.IMAGENET_STD))
    with usage_errors():  # a model without agent blocks
        calls = viz.capture_agent_calls(model, x)
    if args.list_blocks:
        for c in calls:
            print(f"{c.label:>6}  #{c.number:<3} {c.name:<28} grid {c.hw[0]}x{c.hw[1]}  C={c.module.dim} "
                  f"heads={c.module.num_heads} agents={c.module.agent_num}")
        return 0
    with usage_errors():  # --block, --head, --agents
        call = viz.select_call(calls, args.block)
        maps = viz.agent_maps(call, args.head)
        n = maps["agent_to_token"].shape[-1]
        agents = args.agents if args.agents is not None else sorted({0, n // 3, (2 * n) // 3, n - 1})
        bad = [a for a in agents if not 0 <= a < n]
        if bad:
            raise ValueError(f"--agents {bad} out of range: block {call.name} has {n} agents (0..{n - 1})")
    if args.checkpoint:
        weights = f"weights: {Path(args.checkpoint).name}"
    elif args.pretrained:
        weights = "weights: released (pretrained)"
    else:
        weights = "RANDOM weights (no --checkpoint): maps show an untrained model"
    head = "mean of heads" if args.head is None else f"head {args.head}"
    title = (f"{name}, block {call.label} ({call.name}), token grid {call.hw[0]}×{call.hw[1]}, "
             f"{n} agents, {head}\n{weights}")
    path = viz.draw(image, maps, agents, title, args.out)
    print(f"wrote {path}")
    return 0
