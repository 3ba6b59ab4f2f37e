"""Thin entry point: ``python infer/bench.py --drafter DIR --prompts FILE.jsonl --json out.json``."""

from dflash.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
