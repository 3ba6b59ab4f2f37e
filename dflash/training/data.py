"""Drafter-training data: a dataset in, fixed-shape packed token rows out.

Pipeline: ``load_documents`` (Hugging Face ``datasets`` source -> tokenized ``Document``s with a
loss mask, split into train / held-out by document) -> ``pack`` (whole documents packed into
``seq_len`` rows, so a jitted train step sees one static shape and little padding) -> ``Batches``
(seeded epoch shuffles; a batch is a pure function of the step, so resuming is exact).

Packed rows keep documents apart with ``segment_ids`` (attention must not cross segments) and
``positions`` that restart at 0 per segment (RoPE sees each document as if it were alone).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dflash.config import ConfigError

FORMATS = ("auto", "text", "conversations")
BUILTIN_SOURCES = ("tiny-code",)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKENIZE_CHUNK = 512  # texts per tokenizer call: batched for speed, bounded for memory
_TRUE = ("1", "ON", "YES", "TRUE")
FSSPEC_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                   "hf": "huggingface_hub"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is cut into rows."""

    source: str = "tiny-code"  # builtin name, local .jsonl/.json/.parquet file or directory, or hub id
    split: str = "train"
    format: str = "auto"  # "auto" | "text" | "conversations"
    text_field: str = "text"
    messages_field: str = "messages"
    seq_len: int = 512  # tokens per packed row
    max_examples: int = 0  # 0 = all; otherwise the first N examples of the split
    heldout_fraction: float = 0.02  # fraction of *documents* held out for eval (deterministic by seed)
    seed: int = 0
    # Data lanes (multi-host): the global batch is ``lanes`` equal slices, lane j drawing from its own
    # documents (index % lanes == j), so a process reads and tokenizes only its lanes' documents and
    # the global batches depend on ``lanes``, never on the process count (dflash.training.hostdata).
    lanes: int = 1

    def __post_init__(self) -> None:
        for name in ("source", "split", "text_field", "messages_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not one of {FORMATS}")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ConfigError(f"seq_len must be an int >= 8, got {self.seq_len!r}")
        if not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise ConfigError(f"max_examples must be an int >= 0 (0 = all), got {self.max_examples!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.lanes, int) or self.lanes < 1:
            raise ConfigError(f"lanes must be an int >= 1, got {self.lanes!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """One tokenized document; ``loss_mask`` marks the tokens that are labels."""

    ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]

    def __post_init__(self) -> None:
        if self.ids.shape != self.loss_mask.shape or self.ids.ndim != 1:
            raise ValueError(f"ids {self.ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclasses.dataclass(eq=False)
class PackedRows:
    """Documents packed into fixed-length rows (all arrays [N, seq_len])."""

    tokens: np.ndarray  # int32 [N, S], padding = pad_id
    loss_mask: np.ndarray  # bool [N, S], True where the token is supervised (is a label)
    segment_ids: np.ndarray  # int32 [N, S], 1..k for the k documents in the row, 0 = padding
    positions: np.ndarray  # int32 [N, S], position within its own segment (restarts at 0)

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.tokens, self.loss_mask, self.segment_ids, self.positions)}
        if len(shapes) != 1 or self.tokens.ndim != 2:
            raise ValueError(f"PackedRows arrays must share one [N, seq_len] shape, got {shapes}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "segment_ids": self.segment_ids,
                "positions": self.positions}


# ----------------------------------------------------------------------------- sources


def _env_offline() -> bool:
    # Read at call time: ``datasets`` / ``huggingface_hub`` snapshot these at import, so a
    # caller (or test) that sets them later would otherwise still hit the network and sit
    # through ~25 s of retries before failing.
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily force the hub libraries offline when the environment asks for it."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything else path-like is a local source, so a typo
    # in a path is reported as a missing file rather than as an unknown dataset id.
    return (source.startswith(("/", "./", "../", "~")) or Path(source).suffix in LOCAL_SUFFIXES
            or (os.sep in source and Path(source).parent.exists()))


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder name, sorted data files) of a local file or directory."""
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(f"source {str(path)!r}: unsupported file type (use {sorted(LOCAL_SUFFIXES)})")
        return LOCAL_SUFFIXES[path.suffix], [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise ConfigError(f"source directory {str(path)!r} holds no {sorted(LOCAL_SUFFIXES)} files")
    builders = {LOCAL_SUFFIXES[p.suffix] for p in files}
    if len(builders) > 1:  # one builder per load; mixing json and parquet would mix schemas too
        raise ConfigError(f"source directory {str(path)!r} mixes json and parquet files; keep one kind")
    return builders.pop(), [str(p) for p in files]


def _remote_files(url: str) -> tuple[str, list[str]]:
    """(builder name, local copies of the sorted data files) of a remote file or directory.

    Copied with fsspec into ``$DFLASH_CACHE`` (default ``~/.cache/dflash/remote``), kept while the
    remote size is unchanged; ``datasets`` then reads local files (its own remote reads refuse to
    run under ``HF_HUB_OFFLINE``, which pods often set).
    """
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:  # fsspec knows the protocol; its backend package is missing
        package = FSSPEC_BACKENDS.get(protocol, "its fsspec backend")
        raise ConfigError(f"data source {url!r}: reading {protocol}:// paths needs the fsspec backend "
                          f"package {package!r} (pip install {package}); {err}") from err
    except ValueError as err:
        raise ConfigError(f"data source {url!r}: fsspec knows no protocol {protocol!r}") from err
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"data source {url!r} does not exist")
    found = [path] if fs.isfile(path) else sorted(p for p in fs.find(path)
                                                  if Path(p).suffix in LOCAL_SUFFIXES)
    if not found:
        raise ConfigError(f"source {url!r} holds no {sorted(LOCAL_SUFFIXES)} files")
    builders = {LOCAL_SUFFIXES.get(Path(p).suffix) for p in found}
    if len(builders) != 1 or None in builders:
        raise ConfigError(f"source {url!r}: use one kind of {sorted(LOCAL_SUFFIXES)} files")
    cache = Path(os.environ.get("DFLASH_CACHE", "~/.cache/dflash")).expanduser() / "remote"
    local = []
    for p in found:
        remote = fs.unstrip_protocol(p)
        size = fs.size(p)
        dest = cache / hashlib.sha256(remote.encode()).hexdigest()[:16] / Path(p).name
        if not dest.exists() or dest.stat().st_size != size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # hosts sharing a cache
            fs.get(p, str(partial))
            partial.replace(dest)
        local.append(str(dest))
    return builders.pop(), local


def _load_dataset(cfg: DataConfig) -> Any:
    """The examples of ``cfg.source`` / ``cfg.split`` as a ``datasets.Dataset``."""
    import datasets

    if cfg.source == "tiny-code":
        from dflash.training.tiny_corpus import stdlib_files

        if cfg.split not in ("train", "heldout"):
            raise ConfigError(f"split={cfg.split!r}: the builtin 'tiny-code' source has 'train', 'heldout'")
        files = stdlib_files(cfg.split)
        if cfg.max_examples:  # truncate before building the table: no point holding 30 MB of text
            files = files[: cfg.max_examples]
        # Through ``datasets`` like any other source, so the builtin exercises the same path.
        return datasets.Dataset.from_dict({"text": [text for _, text in files]})

    if "://" in cfg.source:  # gs://, s3://, ... through fsspec, copied to a local cache first
        builder, files = _remote_files(cfg.source)
        split_name = cfg.split.split("[", 1)[0]
        return datasets.load_dataset(builder, data_files={split_name: files}, split=cfg.split)

    path = Path(cfg.source).expanduser()
    if path.exists() or _looks_like_path(cfg.source):
        if not path.exists():
            raise FileNotFoundError(f"data source {cfg.source!r} does not exist ({path.resolve()})")
        builder, files = _local_files(path)
        # Local files form one split; name it after cfg.split so slices like "train[:100]" work.
        split_name = cfg.split.split("[", 1)[0]
        try:
            return datasets.load_dataset(builder, data_files={split_name: files}, split=cfg.split)
        except ValueError as e:  # e.g. a bad split slice
            raise ConfigError(f"could not load {cfg.source!r} split {cfg.split!r}: {e}") from e

    offline = _env_offline()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(cfg.source, split=cfg.split)
    except Exception as e:  # hub errors come as many types (ConnectionError, FileNotFoundError, ...)
        why = ("is not available offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and is not cached"
               if offline else "could not be loaded from the Hub (unknown id, network failure, not cached)")
        raise ConfigError(f"dataset id {cfg.source!r} (split {cfg.split!r}) {why}: {e}") from e


def _resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    if cfg.format == "auto":
        if cfg.messages_field in columns:
            return "conversations"
        if cfg.text_field in columns:
            return "text"
        raise ConfigError(f"format='auto': dataset {cfg.source!r} has neither messages_field="
                          f"{cfg.messages_field!r} nor text_field={cfg.text_field!r}; columns: {columns}")
    field = cfg.messages_field if cfg.format == "conversations" else cfg.text_field
    name = "messages_field" if cfg.format == "conversations" else "text_field"
    if field not in columns:
        raise ConfigError(f"format={cfg.format!r}: {name}={field!r} is not a column of dataset "
                          f"{cfg.source!r}; columns: {columns}")
    return cfg.format


# ----------------------------------------------------------------------------- tokenization


def _text_documents(texts: list[str], tokenizer: Any) -> list[Document]:
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


def _clean_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with ``role`` / ``content``; drops the None keys Arrow adds for ragged schemas."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of role/content dicts, got {type(messages).__name__}")
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        if "role" not in m and "from" in m:  # ShareGPT style {"from": "gpt", "value": ...}
            speaker = m.pop("from")
            m["role"] = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
            m["content"] = m.pop("value", "")
        if not isinstance(m.get("role"), str) or not isinstance(m.setdefault("content", ""), str):
            raise ValueError(f"each message needs a string 'role' and 'content', got {m!r}")
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
                raise ValueError(f"assistant message {i} does not appear verbatim in the chat template's "
                                 f"rendering; cannot locate its tokens for the loss mask")
            span = (start, start + len(m["content"]), -1)
        spans.append(span)
        cursor = span[1]
    return spans


def _conversation_documents(conversations: list[Any], tokenizer: Any) -> list[Document]:
    """Rendered with the chat template; labels are the assistant contents (+ end-of-turn token)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("format='conversations' needs a tokenizer with a chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("format='conversations' needs a fast tokenizer (char offsets locate the labels)")
    special = set(tokenizer.all_special_ids)
    docs = []
    for c in range(0, len(conversations), _TOKENIZE_CHUNK):
        chats = [_clean_messages(m) for m in conversations[c:c + _TOKENIZE_CHUNK]]
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


# ----------------------------------------------------------------------------- documents


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
    global batch reads them alone; held-out documents are always all tokenized (every process
    evaluates the same rows).
    """
    ds = _load_dataset(cfg)
    fmt = _resolve_format(cfg, list(ds.column_names))
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
    tokenize = _text_documents if fmt == "text" else _conversation_documents
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


# ----------------------------------------------------------------------------- packing


def pack(docs: list[Document], seq_len: int, pad_id: int) -> PackedRows:
    """Best-fit-decreasing packing of whole documents into ``seq_len`` rows.

    Documents longer than ``seq_len`` are first cut into consecutive ``seq_len`` chunks (each
    its own segment, positions restarting at 0). Pieces with no supervised token are dropped:
    segments never attend to each other, so they would only cost compute. Each piece goes to
    the open row with the least room that still fits it, which keeps padding to a few percent.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pieces: list[tuple[int, int, int]] = []  # (doc index, start, length)
    for i, d in enumerate(docs):
        n = len(d)
        for s in range(0, n, seq_len):
            e = min(s + seq_len, n)
            if d.loss_mask[s:e].any():
                pieces.append((i, s, e - s))

    order = sorted(range(len(pieces)), key=lambda j: -pieces[j][2])  # stable: deterministic ties
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free capacities among open rows
    open_rows: dict[int, list[int]] = {}  # free capacity -> row ids with exactly that much room
    for j in order:
        length = pieces[j][2]
        k = bisect.bisect_left(free_sizes, length)  # the tightest room that fits
        if k == len(free_sizes):
            r, free = len(rows), seq_len
            rows.append([])
        else:
            free = free_sizes[k]
            r = open_rows[free].pop()
            if not open_rows[free]:
                del open_rows[free]
                free_sizes.pop(k)
        rows[r].append(j)
        free -= length
        if free > 0:
            if free not in open_rows:
                bisect.insort(free_sizes, free)
                open_rows[free] = []
            open_rows[free].append(r)

    n_rows = len(rows)
    tokens = np.full((n_rows, seq_len), pad_id, dtype=np.int32)  # [N, S]
    loss_mask = np.zeros((n_rows, seq_len), dtype=bool)  # [N, S]
    segment_ids = np.zeros((n_rows, seq_len), dtype=np.int32)  # [N, S]
    positions = np.zeros((n_rows, seq_len), dtype=np.int32)  # [N, S]
    arange = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(rows):
        off = 0
        for seg, j in enumerate(members, start=1):
            i, s, length = pieces[j]
            tokens[r, off:off + length] = docs[i].ids[s:s + length]
            loss_mask[r, off:off + length] = docs[i].loss_mask[s:s + length]
            segment_ids[r, off:off + length] = seg
            positions[r, off:off + length] = arange[:length]
            off += length
    return PackedRows(tokens, loss_mask, segment_ids, positions)


def padding_fraction(rows: PackedRows) -> float:
    """Share of row slots that hold padding (0 for an empty set of rows)."""
    return float((rows.segment_ids == 0).mean()) if rows.segment_ids.size else 0.0


# ----------------------------------------------------------------------------- batching


class Batches:
    """Deterministic epoch-shuffled batches over PackedRows, resumable from a position.

    A batch is a pure function of (seed, step): resuming a run at step k needs no iterator
    state, only k. With ``drop_last=False`` the last batch of an epoch is smaller (a new shape
    for a jitted step); the default drops the remainder so every batch has one shape.
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        n = len(rows)
        self.steps_per_epoch: int = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} packed rows cannot fill one batch of {batch_size} (drop_last={drop_last})")
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, permutation): steps run in order

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the row order of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.rows)))
        return self._cached[1]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch at global step ``step``: each array [B, seq_len]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]  # [B]
        return {name: arr[idx] for name, arr in self.rows.arrays().items()}

    def iterate(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless stream of batches from global step ``start``."""
        step = start
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)
