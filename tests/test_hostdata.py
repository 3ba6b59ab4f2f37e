"""Data lanes (per-host data) and remote sources, in one process; tests/test_multiprocess.py runs them
across processes."""

from __future__ import annotations

import json

import fsspec
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash.config import ConfigError
from dflash.io.tokenizer import load_tokenizer
from dflash.training.data import Batches, DataConfig, load_documents, load_lane_documents, pack
from dflash.training.hostdata import LaneBatches, gather_lane_sizes, load_lane_rows, process_lanes


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-code")


def _write_docs(path, n=37):
    rng = np.random.default_rng(5)
    lines = [json.dumps({"text": "x = " + " + ".join(str(v) for v in rng.integers(0, 99, 1 + i % 11))})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_one_lane_is_exactly_the_batches_of_all_documents(tok, tmp_path):
    cfg = DataConfig(source=_write_docs(tmp_path / "d.jsonl"), seq_len=16, heldout_fraction=0.2, seed=1)
    train, held = load_documents(cfg, tok)
    rows, held2 = load_lane_rows(cfg, tok, [0], pad_id=0)
    assert [d.ids.tolist() for d in held] == [d.ids.tolist() for d in held2]
    ref = Batches(pack(train, 16, 0), 4, seed=9)
    lanes = LaneBatches(rows, 1, 4, seed=9, lane_sizes=gather_lane_sizes(rows, 1))
    assert lanes.steps_per_epoch == ref.steps_per_epoch
    for step in (0, 1, ref.steps_per_epoch + 2):
        for k, v in ref.batch(step).items():
            np.testing.assert_array_equal(lanes.batch(step)[k], v)


def test_lanes_tokenize_only_their_documents_and_compose_the_global_batch(tok, tmp_path):
    cfg = DataConfig(source=_write_docs(tmp_path / "d.jsonl"), seq_len=16, heldout_fraction=0.1, lanes=4)
    everything, held = load_lane_documents(cfg, tok, None)
    some, held_some = load_lane_documents(cfg, tok, [1, 3])
    assert sorted(some) == [1, 3] and all(i % 4 == j for j, docs in some.items() for i, _ in docs)
    indices = {j: [i for i, _ in d] for j, d in everything.items()}
    assert {j: [i for i, _ in d] for j, d in some.items()} == {j: indices[j] for j in (1, 3)}
    assert len(held_some) == len(held) > 0  # held-out documents: all of them, on every process
    full_rows, _ = load_lane_rows(cfg, tok, range(4), pad_id=0)
    sizes = gather_lane_sizes(full_rows, 4)
    full = LaneBatches(full_rows, 4, 8, seed=2, lane_sizes=sizes)
    half = LaneBatches({j: full_rows[j] for j in (2, 3)}, 4, 8, seed=2, lane_sizes=sizes)
    for step in range(3):
        np.testing.assert_array_equal(half.local_batch(step)["tokens"], full.batch(step)["tokens"][4:])
    with pytest.raises(ValueError, match="holds lanes"):
        half.batch(0)
    with pytest.raises(ConfigError, match="fewer than"):
        LaneBatches(full_rows, 4, 4 * (max(sizes) + 1), seed=2, lane_sizes=sizes)


def test_process_lanes_single_process_holds_every_lane():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    assert process_lanes(NamedSharding(mesh, P("data")), 8, 16, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="not divisible"):
        process_lanes(NamedSharding(mesh, P("data")), 6, 16, 4)


def test_fsspec_sources_and_a_missing_backend_named(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE", str(tmp_path / "cache"))
    local = _write_docs(tmp_path / "d.jsonl", n=9)
    with fsspec.open("memory://bucket/data/d.jsonl", "w") as f:
        f.write(open(local).read())
    remote, _ = load_documents(DataConfig(source="memory://bucket/data", heldout_fraction=0.0), tok)
    here, _ = load_documents(DataConfig(source=local, heldout_fraction=0.0), tok)
    assert [d.ids.tolist() for d in remote] == [d.ids.tolist() for d in here]
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the fsspec backend package 'gcsfs'"):
            load_documents(DataConfig(source="gs://some-bucket/chats.jsonl"), tok)
    with pytest.raises(ConfigError, match="no protocol"):
        load_documents(DataConfig(source="nosuchproto://x/y.jsonl"), tok)
