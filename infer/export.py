"""Thin entry point: ``python infer/export.py --run runs/tiny_code --out exported/``."""

from dflash.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
