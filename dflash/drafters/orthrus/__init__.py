"""The Orthrus drafter kind: model (``model``), engine method (``draft``), export formats (``hf``)
and its registry entry (``kind``)."""

from dflash.drafters.orthrus.draft import OrthrusDraft
from dflash.drafters.orthrus.kind import ORTHRUS, OrthrusKind
from dflash.drafters.orthrus.model import OrthrusConfig, OrthrusDrafter, ar_counterpart, build_orthrus

__all__ = ["ORTHRUS", "OrthrusConfig", "OrthrusDraft", "OrthrusDrafter", "OrthrusKind", "ar_counterpart",
           "build_orthrus"]
