"""Thin entry point: ``python train/regenerate_data.py --target T --data D --out OUT.jsonl``."""

from dflash.cli.regenerate import main

if __name__ == "__main__":
    raise SystemExit(main())
