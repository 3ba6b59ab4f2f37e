"""``dflash-pretrain-target``: pretrain the tiny code target on the stdlib corpus (``--architecture
gemma4``: a Gemma-4-architecture one of the same sizes)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dflash.checks import flag
from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser
from dflash.training.pretrain import CHOICES, RANGES, PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("dflash-pretrain-target", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="HF-format output directory")
    for field in dataclasses.fields(PretrainConfig):
        name = f"--{field.name.replace('_', '-')}"
        if field.name in CHOICES:
            parser.add_argument(name, choices=CHOICES[field.name], default=field.default)
        else:
            parser.add_argument(name, type=flag(RANGES[field.name]), default=field.default)
    args = parser.parse_args(argv)
    return run_command("dflash-pretrain-target", lambda: _pretrain(args))


def _pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    result = pretrain(cfg, args.out)
    print(f"held-out loss {result['heldout_loss']:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
