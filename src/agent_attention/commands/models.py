"""``agent-attention models``: the model zoo with parameters, GFLOPs and the paper's top-1, and the
detection / segmentation releases with the paper's COCO mAP and ADE20K mIoU."""
from __future__ import annotations

import argparse
from typing import List, Optional

from ._dispatch import command

__all__ = ["build_parser", "main"]

PROG = "agent-attention models"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=(
        "List the registered Agent Attention models with parameters, GFLOPs (fvcore convention: one "
        "multiply-add = one FLOP, batch 1, default input size) and the paper's ImageNet top-1; then the "
        "released detection / segmentation models with the paper's COCO box / mask mAP and ADE20K mIoU."))
    p.add_argument("--task", choices=("all", "cls", "dense", "det", "seg"), default="all",
                   help="all: both tables (default); cls: the classifiers; dense / det / seg: the detection and "
                        "segmentation models (csv holds one table: choose one)")
    p.add_argument("--format", choices=("table", "markdown", "csv"), default="table",
                   help="output format: aligned text table, GitHub markdown or CSV (default: table)")
    p.add_argument("--markdown", action="store_true", help="shorthand for --format markdown")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip counting GFLOPs (counting traces a forward pass of every model: about a second each)")
    p.add_argument("--names", choices=("official", "all"), default="official",
                   help="official: the 18 released models; all: every registered model")
    p.add_argument("--no-aliases", action="store_true", help="leave out the aliases column")
    return p


@command(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """``agent-attention models [--format table|markdown|csv] [--no-flops] [--names official|all]``."""
    from ..models import report

    from ..dense.releases import format_releases
    from ._dispatch import usage_errors

    args = build_parser().parse_args(argv)
    fmt, flops = ("markdown", True) if args.markdown else (args.format, args.flops)
    with usage_errors():
        if fmt == "csv" and args.task == "all":
            raise ValueError("--format csv holds one table: add --task cls or --task dense (or det / seg)")
    if args.task in ("all", "cls"):
        rows = report.collect_with_progress(args.names, flops=flops)
        print(report.format_rows(rows, fmt, aliases=not args.no_aliases))
    if args.task != "cls":
        if args.task == "all":
            title = "Detection (COCO val2017) and segmentation (ADE20K val, single scale) models:"
            print("\n" + (f"**{title}**" if fmt == "markdown" else title) + "\n")
        task = None if args.task in ("all", "dense") else args.task
        print(format_releases(fmt, task, released_only=args.names == "official"))
    return 0
