"""The recipe data (dflash-prepare-data) on a few rows in each source's own format, read through
the real ``datasets`` path, then regenerated and tokenized as the pipeline does; and the chat
template's keyword arguments (Qwen3's ``enable_thinking``) reaching regeneration."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest

from dflash.cli.prepare_data import main as prepare_main
from dflash.cli.regenerate import main as regenerate_main
from dflash.decoding import generate
from dflash.io import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.chat import conversation_documents
from dflash.training.recipe_data import RECIPES, prepare_recipe_data, prompt_slots
from dflash.training.regenerate import regenerate_conversations, stop_ids
from dflash.training.sources import DataConfig, load_dataset


def _nemotron_rows(split: str, n: int) -> list[dict]:
    """Rows shaped like nvidia/Nemotron-Post-Training-Dataset-v2 (its dataset card's features)."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": f"{split} question {i}"},
                    {"role": "assistant", "content": f"<think>long trace</think>answer {i}"}]
        if i % 2:  # a second turn
            messages += [{"role": "user", "content": f"follow-up {i}"},
                         {"role": "assistant", "content": "more"}]
        rows.append({"uuid": f"{split}-{i}", "license": "CC BY 4.0", "generator": "some-model",
                     "version": "v2", "category": split, "reasoning": "on" if i % 2 else "off",
                     "messages": messages})
    return rows


@pytest.fixture
def local_qwen3_recipe(tmp_path):
    """The qwen3 recipe with every source replaced by a local file of a few rows in its format."""
    sources = []
    for src in RECIPES["qwen3"].sources:
        if src.row_format == "alpaca":  # sahil2801/CodeAlpaca-20k: instruction / input / output
            rows = [{"instruction": "Write a function that adds two numbers.", "input": "",
                     "output": "def add"},
                    {"instruction": "Fix the bug.", "input": "x = 1 +", "output": "x = 1 + 1"}]
            path = tmp_path / f"{src.name}.jsonl"
            datasets.Dataset.from_list(rows).to_json(str(path), lines=True)
        else:
            path = tmp_path / f"{src.name}.parquet"
            datasets.Dataset.from_list(_nemotron_rows(src.split, 3)).to_parquet(str(path))
        sources.append(dataclasses.replace(src, dataset=str(path)))
    return dataclasses.replace(RECIPES["qwen3"], sources=tuple(sources))


def test_prompt_slots():
    conv = [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert prompt_slots(conv) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]
    assert prompt_slots([{"role": "assistant", "content": "a"}]) == []  # nothing asked
    keep = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert prompt_slots(keep)[0] == keep[0]


def test_qwen3_recipe_rows_load_regenerate_and_tokenize(local_qwen3_recipe, tmp_path):
    out = tmp_path / "prompts.jsonl"
    counts = prepare_recipe_data(local_qwen3_recipe, out, total=9, seed=0)
    assert sum(counts.values()) == 9 and set(counts) == {s.name for s in local_qwen3_recipe.sources}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert "system" not in roles  # the empty system turns are dropped
        assert all(m["content"] == "" for m in row["messages"] if m["role"] == "assistant")
    alpaca = [r for r in rows if r["source"] == "codealpaca"]
    users = ("Write a function that adds two numbers.", "Fix the bug.\n\nx = 1 +")  # instruction + input
    assert all(r["messages"][0]["content"] in users for r in alpaca)
    prepare_recipe_data(local_qwen3_recipe, tmp_path / "again.jsonl", total=9, seed=0)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()  # seeded: the same file again
    everything = prepare_recipe_data(local_qwen3_recipe, tmp_path / "all.jsonl", total=0)
    assert sum(everything.values()) == 4 * 3 + 2

    # The file is what dflash-regenerate reads; its output is what training tokenizes.
    regen = tmp_path / "regen.jsonl"
    assert regenerate_main(["--target", "tiny-code", "--data", str(out), "--out", str(regen),
                            "--max-examples", "4", "--max-new-tokens", "6", "--batch-size", "4",
                            "--dtype", "float32", "--no-progress",
                            "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    manifest = json.loads((tmp_path / "regen.jsonl.shards" / "manifest.json").read_text())
    assert "enable_thinking" in json.dumps(manifest)  # a setting of the output: other settings are refused
    ds = load_dataset(DataConfig(source=str(regen), format="conversations"))
    docs = conversation_documents(ds["messages"], load_tokenizer("tiny-code"))
    assert len(docs) == 4 and all(len(d) > 0 for d in docs)


def test_prepare_data_cli(local_qwen3_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(RECIPES, "qwen3", local_qwen3_recipe)
    assert prepare_main(["--recipe", "qwen3", "--out", str(tmp_path / "p.jsonl"), "--total", "5"]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 conversations" in out and """--chat-template-kwargs '{"enable_thinking": false}'""" in out


def test_chat_template_kwargs_reach_the_prompt():
    """A template with Qwen3's switch: with enable_thinking false the generation prompt ends in an
    empty think block, and the regenerated answer is the target's answer to that prompt."""
    tok, target = load_tokenizer("tiny-code"), load_target("tiny-code")
    tok.chat_template += ("{% if add_generation_prompt and enable_thinking is defined"
                          " and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}")
    conv = [[{"role": "user", "content": "def fib(n):"}, {"role": "assistant", "content": ""}]]
    text = tok.apply_chat_template(conv[0][:1], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert text.endswith("assistant\n<think>\n\n</think>\n\n")
    eos = stop_ids(tok, target.cfg.eos_token_id)
    ids = tok(text, add_special_tokens=False).input_ids
    ref = generate(target, [ids], max_new_tokens=8, eos_ids=eos).tokens[0]
    ref = ref[:-1] if ref and ref[-1] in eos else ref
    out = regenerate_conversations(target, tok, conv, max_new_tokens=8, progress=False,
                                   chat_template_kwargs={"enable_thinking": False})
    assert out[0][1]["content"] == tok.decode(ref, skip_special_tokens=True)
