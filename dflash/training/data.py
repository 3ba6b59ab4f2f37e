"""Drafter-training data: a dataset in, fixed-shape packed token rows out.

Pipeline: ``load_documents`` (a source, ``sources.py`` -> tokenized ``Document``s with a loss
mask, ``chat.py``, split into train / held-out by document) -> ``pack`` (whole documents packed
into ``seq_len`` rows, so a jitted train step sees one static shape and little padding) ->
``Batches`` (seeded epoch shuffles; a batch is a pure function of the step, so resuming is
exact), both in ``packing.py``. The names the rest of the package uses are importable from here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

import numpy as np

from dflash.training.chat import conversation_documents, text_documents
from dflash.training.packing import Batches, PackedRows, pack
from dflash.training.sources import DataConfig, Document, load_dataset, resolve_format

__all__ = ["Batches", "DataConfig", "Document", "PackedRows", "load_dataset", "load_documents",
           "load_lane_documents", "pack"]


def _heldout_flags(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """bool [n]: a seeded hash of each document's content below ``fraction``.

    Hashing content (not index) keeps the split stable under reordering or ``max_examples``
    and sends exact duplicates to the same side, so they cannot leak into the eval set.
    """
    if fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    salt = seed.to_bytes(8, "little", signed=True)
    u = [int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest(),
                        "little") / 2.0**64 for k in keys]
    return np.asarray(u) < fraction


def load_documents(cfg: DataConfig, tokenizer: Any) -> tuple[list[Document], list[Document]]:
    """(train, heldout) tokenized documents of ``cfg``; held out by document, seeded."""
    lanes, heldout = load_lane_documents(cfg, tokenizer, None)
    return [d for _, d in sorted((t for docs in lanes.values() for t in docs), key=lambda t: t[0])], heldout


def load_lane_documents(cfg: DataConfig, tokenizer: Any, lanes: Collection[int] | None
                        ) -> tuple[dict[int, list[tuple[int, Document]]], list[Document]]:
    """({lane: [(document index, training document)]}, held-out documents) of ``cfg``.

    Document ``i`` (in dataset order) is in data lane ``i % cfg.lanes``. Only the training
    documents of ``lanes`` (None: all) are tokenized, so a process that feeds some lanes of the
    global batch reads them alone (``hostdata.py``); held-out documents are always all tokenized
    (every process evaluates the same rows).
    """
    ds = load_dataset(cfg)
    fmt = resolve_format(cfg, list(ds.column_names))
    if cfg.max_examples and len(ds) > cfg.max_examples:
        ds = ds.select(range(cfg.max_examples))
    if fmt == "text":
        texts = ["" if t is None else str(t) for t in ds[cfg.text_field]]
        items: list[Any] = [t for t in texts if t]  # an empty text would be a lone EOS: nothing to learn
        keys = items
    else:
        items = list(ds[cfg.messages_field])
        keys = [json.dumps(c, sort_keys=True, default=str) for c in items]
    held = _heldout_flags(keys, cfg.heldout_fraction, cfg.seed)
    wanted = [i for i in range(len(items)) if held[i] or lanes is None or i % cfg.lanes in lanes]
    tokenize = text_documents if fmt == "text" else conversation_documents
    docs = tokenize([items[i] for i in wanted], tokenizer)
    by_lane: dict[int, list[tuple[int, Document]]] = {
        j: [] for j in (range(cfg.lanes) if lanes is None else sorted(lanes))}
    heldout = []
    for i, d in zip(wanted, docs, strict=True):
        if len(d) and held[i]:
            heldout.append(d)
        elif len(d) and i % cfg.lanes in by_lane:
            by_lane[i % cfg.lanes].append((i, d))
    return by_lane, heldout
