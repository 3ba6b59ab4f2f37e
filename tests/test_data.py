"""Drafter-training data: sources, formats and loss masks, packing, resumable batches."""

from __future__ import annotations

import copy
import json

import datasets
import numpy as np
import pytest

from dflash.config import ConfigError
from dflash.io.tokenizer import load_tokenizer
from dflash.training.data import (
    Batches,
    DataConfig,
    Document,
    PackedRows,
    load_documents,
    pack,
)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-code")


def padding_fraction(rows: PackedRows) -> float:
    """Share of row slots that hold padding (0 for an empty set of rows)."""
    return float((rows.segment_ids == 0).mean()) if rows.segment_ids.size else 0.0


def _docs_with_unique_tokens(lengths, rng, supervised=True) -> list[Document]:
    """Every token value occurs once overall, so a packed token says where it came from."""
    docs, start = [], 1  # 0 is the pad id
    for n in lengths:
        ids = np.arange(start, start + n, dtype=np.int32)
        mask = np.ones(n, bool) if supervised else rng.random(n) < 0.7
        docs.append(Document(ids, mask))
        start += n
    return docs


def _segments(rows: PackedRows):
    """Yield (row, segment id, slice) for every segment in the rows."""
    for r in range(len(rows)):
        seg = rows.segment_ids[r]
        for k in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == k)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "segment not contiguous"
            yield r, int(k), slice(int(where[0]), int(where[-1]) + 1)


# ----------------------------------------------------------------------------- packing


def test_pack_places_every_document_once_in_order():
    rng = np.random.default_rng(0)
    seq_len = 64
    lengths = [*rng.integers(1, 60, size=150), 64, 65, 200, 1000]  # some exactly / over seq_len
    docs = _docs_with_unique_tokens(lengths, rng, supervised=False)
    for d in docs:
        d.loss_mask[0] = True  # no piece is all-unsupervised here, so nothing may be dropped
        d.loss_mask[seq_len::seq_len] = True
    rows = pack(docs, seq_len, pad_id=0)
    assert rows.tokens.shape == (len(rows), seq_len) and rows.tokens.dtype == np.int32
    assert rows.loss_mask.dtype == bool and rows.segment_ids.dtype == rows.positions.dtype == np.int32

    owner = {int(t): (i, j) for i, d in enumerate(docs) for j, t in enumerate(d.ids)}
    chunks: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(docs))}
    for r in range(len(rows)):
        seg = rows.segment_ids[r]
        used = np.flatnonzero(seg > 0)
        assert np.array_equal(used, np.arange(used.size)), "segments are left-aligned, padding at the end"
        assert sorted(set(seg[used].tolist())) == list(range(1, seg.max() + 1))
        assert (rows.tokens[r, seg == 0] == 0).all() and not rows.loss_mask[r, seg == 0].any()
    for r, _, sl in _segments(rows):
        toks = rows.tokens[r, sl]
        i, j0 = owner[int(toks[0])]
        assert [owner[int(t)] for t in toks] == [(i, j0 + n) for n in range(toks.size)], "one doc, in order"
        assert np.array_equal(rows.positions[r, sl], np.arange(toks.size)), "positions restart per segment"
        assert np.array_equal(rows.loss_mask[r, sl], docs[i].loss_mask[j0:j0 + toks.size])
        chunks[i].append((j0, toks.size))
    for i, d in enumerate(docs):
        got = sorted(chunks[i])
        expected = [(s, min(seq_len, len(d) - s)) for s in range(0, len(d), seq_len)]
        assert got == expected, f"doc {i} (len {len(d)}): consecutive seq_len chunks, each exactly once"


def test_pack_padding_is_small_for_random_lengths():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 301, size=2000)
    rows = pack(_docs_with_unique_tokens(lengths, rng), 512, pad_id=0)
    assert int((rows.segment_ids > 0).sum()) == lengths.sum()
    assert padding_fraction(rows) < 0.05
    assert len(rows) <= int(np.ceil(lengths.sum() / 512 / 0.95))


def test_pack_drops_unsupervised_pieces_and_handles_empty_input():
    keep = Document(np.array([5, 6, 7], np.int32), np.array([False, True, True]))
    drop = Document(np.array([8, 9], np.int32), np.zeros(2, bool))
    rows = pack([keep, drop], 8, pad_id=0)
    assert len(rows) == 1 and rows.tokens[0, :3].tolist() == [5, 6, 7] and 8 not in rows.tokens
    empty = pack([], 8, pad_id=0)
    assert empty.tokens.shape == (0, 8) and padding_fraction(empty) == 0.0


# ----------------------------------------------------------------------------- formats and sources

