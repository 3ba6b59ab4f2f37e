"""``dflash-pretrain-target``: pretrain the tiny code target on the stdlib corpus."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dflash.checks import flag
from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser
from dflash.training.pretrain import RANGES, PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("dflash-pretrain-target", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="HF-format output directory")
    for field in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=flag(RANGES[field.name]),
                            default=field.default)
    args = parser.parse_args(argv)
    return run_command("dflash-pretrain-target", lambda: _pretrain(args))


def _pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    result = pretrain(cfg, args.out)
    print(f"held-out loss {result['heldout_loss']:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
