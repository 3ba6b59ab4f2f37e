"""The shipped tiny targets (tiny-code, and its Gemma 4 twin tiny-gemma4): genuine HF directories
both stacks open identically."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dflash.io import load_target, resolve
from dflash.io.loading import SHIPPED, read_embedding
from dflash.io.tokenizer import load_tokenizer
from dflash.training import tiny_corpus

SHIPPED_TARGETS = pytest.mark.parametrize("name, model_type", [("tiny-code", "qwen3"),
                                                                ("tiny-gemma4", "gemma4_text")])


@SHIPPED_TARGETS
def test_shipped_directory_is_small_and_complete(name, model_type):
    directory = resolve(name)
    assert directory == SHIPPED[name]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    total = sum(f.stat().st_size for f in directory.iterdir())
    assert total <= 20 * 1024 * 1024
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["model_type"] == model_type
    assert 4000 <= cfg["vocab_size"] <= 8192


@SHIPPED_TARGETS
def test_transformers_and_dflash_agree_on_the_shipped_target(name, model_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve(name)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(directory))
    ours = load_target(name)
    tok = load_tokenizer(name)
    text = tiny_corpus.heldout_prompts(1)[0]
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level BPE round-trips code exactly
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    got = np.asarray(ours(jnp.asarray([ids]), jnp.arange(len(ids))[None]).logits)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the embedding table read alone (what a Gemma DFlash export ships, scaled) is the loaded one
    np.testing.assert_array_equal(np.asarray(read_embedding(name)), np.asarray(ours.embed_tokens[...]))


def test_tokenizer_reserves_mask_and_end_of_text():
    tok = load_tokenizer("tiny-code")
    assert tok.mask_token == tiny_corpus.MASK and tok.mask_token_id is not None
    assert tok.eos_token == tiny_corpus.EOT
    assert tok.eos_token_id in load_target("tiny-code").cfg.eos_token_id
    assert tok.mask_token_id not in tok("x = 1\n").input_ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_split_is_by_file_and_disjoint():
    train_files = tiny_corpus.stdlib_files("train")
    train = {rel for rel, _ in train_files}
    held = {rel for rel, _ in tiny_corpus.stdlib_files("heldout")}
    assert train and held and not train & held
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.1
    # A limit reads only the first files, and gives exactly the head of the whole split.
    assert tiny_corpus.stdlib_files("train", limit=7) == train_files[:7]
