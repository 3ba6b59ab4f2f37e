"""``dflash-bench-kernels``: each Pallas kernel vs its reference (and XLA's fused attention), as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from dflash.bench.kernels import _print, run
from dflash.cli.parser import make_parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser("dflash-bench-kernels", __doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: proves the script runs (CPU)")
    parser.add_argument("--out", type=Path, default=Path("kernels_bench.json"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--block", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--slack", type=int, default=512, help="cache slots beyond prefix + block")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--anchors", type=int, default=512, help="training shape: anchor blocks per sequence")
    parser.add_argument("--train-context", type=int, default=3072, help="training shape: context length")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prefix, args.block, args.slack, args.iters = [13], [4], 5, 2
        args.anchors, args.train_context = 3, 24
    report = run(args.smoke, args.batch, args.prefix, args.block, args.slack, jnp.dtype(args.dtype),
                 args.iters, args.anchors, args.train_context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    _print(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
