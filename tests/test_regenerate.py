"""dflash-regenerate: assistant turns become the target's own greedy responses."""

from __future__ import annotations

import json

import datasets
import pytest

from dflash.cli.regenerate import main
from dflash.decoding import generate
from dflash.io import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.regenerate import stop_ids


def test_regenerate_rewrites_only_assistant_turns(tmp_path):
    convs = [
        [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "ORIGINAL 1"}],
        [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"},
         {"role": "assistant", "content": "ORIGINAL 2"}, {"role": "user", "content": "class A:"},
         {"role": "assistant", "content": "ORIGINAL 3"}],
        [{"role": "user", "content": "for i in range(10):"}, {"role": "assistant", "content": "ORIGINAL 4"}],
    ]
    src = tmp_path / "chats.jsonl"
    datasets.Dataset.from_dict({"messages": convs}).to_json(str(src), lines=True)
    out = tmp_path / "regen.jsonl"
    assert main(["--target", "tiny-code", "--data", str(src), "--out", str(out), "--max-new-tokens", "12",
                 "--batch-size", "2", "--dtype", "float32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for old, new in zip(convs, rows, strict=True):
        assert [m["role"] for m in new["messages"]] == [m["role"] for m in old]
        for a, b in zip(old, new["messages"], strict=True):
            if a["role"] == "assistant":
                assert not b["content"].startswith("ORIGINAL")
            else:
                assert a == b
    # The first turn is exactly the target's greedy response to the templated prompt.
    tok, target = load_tokenizer("tiny-code"), load_target("tiny-code")
    prompt = tok.apply_chat_template(convs[0][:1], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    eos = stop_ids(tok, target.cfg.eos_token_id)
    ref = generate(target, [ids], max_new_tokens=12, eos_ids=eos).tokens[0]
    ref = ref[:-1] if ref and ref[-1] in eos else ref
    assert rows[0]["messages"][1]["content"] == tok.decode(ref, skip_special_tokens=True)


def test_regenerate_errors(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (not required by argparse: --compile-only needs neither)
        main(["--out", str(tmp_path / "o.jsonl")])
    assert "--data and --out are required" in capsys.readouterr().err
    assert main(["--compile-only", "--topology", "v5e-8"]) == 2
    assert "--compile-only needs --target-config (topologies: v5e-4, v5e-8" in capsys.readouterr().err
    assert main(["--compile-only"]) == 2
    assert "--compile-only needs --target-config and --topology" in capsys.readouterr().err


def test_regenerate_reads_sharegpt_turns_as_training_does(tmp_path):
    """ShareGPT's from/value turns (which the trainer's data path accepts) regenerate exactly as
    the same conversation written with role/content."""
    roles = [[{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "ORIGINAL"}]]
    share = [[{"from": "human", "value": "def add(a, b):"}, {"from": "gpt", "value": "ORIGINAL"}]]
    outs = []
    for name, convs in (("roles", roles), ("share", share)):
        src, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}_out.jsonl"
        datasets.Dataset.from_dict({"messages": convs}).to_json(str(src), lines=True)
        assert main(["--target", "tiny-code", "--data", str(src), "--out", str(out), "--max-new-tokens", "8",
                     "--dtype", "float32"]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outs[1] == outs[0]
    assert outs[0][0]["messages"][0] == roles[0][0] and outs[0][0]["messages"][1]["content"] != "ORIGINAL"


def test_process_0_bar_follows_the_other_hosts_shards_and_never_hangs(tmp_path):
    """Done with its own shards, process 0 keeps its bar moving while other hosts write theirs,
    and gives up watching after a stall (a dead peer must not hang it here)."""
    import threading
    import time
    import types

    from dflash.training.regen_shards import ShardPlan

    plan = ShardPlan.open(tmp_path / "out.jsonl", num_items=8, shard_size=2, settings={"x": 1})
    bar = types.SimpleNamespace(n=0, refresh=lambda: None)

    def peer():  # another host finishing shards 1..3, one every 0.1 s
        for k in (1, 2, 3, 0):
            time.sleep(0.1)
            plan.shard_path(k).write_text("{}\n")

    writer = threading.Thread(target=peer)
    writer.start()
    plan._follow_peers(bar, stall_s=5.0, poll_s=0.02)
    writer.join()
    assert bar.n == plan.num_shards == 4
    plan.shard_path(3).unlink()
    bar.n, t0 = 3, time.monotonic()
    plan._follow_peers(bar, stall_s=0.3, poll_s=0.02)  # shard 3's host died: stop watching
    assert bar.n == 3 and 0.3 <= time.monotonic() - t0 < 3.0
