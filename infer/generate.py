"""Thin entry point: ``python infer/generate.py --target tiny-code --prompt ...``."""

from dflash.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
