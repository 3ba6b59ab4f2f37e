"""Tokenized documents with their loss masks: plain text (all supervised) and chat conversations.

For conversations the labels are the assistant contents plus the end-of-turn token; they are
located in the chat template's rendering without knowing its markup (``_turn_span``), then
mapped to tokens through the fast tokenizer's character offsets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dflash.errors import ConfigError
from dflash.training.sources import Document

_TOKENIZE_CHUNK = 512  # texts per tokenizer call: batched for speed, bounded for memory


def text_documents(texts: list[str], tokenizer: Any) -> list[Document]:
    """Every token supervised; EOS appended so the model learns where documents end."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("format='text' needs a tokenizer with an EOS token (appended to each document)")
    docs = []
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        # verbose=False: long files exceed model_max_length, which is fine (pack() splits them).
        enc = tokenizer(texts[i:i + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            arr = np.asarray([*ids, eos], dtype=np.int32)  # [T + 1]
            docs.append(Document(arr, np.ones(arr.shape, dtype=bool)))
    return docs


def clean_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with ``role`` / ``content``; drops the None keys Arrow adds for ragged schemas."""
    if not isinstance(messages, list):
        raise ConfigError(f"messages must be a list of role/content dicts, got {type(messages).__name__}")
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        if "role" not in m and "from" in m:  # ShareGPT style {"from": "gpt", "value": ...}
            speaker = m.pop("from")
            m["role"] = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
            m["content"] = m.pop("value", "")
        if not isinstance(m.get("role"), str) or not isinstance(m.setdefault("content", ""), str):
            raise ConfigError(f"each message needs a string 'role' and 'content', got {m!r}")
        out.append(m)
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def _turn_span(tokenizer: Any, messages: list[dict[str, Any]], i: int,
               full: str) -> tuple[int, int, int] | None:
    """(content start, content end, turn end) of assistant turn ``i`` in ``full``, or None.

    Renders the conversation up to turn ``i`` twice, with the real and with an empty content:
    the content is the insertion between the two. This uses no knowledge of the template's
    markup, so it works for any template whose rendering of a prefix of the conversation is
    a prefix of the full rendering and that inserts the content verbatim.
    """
    upto = _render(tokenizer, messages[: i + 1])
    if not full.startswith(upto):
        return None
    empty = _render(tokenizer, [*messages[:i], {**messages[i], "content": ""}])
    width = len(upto) - len(empty)
    if width <= 0:
        return None
    hi = _common_prefix(upto, empty)
    lo = len(empty) - min(_common_suffix(upto, empty), len(empty))
    if lo > hi:  # insertion at p is consistent iff lo <= p <= hi; none is: the template branches on it
        return None
    # When the content's edges repeat the markup around it (content ending in "\n" after a
    # header ending in "\n"), several insertion points are valid; pick the one that is the
    # content itself; the latest such start keeps markup out of the span.
    content = messages[i]["content"]
    for p in range(hi, lo - 1, -1):
        if upto[p:p + width] == content:
            return p, p + width, len(upto)
    return hi, hi + width, len(upto)  # template rewrote the content (e.g. stripped it): use the diff


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int, int]]:
    """Character spans (start, end, turn end or -1) of assistant contents in ``full``."""
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"]:
            continue
        span = _turn_span(tokenizer, messages, i, full)
        if span is None:
            # Template re-renders history differently (e.g. drops old reasoning): find the
            # content verbatim after the previous span. Turn end unknown -> no end-of-turn label.
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ConfigError(f"assistant message {i} does not appear verbatim in the chat template's "
                                 f"rendering; cannot locate its tokens for the loss mask")
            span = (start, start + len(m["content"]), -1)
        spans.append(span)
        cursor = span[1]
    return spans


def conversation_documents(conversations: list[Any], tokenizer: Any) -> list[Document]:
    """Rendered with the chat template; labels are the assistant contents (+ end-of-turn token)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("format='conversations' needs a tokenizer with a chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("format='conversations' needs a fast tokenizer (char offsets locate the labels)")
    special = set(tokenizer.all_special_ids)
    docs = []
    for c in range(0, len(conversations), _TOKENIZE_CHUNK):
        chats = [clean_messages(m) for m in conversations[c:c + _TOKENIZE_CHUNK]]
        rendered = [_render(tokenizer, m) for m in chats]
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for messages, text, ids, offsets in zip(chats, rendered, enc["input_ids"], enc["offset_mapping"],
                                                strict=True):
            ids = np.asarray(ids, dtype=np.int32)  # [T]
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2] char [start, end)
            starts, ends = offsets[:, 0], offsets[:, 1]
            mask = np.zeros(ids.shape, dtype=bool)  # [T]
            for a, b, turn_end in _assistant_spans(tokenizer, messages, text):
                # Any overlap counts: a BPE token may straddle the header/content boundary
                # (e.g. "\n" + indentation); it carries content, so it is a label.
                mask |= (starts < b) & (ends > a)
                # End-of-turn: the special token right after the content, inside this turn
                # (so a template without one never labels the next turn's start token).
                nxt = int(np.searchsorted(starts, b))
                if (turn_end >= 0 and nxt < len(ids) and starts[nxt] == b and ends[nxt] <= turn_end
                        and int(ids[nxt]) in special):
                    mask[nxt] = True
            docs.append(Document(ids, mask))
    return docs
