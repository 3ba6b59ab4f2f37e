"""Tokenizers for targets: whatever ``AutoTokenizer`` opens in the checkpoint directory."""

from __future__ import annotations

import os
from typing import Any

from dflash.io.loading import CheckpointError, resolve


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    directory = resolve(name_or_path)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                  "tokenizer.model")):
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {directory}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def eos_ids(tokenizer: Any, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """EOS ids from the model config plus the tokenizer's own EOS, deduplicated."""
    ids = list(config_eos)
    if getattr(tokenizer, "eos_token_id", None) is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(ids)
