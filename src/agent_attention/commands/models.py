"""``agent-attention models``: the model zoo with parameters, GFLOPs and the paper's top-1."""
from __future__ import annotations

import argparse
from typing import List, Optional

from ._dispatch import command

__all__ = ["build_parser", "main"]

PROG = "agent-attention models"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=(
        "List the registered Agent Attention models with parameters, GFLOPs (fvcore convention: one "
        "multiply-add = one FLOP, batch 1, default input size) and the paper's ImageNet top-1."))
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

    args = build_parser().parse_args(argv)
    fmt, flops = ("markdown", True) if args.markdown else (args.format, args.flops)
    rows = report.collect_with_progress(args.names, flops=flops)
    print(report.format_rows(rows, fmt, aliases=not args.no_aliases))
    return 0
