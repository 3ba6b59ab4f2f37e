"""Thin entry point: ``python train/pretrain_target.py --out DIR`` (see dflash.training.pretrain)."""

from dflash.cli.pretrain_target import main

if __name__ == "__main__":
    raise SystemExit(main())
