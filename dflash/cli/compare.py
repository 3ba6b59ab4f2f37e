"""``dflash-compare``: drafter recipes trained on one budget with several seeds, decoded side by side.

Each ``--config`` recipe trains under every seed (``RUN_DIR = OUT/<config stem>-seed<S>``; finished
runs are skipped, stopped ones resume), on the same regenerated data and ``--steps`` budget; then
every trained drafter decodes the same held-out prompts in one engine, greedy and at each
``--temperatures``. Prints tau per recipe (mean, min..max over seeds), writes JSON and figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dflash.bench import load_prompts, write_json
from dflash.bench.compare import Recipe, check_one_target, decode_all, recipe_config, summarize, train_all
from dflash.checks import BLOCK, COUNT, INTEGER, NON_NEGATIVE, flag, flag_list
from dflash.cli.failures import run_command
from dflash.cli.parser import add_dynamic_tree_arg, make_parser
from dflash.cli.train import config_file
from dflash.config import DTYPES
from dflash.errors import ConfigError
from dflash.io.loading import load_target
from dflash.io.tokenizer import eos_ids, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-compare", __doc__)
    p.add_argument("--config", action="append", required=True, metavar="RECIPE",
                   help="a training config (file or shipped name), repeatable: one recipe per drafter kind")
    p.add_argument("--seeds", type=flag_list(INTEGER), default=[0, 1, 2],
                   help="train.seed of each run (initialisation and data order)")
    p.add_argument("--steps", type=flag(COUNT), default=None,
                   help="the budget: train.steps of every run (default: each recipe's own)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override applied to every recipe")
    p.add_argument("--out", default="runs/compare", help="run directories go here")
    p.add_argument("--temperatures", type=flag_list(NON_NEGATIVE), default=[0.0, 1.0])
    p.add_argument("--block-sizes", type=flag_list(BLOCK), default=[],
                   help="also decode each drafter at these blocks smaller than its own (method RECIPE@B<k>: "
                        "a block drafter's pass over k positions, a stepwise one's chain of k - 1 steps)")
    add_dynamic_tree_arg(p, "also decode stepwise drafters (EAGLE-3, MTP) as an EAGLE-2 dynamic tree "
                            "(method RECIPE@dynamic-tree; depth capped at the drafter's trained chain)")
    p.add_argument("--prompts", default="tiny-code-heldout",
                   help="jsonl file ({'prompt'} or {'messages'} rows), a datasets id, or tiny-code-heldout")
    p.add_argument("--num-prompts", type=flag(COUNT), default=32)
    p.add_argument("--max-new-tokens", type=flag(COUNT), default=128)
    p.add_argument("--batch-size", type=flag(COUNT), default=8)
    p.add_argument("--seed", type=flag(INTEGER), default=0, help="sampling seed of the decoding")
    p.add_argument("--eval-only", action="store_true", help="decode the runs already trained; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while training")
    p.add_argument("--json", default=None, help="write the summary and every decoding result here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write the comparison figure(s) here")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    return run_command("dflash-compare", lambda: _compare(args), verbose=args.verbose)


def _compare(args: argparse.Namespace) -> int:
    recipes = [Recipe(Path(c).stem, config_file(c)) for c in args.config]
    if len({r.name for r in recipes}) != len(recipes):
        names = [r.name for r in recipes]
        raise ConfigError(f"--config names must differ (run dirs are named by them): {names}")
    out = Path(args.out)
    overrides = [*args.overrides, *([f"train.steps={args.steps}"] if args.steps else [])]
    cfgs = [recipe_config(r, s, out, overrides) for s in args.seeds for r in recipes]
    target_name, dtype = check_one_target(cfgs)
    if args.eval_only:
        pairs = [(r.name, s) for s in args.seeds for r in recipes]  # cfgs' order below
        runs = {pair: Path(c.run_dir) for pair, c in zip(pairs, cfgs, strict=True)}
        missing = [str(d) for d in runs.values() if not (d / "export").exists()]
        if missing:
            raise ConfigError(f"--eval-only: these runs have no export yet: {', '.join(missing)}")
    else:
        runs = train_all(recipes, args.seeds, out, overrides, progress=not args.no_progress)
    tokenizer = load_tokenizer(target_name)
    target = load_target(target_name, dtype=DTYPES[dtype])
    prompts = load_prompts(args.prompts, tokenizer, limit=args.num_prompts)
    by_temperature = decode_all(target, prompts, runs, temperatures=args.temperatures,
                                extra_blocks=args.block_sizes, dynamic_tree=args.dynamic_tree,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                eos_ids=eos_ids(tokenizer, target.cfg.eos_token_id), seed=args.seed)
    summary = summarize(by_temperature)
    steps = sorted({c.train.steps for c in cfgs})
    print(f"{len(recipes)} recipes x seeds {args.seeds}, {steps} steps each, {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, target {target_name}")
    for temperature, groups in summary.items():
        print(f"T={temperature}:")
        width = max(len(g) for g in groups)
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["mean"]):
            print(f"  {name:>{width}}  tau {g['mean']:.2f}  (min {g['min']:.2f}, max {g['max']:.2f}, "
                  f"sd {g['std']:.2f}; B={g['block_size']}, {len(g['taus'])} run(s))")
    record = {"recipes": {r.name: str(r.config) for r in recipes}, "seeds": args.seeds, "steps": steps,
              "overrides": overrides, "target": target_name, "prompts": args.prompts,
              "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "summary": summary, "results": by_temperature}
    if args.json:
        write_json(record, args.json)
    if args.plots:
        from dflash.viz.figures import compare_figures

        print("figures:", ", ".join(str(p) for p in compare_figures(record, args.plots)))
    broken = sorted({n for r in by_temperature.values() for n in r.get("not_lossless", [])})
    if broken:  # after the record is written: the results stay for the diagnosis
        print(f"dflash-compare: error: greedy tokens differ from the target's for {', '.join(broken)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
