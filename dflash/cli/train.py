"""``dflash-train``: train a drafter from a YAML config, then report held-out tau vs n-gram."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash.config import ConfigError
from dflash.configio import load_yaml
from dflash.models import CheckpointError
from dflash.training.config import ExperimentConfig
from dflash.training.trainer import TrainingError, run_training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash-train", description=__doc__)
    p.add_argument("--config", default="configs/tiny_code.yaml", help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--run-dir", default=None, help="shorthand for --set run_dir=DIR")
    p.add_argument("--init-from", default=None, metavar="DRAFTER",
                   help="continue training an exported drafter (directory, shipped name or hub id); "
                        "shorthand for --set drafter.init_from=DRAFTER")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from the last checkpoint (default when the run dir has one)")
    resume.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the config's real train step for --topology on abstract sharded state and "
                        "print the memory / FLOP plan (no weights, tokenizer or data; needs libtpu)")
    p.add_argument("--topology", default=None, help="TPU slice for --compile-only (dflash.plan.TOPOLOGIES)")
    p.add_argument("--json", default=None, metavar="OUT", help="--compile-only: also write the plan here")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"drafter.init_from={args.init_from}"] if args.init_from else []
    if args.compile_only:
        return _compile_only(args, overrides)
    try:
        cfg = load_yaml(ExperimentConfig, args.config, overrides)
        result = run_training(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as err:
        print(f"dflash-train: error: {err}", file=sys.stderr)
        return 2
    final = result.get("final_eval") or {}
    print(f"run dir: {cfg.run_dir}  (checkpoints, tb/, export/, metrics.json)")
    print(f"simulated tau on held-out rows: {final.get('tau_sim', float('nan')):.2f} per anchor, "
          f"{final.get('tau_sim_steps', float('nan')):.2f} per verify step")
    if "tau" in result:
        name = {"dflash": "DFlash", "orthrus": "Orthrus"}.get(result.get("method", cfg.method), cfg.method)
        print(f"held-out tau, greedy, B={result.get('block_size', cfg.block_size)}, {result['eval_prompts']} "
              f"prompts: {name} drafter {result['tau']:.2f} | "
              f"prompt-lookup (n-gram) {result['tau_ngram']:.2f}"
              + (f" | both in one tree (--ngram-branch) {result['tau_with_ngram']:.2f}"
                 if "tau_with_ngram" in result else ""))
    return 0


def _compile_only(args: argparse.Namespace, overrides: list[str]) -> int:
    from dflash.plan import TOPOLOGIES, summary, train_plan

    if not args.topology:
        print(f"dflash-train: error: --compile-only needs --topology (one of {', '.join(TOPOLOGIES)})",
              file=sys.stderr)
        return 2
    try:
        cfg = load_yaml(ExperimentConfig, args.config, overrides)
        plan = train_plan(cfg, args.topology, config_name=args.config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"dflash-train: error: {err}", file=sys.stderr)
        return 2
    print(summary(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
