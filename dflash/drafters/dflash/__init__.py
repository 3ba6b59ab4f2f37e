"""The DFlash drafter kind: model (``model``), engine method (``draft``), export format (``hf``)
and its registry entry (``kind``)."""

from dflash.drafters.dflash.draft import DFlashDraft
from dflash.drafters.dflash.kind import DFLASH, DFlashKind
from dflash.drafters.dflash.model import (
    ANCHOR_CHUNK,
    DFlashConfig,
    DFlashDrafter,
    build_drafter,
    default_target_layer_ids,
    layer_config,
)

__all__ = ["ANCHOR_CHUNK", "DFLASH", "DFlashConfig", "DFlashDraft", "DFlashDrafter", "DFlashKind",
           "build_drafter",
           "default_target_layer_ids", "layer_config"]
