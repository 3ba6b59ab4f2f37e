"""The EAGLE-3 drafter kind: model (``model``), training-time-test loss (``ttt``), engine method
(``draft``), export format (``hf``) and its registry entry (``kind``)."""

from dflash.drafters.eagle3.draft import Eagle3Draft
from dflash.drafters.eagle3.kind import EAGLE3, Eagle3Kind
from dflash.drafters.eagle3.model import Eagle3Config, Eagle3Drafter, build_drafter, vocab_map

__all__ = ["EAGLE3", "Eagle3Config", "Eagle3Draft", "Eagle3Drafter", "Eagle3Kind", "build_drafter",
           "vocab_map"]
