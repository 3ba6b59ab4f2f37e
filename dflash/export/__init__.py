"""HF-format export / import of drafters (the "DFlashDraftModel" layout of docs/design.md §8)."""

from dflash.export.dflash_hf import load_drafter, save_drafter, target_fingerprint

__all__ = ["load_drafter", "save_drafter", "target_fingerprint"]
