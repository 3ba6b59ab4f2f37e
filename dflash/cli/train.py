"""``dflash-train``: train a drafter from a YAML config, then report held-out tau vs n-gram."""

from __future__ import annotations

import argparse
from pathlib import Path

from dflash.cli.failures import compile_only, run_command
from dflash.cli.parser import add_compile_only_args, make_parser
from dflash.configio import load_yaml
from dflash.distributed import add_distributed_args, is_primary
from dflash.drafters import drafter_kind
from dflash.errors import ConfigError
from dflash.fingerprint import initialize_from_args
from dflash.io.loading import ASSETS
from dflash.training.config import ExperimentConfig
from dflash.training.trainer import run_training
from dflash.viz.report import write_report

SHIPPED_CONFIGS = {p.stem: p for p in sorted((ASSETS / "configs").glob("*.yaml"))}


def config_file(name: str | None) -> Path:
    """``--config``: an existing file, else a shipped config's name; None: the shipped tiny_code.

    The default lives in the package, so ``dflash-train`` works from any directory.
    """
    if name is None:
        return SHIPPED_CONFIGS["tiny_code"]
    if not Path(name).exists() and name in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[name]
    if not Path(name).exists():
        raise ConfigError(f"config file {name} does not exist (from {Path.cwd()}); shipped configs, "
                          f"usable by name from any directory: {', '.join(SHIPPED_CONFIGS)}")
    return Path(name)


# --quick: a try of the whole pipeline in a few minutes on a laptop (a short schedule, fewer and
# shorter real-tau prompts; regeneration follows the step count). Explicit --set values win.
QUICK = ("train.steps=20", "train.log_every=5", "train.eval_every=10", "train.save_every=10",
         "eval.num_prompts=2", "eval.max_new_tokens=32")


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-train", __doc__)
    p.add_argument("--config", default=None,
                   help="YAML experiment config: a file, or a config shipped in the package by name "
                        f"({', '.join(SHIPPED_CONFIGS)}); default: the shipped tiny_code, the README's main "
                        "job (configs/ in the repository holds the same files to copy and edit)")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per train.log_every steps instead")
    p.add_argument("--quick", action="store_true",
                   help=f"a short try: {' '.join(QUICK)}, in RUN_DIR-quick (--set / --run-dir still win)")
    p.add_argument("--extend", action="store_true",
                   help="continue a run with a larger train.steps (or epochs), optimizer state included; "
                        "the remaining steps follow the LR schedule of a run planned for the new total")
    add_compile_only_args(p, "compile the config's real train step for --topology on abstract sharded state "
                             "and print the memory / FLOP plan (no weights, tokenizer or data; needs libtpu)",
                          target_config=False)
    p.add_argument("--verbose", action="store_true",
                   help="on an error, also print its full detail; full logs on every process, not only "
                        "process 0")
    add_distributed_args(p, verbose_flag=False)
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"drafter.init_from={args.init_from}"] if args.init_from else []
    if args.compile_only:
        return _compile_only(args, overrides)
    return run_command("dflash-train", lambda: _train(args, overrides), verbose=args.verbose)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    initialize_from_args(args)
    path = config_file(args.config)
    if args.quick:
        run_dir = load_yaml(ExperimentConfig, path).run_dir.rstrip("/") + "-quick"
        overrides = [*QUICK, f"run_dir={run_dir}", *overrides]
    cfg = load_yaml(ExperimentConfig, path, overrides)
    result = run_training(cfg, resume=args.resume, progress=not args.no_progress, extend=args.extend)
    if not is_primary():  # process 0 reports for the job
        return 0
    final = result.get("final_eval") or {}
    if result.get("already_complete"):
        print(f"{cfg.run_dir} is already complete ({result.get('steps')} of {result.get('steps')} steps); "
              "nothing was run. Its results (metrics.json):")
    print(f"run dir: {cfg.run_dir}  (checkpoints, tb/, export/, metrics.json)")
    print(f"simulated tau on held-out rows: {final.get('tau_sim', float('nan')):.2f} per anchor, "
          f"{final.get('tau_sim_steps', float('nan')):.2f} per verify step")
    if "tau" in result:
        name = drafter_kind(result.get("method", cfg.method)).label
        print(f"held-out tau, greedy, B={result.get('block_size', cfg.block_size)}, {result['eval_prompts']} "
              f"prompts: {name} drafter {result['tau']:.2f} | "
              f"prompt-lookup (n-gram) {result['tau_ngram']:.2f}"
              + (f" | both in one tree (--ngram-branch) {result['tau_with_ngram']:.2f}"
                 if "tau_with_ngram" in result else ""))
    print(f"report: {write_report(cfg.run_dir)}  (curves, tau vs lookup, acceptance; dflash-report RUN_DIR)")
    if result.get("already_complete"):
        print(f"To train longer: --set train.steps=N --extend (N > {result.get('steps')}); to start over: "
              "a new --run-dir")
    return 0


def _compile_only(args: argparse.Namespace, overrides: list[str]) -> int:
    from dflash.plan import train_plan

    return compile_only("dflash-train", args, lambda: train_plan(
        load_yaml(ExperimentConfig, config_file(args.config), overrides), args.topology,
        config_name=str(args.config or "tiny_code")))


if __name__ == "__main__":
    raise SystemExit(main())
