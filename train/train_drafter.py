"""Thin entry point: ``python train/train_drafter.py --config configs/tiny_code.yaml``."""

from dflash.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
