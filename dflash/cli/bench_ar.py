"""``dflash-bench-ar``: AR tokens/s of our engine vs ``transformers`` generate, same prompts."""

from __future__ import annotations

import argparse

from dflash.bench import ar_vs_transformers, write_json
from dflash.checks import COUNT, flag
from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser
from dflash.training.tiny_corpus import heldout_prompts


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-bench-ar", __doc__)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--num-prompts", type=flag(COUNT), default=4, help="held-out stdlib code prompts")
    p.add_argument("--max-new-tokens", type=flag(COUNT), default=256)
    p.add_argument("--repeats", type=flag(COUNT), default=3)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    return run_command("dflash-bench-ar", lambda: _bench_ar(args))


def _bench_ar(args: argparse.Namespace) -> int:
    result = ar_vs_transformers(args.target, heldout_prompts(args.num_prompts),
                                max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print("tokens/s over each side's whole call (ours: generate(); transformers: model.generate())")
    print(f"{'prompt':>6} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} same  (ours, program only)")
    for i, row in enumerate(result["per_prompt"]):
        print(f"{i:>6} {row['ours_tokens_per_s']:>11.1f} {row['hf_tokens_per_s']:>9.1f} "
              f"{row['ratio']:>6.2f} {row['same_tokens']!s:5} ({row['ours_program_tokens_per_s']:.1f})")
    print(f"mean: ours {result['ours_tokens_per_s']:.1f} tok/s, transformers "
          f"{result['transformers_tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.2f}x "
          f"(backend {result['backend']}, torch threads {result['torch_threads']})")
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