CONVERSATIONS = [
    [{"role": "system", "content": "You write Python."},
     {"role": "user", "content": "Add two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "Now subtract."},
     {"role": "assistant", "content": "def sub(a, b):\n    return a - b\n"}],  # ends like the header
    [{"role": "user", "content": "Say hi in HTML."},
     {"role": "assistant", "content": "<b>hi</b>"}],  # starts like the end-of-turn token
    [{"role": "user", "content": "assistant"},  # user text that equals a role name
     {"role": "assistant", "content": "a"}],
]


def _mask_runs(tok, doc: Document) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, m in zip(doc.ids.tolist(), doc.loss_mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_conversation_loss_mask_covers_exactly_the_assistant_turns(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(CONVERSATIONS)))
    train, held = load_documents(DataConfig(source=str(path), heldout_fraction=0.0), tok)
    assert held == [] and len(train) == len(CONVERSATIONS)
    for doc, conv in zip(train, CONVERSATIONS, strict=True):
        rendered = tok.apply_chat_template(conv, tokenize=False)
        assert tok.decode(doc.ids.tolist(), skip_special_tokens=False) == rendered
        assistant = [m["content"] + IM_END for m in conv if m["role"] == "assistant"]
        assert _mask_runs(tok, doc) == assistant
        masked = "".join(_mask_runs(tok, doc))
        for m in conv:
            if m["role"] != "assistant" and len(m["content"]) > 3:
                assert m["content"] not in masked
        assert not doc.loss_mask[doc.ids == tok.convert_tokens_to_ids("<|im_start|>")].any()


def test_sharegpt_style_messages(tok, tmp_path):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"}]
    path = tmp_path / "sharegpt.jsonl"
    datasets.Dataset.from_dict({"conversations": [conv]}).to_json(str(path))
    cfg = DataConfig(source=str(path), messages_field="conversations", heldout_fraction=0.0)
    (doc,), _ = load_documents(cfg, tok)
    assert "<|im_start|>system\nBe brief." in tok.decode(doc.ids.tolist(), skip_special_tokens=False)
    assert _mask_runs(tok, doc) == ["4" + IM_END]


def test_conversation_with_indented_reply_keeps_the_content(tok, tmp_path):
    # "\n" + indentation merges into one BPE token across the header/content boundary: that
    # token carries content, so it is supervised (and brings one header newline with it).
    conv = [{"role": "user", "content": "body?"}, {"role": "assistant", "content": "    return 1"}]
    path = tmp_path / "indent.jsonl"
    datasets.Dataset.from_dict({"messages": [conv]}).to_json(str(path))
    (doc,), _ = load_documents(DataConfig(source=str(path), heldout_fraction=0.0), tok)
    (run,) = _mask_runs(tok, doc)
    assert run.endswith(conv[1]["content"] + IM_END) and len(run) <= len(conv[1]["content"] + IM_END) + 1


def test_conversation_mask_with_a_template_that_is_not_prefix_stable(tok, tmp_path):
    # EOS only after the last message: a rendered prefix is no longer a prefix of the full
    # rendering, so earlier turns are found by content search (without an end-of-turn label).
    odd = copy.deepcopy(tok)
    odd.chat_template = tok.chat_template.replace(
        "{% endfor %}", "{% if loop.last %}{{ '<|endoftext|>' }}{% endif %}{% endfor %}")
    conv = CONVERSATIONS[0]
    path = tmp_path / "odd.jsonl"
    datasets.Dataset.from_dict({"messages": [conv]}).to_json(str(path))
    (doc,), _ = load_documents(DataConfig(source=str(path), heldout_fraction=0.0), odd)
    assert tok.decode(doc.ids.tolist(), skip_special_tokens=False).endswith("<|endoftext|>")
    assert _mask_runs(tok, doc) == [conv[2]["content"], conv[4]["content"] + IM_END]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "directory"])
def test_text_files_load_with_eos_and_full_mask(tok, tmp_path, kind):
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(12)]
    table = datasets.Dataset.from_dict({"text": texts, "n": list(range(12))})
    if kind == "parquet":
        source = tmp_path / "data.parquet"
        table.to_parquet(str(source))
    else:
        folder = tmp_path / "shards"
        folder.mkdir()
        source = folder / "a.jsonl" if kind == "jsonl" else folder
        table.select(range(6)).to_json(str(folder / "a.jsonl"))
        if kind == "directory":
            table.select(range(6, 12)).to_json(str(folder / "b.jsonl"))
            texts = texts[:12]
        else:
            texts = texts[:6]
    train, held = load_documents(DataConfig(source=str(source), format="text", heldout_fraction=0.0), tok)
    assert held == [] and len(train) == len(texts)
    for doc, text in zip(train, texts, strict=True):
        assert doc.ids.dtype == np.int32 and doc.loss_mask.all()
        assert doc.ids[-1] == tok.eos_token_id
        assert tok.decode(doc.ids[:-1].tolist()) == text


