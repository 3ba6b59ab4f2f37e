"""Thin entry point: ``python infer/bench_ar.py --target tiny-code --json out.json``."""

from dflash.cli.bench_ar import main

if __name__ == "__main__":
    raise SystemExit(main())
