"""The conversations of the published DFlash recipes, as one prompts file for ``dflash-regenerate``.

The published drafters were trained on conversations whose answers the target regenerated
(docs/design.md §5). Which conversations (docs/quickstart-tpu.md, "The data"):

- ``qwen3`` (the Qwen3 drafters, non-thinking): about 800K conversations drawn from NVIDIA's
  Nemotron Post-Training Dataset v2 and CodeAlpaca (DFlash paper, §5). The mix's proportions
  are not published; here it is a uniform sample over the union of the English splits
  (chat, code, math, stem) and CodeAlpaca-20k.
- ``llama3`` (the Llama-3.1-8B-Instruct drafter): UltraChat-200K and ShareGPT (the
  published drafter's model card), all of both by default.

Every source is read through ``datasets`` (``dflash.training.sources.load_dataset``: a hub id
and split, or local files named as the split) and every row becomes
``{"messages": [{"role", "content"}, ...], "source": NAME}``: the prompts as published, every
assistant turn an empty slot that ``dflash-regenerate`` fills with the target's own answer
(the published answers come from other models and are not kept), ending on an assistant turn.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dflash.errors import ConfigError
from dflash.training.chat import clean_messages
from dflash.training.sources import DataConfig, load_dataset

Messages = list[dict[str, str]]


def messages_row(row: Mapping[str, Any], field: str = "messages") -> Messages:
    """A ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) row."""
    return [{"role": m["role"], "content": m["content"]} for m in clean_messages(row[field])]


def alpaca_row(row: Mapping[str, Any]) -> Messages:
    """An instruction / input / output row (CodeAlpaca): instruction and input are the user turn."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


ROW_FORMATS: dict[str, Callable[[Mapping[str, Any]], Messages]] = {
    "messages": messages_row,
    "sharegpt": lambda row: messages_row(row, "conversations"),
    "alpaca": alpaca_row,
}


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of a recipe: where it is (hub id or local path), which split, its row format."""

    name: str
    dataset: str
    split: str
    row_format: str

    def __post_init__(self) -> None:
        if self.row_format not in ROW_FORMATS:
            raise ConfigError(f"source {self.name}: row format {self.row_format!r} is not one of "
                              f"{sorted(ROW_FORMATS)}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    sources: tuple[Source, ...]
    total: int  # conversations in the published mix (0: every row of every source)
    chat_template_kwargs: dict[str, Any]  # what dflash-regenerate must pass for this recipe
    note: str


# dflash-regenerate's settings for every recipe (configs/launch/pipeline.sh passes the same): greedy,
# as the published regenerations; a prompt's last 1024 tokens and up to 2048 new ones, so that a
# single-turn conversation fits one 3072-token training row (the recipe's data.seq_len).
REGEN_SETTINGS = ("--max-prompt-tokens", "1024", "--max-new-tokens", "2048", "--temperature", "0")

NEMOTRON_V2 = "nvidia/Nemotron-Post-Training-Dataset-v2"
RECIPES: dict[str, Recipe] = {
    "qwen3": Recipe(
        sources=(*(Source(f"nemotron-v2-{s}", NEMOTRON_V2, s, "messages")
                   for s in ("chat", "code", "math", "stem")),
                 Source("codealpaca", "sahil2801/CodeAlpaca-20k", "train", "alpaca")),
        total=800_000, chat_template_kwargs={"enable_thinking": False},
        note="DFlash paper §5: ~800K samples of Nemotron Post-Training Dataset v2 and CodeAlpaca; "
             "the published Qwen3 drafters are non-thinking"),
    "llama3": Recipe(
        sources=(Source("ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft", "messages"),
                 Source("sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", "train", "sharegpt")),
        total=0, chat_template_kwargs={},
        note="z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat model card: UltraChat-200K and ShareGPT"),
}


def prompt_slots(messages: Messages) -> Messages:
    """The conversation with every assistant turn emptied and empty system turns dropped, ending
    on an assistant turn (one is added after a trailing user turn); [] when it has no user turn."""
    out = [{"role": m["role"], "content": "" if m["role"] == "assistant" else m["content"]}
           for m in messages if m["role"] != "system" or m["content"]]
    if not any(m["role"] == "user" for m in out):
        return []
    while out[-1]["role"] != "assistant" and out[-1]["role"] != "user":
        out.pop()
    if out[-1]["role"] == "user":
        out.append({"role": "assistant", "content": ""})
    return out


def prepare_recipe_data(recipe: Recipe, out_path: str | Path, *, total: int | None = None,
                        seed: int = 0) -> dict[str, int]:
    """Writes ``total`` conversations (default: the recipe's; 0 or more than there are: all),
    a uniform sample without replacement over the union of the recipe's sources, in a seeded
    random order, as jsonl; returns how many came from each source."""
    total = recipe.total if total is None else total
    parts = [load_dataset(DataConfig(source=s.dataset, split=s.split)) for s in recipe.sources]
    sizes = np.array([len(p) for p in parts])  # [S]
    offsets = np.concatenate([[0], np.cumsum(sizes)])  # [S + 1]
    order = np.random.default_rng(seed).permutation(int(offsets[-1]))  # [N]: global row ids
    if total:
        order = order[:total]
    which = np.searchsorted(offsets, order, side="right") - 1  # [n]: each row's source
    rows: dict[int, Messages] = {}
    counts = {}
    for i, (src, part) in enumerate(zip(recipe.sources, parts, strict=True)):
        ids = np.sort(order[which == i])
        convert = ROW_FORMATS[src.row_format]
        for gid, row in zip(ids, part.select((ids - offsets[i]).tolist()), strict=True):
            rows[int(gid)] = prompt_slots(convert(row))
        counts[src.name] = int(len(ids))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w") as f:
        for gid, i in zip(order, which, strict=True):
            if rows[int(gid)]:
                f.write(json.dumps({"messages": rows[int(gid)], "source": recipe.sources[i].name}) + "\n")
            else:
                counts[recipe.sources[i].name] -= 1  # no user turn: nothing to answer
    tmp.replace(out_path)  # a killed run leaves no half-written file under the final name
    return counts