def test_heldout_split_is_by_document_disjoint_and_seeded(tok, tmp_path):
    texts = [f"x = {i}\n" for i in range(60)]
    path = tmp_path / "t.jsonl"
    datasets.Dataset.from_dict({"text": texts}).to_json(str(path))

    def split(seed, **kw):
        train, held = load_documents(DataConfig(source=str(path), heldout_fraction=0.3, seed=seed, **kw), tok)
        return [tuple(d.ids.tolist()) for d in train], [tuple(d.ids.tolist()) for d in held]

    train, held = split(0)
    assert len(train) + len(held) == 60 and not set(train) & set(held)
    assert 5 <= len(held) <= 35
    assert split(0) == (train, held)
    assert split(1)[1] != held
    # Content-keyed: a document stays on its side when the set is truncated.
    sub_train, sub_held = split(0, max_examples=30)
    assert len(sub_train) + len(sub_held) == 30 and set(sub_held) <= set(held)


def test_builtin_tiny_code_source(tok):
    cfg = DataConfig(source="tiny-code", max_examples=20, heldout_fraction=0.0, seq_len=256)
    train, held = load_documents(cfg, tok)
    assert len(train) == 20 and held == []
    assert all(d.ids[-1] == tok.eos_token_id and d.loss_mask.all() for d in train)
    rows = pack(train, cfg.seq_len, tok.pad_token_id)
    assert int((rows.segment_ids > 0).sum()) == sum(len(d) for d in train)


# ----------------------------------------------------------------------------- batches


def _rows(n: int, seq_len: int = 8) -> PackedRows:
    tokens = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)  # row r starts at r * seq_len
    return PackedRows(tokens, np.ones_like(tokens, bool), np.ones_like(tokens), np.tile(np.arange(seq_len,
                      dtype=np.int32), (n, 1)))


def _row_ids(batch) -> list[int]:
    return (batch["tokens"][:, 0] // batch["tokens"].shape[1]).tolist()


def test_batches_are_deterministic_resumable_and_cover_each_epoch():
    rows = _rows(43)
    b = Batches(rows, batch_size=5, seed=7)
    assert b.steps_per_epoch == 8
    from_zero = [b.batch(step) for step in range(3 * b.steps_per_epoch)]  # steps in order, one object
    for step in (0, 5, 8, 13, 23):  # fresh objects, as after a restart
        again = Batches(rows, batch_size=5, seed=7).batch(step)
        assert all(np.array_equal(again[k], from_zero[step][k]) for k in again)
    epochs = [sum((_row_ids(x) for x in from_zero[e * 8:(e + 1) * 8]), []) for e in range(3)]
    for e, ids in enumerate(epochs):
        assert len(ids) == len(set(ids)) == 40, "each row at most once per epoch; only 3 dropped"
        assert ids == np.random.default_rng((7, e)).permutation(43)[:40].tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    assert _row_ids(Batches(rows, 5, seed=8).batch(0)) != _row_ids(from_zero[0])
    batch = from_zero[0]
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (5, 8) for v in batch.values())


def test_batches_without_drop_last_cover_every_row():
    b = Batches(_rows(13), batch_size=5, seed=0, drop_last=False)
    assert b.steps_per_epoch == 3
    sizes = [len(_row_ids(b.batch(s))) for s in range(3)]
    assert sizes == [5, 5, 3]
    assert sorted(sum((_row_ids(b.batch(s)) for s in range(3, 6)), [])) == list(range(13))
    with pytest.raises(ValueError, match="cannot fill"):
        Batches(_rows(3), batch_size=4, seed=0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, field", [
    ({"format": "xml"}, "format"), ({"seq_len": 4}, "seq_len"), ({"max_examples": -1}, "max_examples"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"), ({"text_field": ""}, "text_field"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kwargs)


def test_missing_fields_name_the_available_columns(tok, tmp_path):
    path = tmp_path / "odd.jsonl"
    datasets.Dataset.from_dict({"body": ["x"], "title": ["y"]}).to_json(str(path))
    with pytest.raises(ConfigError, match=r"(?s)neither.*'body'.*'title'"):
        load_documents(DataConfig(source=str(path)), tok)
    with pytest.raises(ConfigError, match=r"(?s)text_field='content'.*'body'"):
        load_documents(DataConfig(source=str(path), format="text", text_field="content"), tok)
    with pytest.raises(ConfigError, match="messages_field"):
        load_documents(DataConfig(source=str(path), format="conversations"), tok)


def test_missing_local_file_names_the_path(tok, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents(DataConfig(source=str(missing)), tok)


def test_hub_id_offline_is_a_config_error(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"(?s)made-up-org/no-such-dataset.*offline"):
        load_documents(DataConfig(source="made-up-org/no-such-dataset"), tok)
