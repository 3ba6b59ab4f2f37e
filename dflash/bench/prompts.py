"""Prompts for benchmarks, and where results go: jsonl / ``datasets`` prompts, tiny-code held-out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dflash.errors import ConfigError
from dflash.training.data import DataConfig, load_dataset
from dflash.training.tiny_corpus import heldout_prompts


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def load_prompts(source: str, tokenizer: Any, *, field: str = "prompt", split: str = "train",
                 limit: int = 0) -> list[list[int]]:
    """Prompt ids from a jsonl of ``{"prompt": ...}`` / ``{"messages": [...]}``, a ``datasets`` id, or
    ``tiny-code-heldout`` (function headers from stdlib files the tiny target never saw)."""
    if source == "tiny-code-heldout":
        texts = heldout_prompts(limit or 16)
        return [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts]
    ds = load_dataset(DataConfig(source=source, split=split))
    out = []
    for row in ds:
        if row.get(field) is not None:
            text = row[field]
        elif row.get("messages"):
            msgs = list(row["messages"])
            if msgs[-1]["role"] == "assistant":  # the prompt is everything before the answer
                msgs = msgs[:-1]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            raise ConfigError(f"prompt source {source!r}: a row has neither {field!r} nor 'messages' "
                              f"(columns: {list(row)})")
        out.append(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if limit and len(out) == limit:
            break
    return out
