"""The Gemma 4 assistant drafter kind: Google's MTP assistants for Gemma 4 targets, whose layers read
the target's keys and values: model (``model``), engine method (``draft``), training objective
(``train``), checkpoint layout, read and written (``hf``) and its registry entry (``kind``)."""

from dflash.drafters.gemma4_assistant.draft import AssistantDraft
from dflash.drafters.gemma4_assistant.kind import GEMMA4_ASSISTANT, Gemma4AssistantKind
from dflash.drafters.gemma4_assistant.model import AssistantConfig, Gemma4Assistant, build_assistant

__all__ = [
    "GEMMA4_ASSISTANT",
    "AssistantConfig",
    "AssistantDraft",
    "Gemma4Assistant",
    "Gemma4AssistantKind",
    "build_assistant",
]
