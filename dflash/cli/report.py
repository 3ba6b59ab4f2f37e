"""``dflash-report RUN_DIR``: a one-page report of a training run (Markdown + PNGs) under RUN_DIR/report/."""

from __future__ import annotations

import argparse
from pathlib import Path

from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-report", __doc__)
    p.add_argument("run_dir", type=Path, help="a dflash-train run directory")
    p.add_argument("--out", type=Path, default=None, help="where to write it (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    return run_command("dflash-report", lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    from dflash.viz.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
