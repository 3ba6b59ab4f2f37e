"""The offline code corpus of the tiny target: the Python standard library's source.

Split into train / held-out *by file* (a stable hash of the path relative to the stdlib
root), so held-out prompts come from files the target never saw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from pathlib import Path

from dflash.errors import ConfigError

HELD_OUT_EVERY = 20  # ~5% of files are held out
EOT = "<|endoftext|>"
MASK = "<|mask|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOT, MASK, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str) -> bool:
    digest = hashlib.sha1(relpath.encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0


@functools.cache
def _stdlib_sources(root: Path) -> tuple[tuple[str, Path, bool], ...]:
    """Sorted ``(relative path, path, held out)`` of the ``.py`` files under ``root``: walked once
    per process (the walk passes ~13k files of an installed site-packages; a tiny run asks 3 times)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" not in rel and "dist-packages" not in rel:
            out.append((rel, path, is_held_out(rel)))
    return tuple(out)


def stdlib_files(split: str, limit: int | None = None) -> list[tuple[str, str]]:
    """Sorted ``(relative path, source text)`` of the stdlib's ``.py`` files in ``split``; with
    ``limit``, the first ``limit`` of them (only those files are read)."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}")
    out: list[tuple[str, str]] = []
    for rel, path, held in _stdlib_sources(stdlib_root()):
        if limit is not None and len(out) >= limit:
            break
        if held != (split == "heldout"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with the reserved special tokens at ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, directory: Path, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` opens as-is."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOT,
        "pad_token": EOT,
        "mask_token": MASK,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(directory / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)


def heldout_prompts(count: int, max_chars: int = 400, seed: int = 0) -> list[str]:
    """Deterministic code prompts from held-out files: context ending just after a ``def`` line.

    Each prompt is the up-to-``max_chars`` characters before and including a function header,
    so the natural continuation is a function body the target never saw.
    """
    import random

    candidates: list[str] = []
    for _, text in stdlib_files("heldout"):
        lines = text.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        for i, line in enumerate(lines):
            stripped = line.lstrip()
            if stripped.startswith("def ") and line.rstrip().endswith(":"):
                # End right after the colon: with byte-level BPE the newline and the body's
                # indentation form one token, so a prompt ending in a bare newline is off-distribution.
                end = offsets[i] + len(line.rstrip())
                start = max(0, end - max_chars)
                start = text.find("\n", start) + 1 if start > 0 else 0  # begin on a line boundary
                candidates.append(text[start:end])
    random.Random(seed).shuffle(candidates)
    if len(candidates) < count:
        raise ConfigError(f"only {len(candidates)} held-out prompts available, asked for {count}")
    return candidates[:count]
