"""``dflash-report RUN_DIR``: a one-page report of a training run (Markdown + PNGs) under RUN_DIR/report/."""

from __future__ import annotations

import sys
from pathlib import Path

from dflash.cli.parser import make_parser
from dflash.viz.errors import VizError


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-report", __doc__)
    p.add_argument("run_dir", type=Path, help="a dflash-train run directory")
    p.add_argument("--out", type=Path, default=None, help="where to write it (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    from dflash.viz.report import write_report

    try:
        path = write_report(args.run_dir, args.out)
    except (VizError, OSError) as err:
        print(f"dflash-report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
