"""The MTP drafter kind: a target's own multi-token-prediction head, or one trained here: model
(``model``), engine method (``draft``), checkpoint layout (``hf``) and its registry entry (``kind``)."""

from dflash.drafters.mtp.draft import MTPDraft
from dflash.drafters.mtp.kind import MTP, MTPKind
from dflash.drafters.mtp.model import MTPConfig, MTPHead, build_head, mtp_rows

__all__ = ["MTP", "MTPConfig", "MTPDraft", "MTPHead", "MTPKind", "build_head", "mtp_rows"]
