"""Logit, hidden-state and greedy-generation parity against ``transformers`` (fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import GPT_OSS, LLAMA3_ROPE, MOE

from dflash.decoding import generate
from dflash.io import load_target

CASES = {
    "qwen3-gqa-untied": ("qwen3", {}),
    "qwen3-mqa-tied": ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2-mha-bias": ("qwen2", {"num_key_value_heads": 4}),
    "qwen2-gqa-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama-gqa-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    # Sliding-window layers (the attention kind's ``window``) from layer 1 on, narrower than the prompt.
    "qwen3-sliding-window": ("qwen3", {"use_sliding_window": True, "sliding_window": 5,
                                       "max_window_layers": 1}),
    # Mixture-of-experts MLPs (layers 0 and 2; layer 1 dense), renormalised top-2 of 6 experts.
    "qwen3-moe": ("qwen3_moe", MOE),
    # Every second layer sparse, top-k probabilities not renormalised (the class default).
    "qwen3-moe-step2-unnormalised": ("qwen3_moe", {**MOE, "mlp_only_layers": [], "decoder_sparse_step": 2,
                                                   "norm_topk_prob": False}),
    # gpt-oss: sinks, biases, a window of 5 on layers 0 and 2, YaRN, top-3 of 5 clamped-SwiGLU experts.
    "gpt-oss": ("gpt_oss", GPT_OSS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_hidden_states_match_transformers(hf_checkpoint, case):
    family, overrides = CASES[case]
    hf, directory = hf_checkpoint(family, **overrides)
    ours = load_target(directory)
    rng = np.random.default_rng(1)
    # Long enough that llama3 scaling's low/medium/high frequency bands all matter.
    ids = rng.integers(0, 101, size=(3, 77))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True)
    positions = jnp.broadcast_to(jnp.arange(77), ids.shape)
    out = ours(jnp.asarray(ids), positions, hidden_layers=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-4, rtol=0)
    # Our layer i == HF hidden_states[i + 1]; HF's last entry has the final norm applied.
    for i in range(2):
        np.testing.assert_allclose(np.asarray(out.hidden[i]), ref.hidden_states[i + 1].numpy(),
                                   atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.norm(out.hidden[2])), ref.hidden_states[3].numpy(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["qwen3-gqa-untied", "qwen2-mha-bias", "llama-gqa-llama3-rope",
                                  "qwen3-sliding-window", "qwen3-moe", "gpt-oss"])
def test_greedy_generation_matches_transformers(hf_checkpoint, case):
    family, overrides = CASES[case]
    hf, directory = hf_checkpoint(family, **overrides)
    ours = load_target(directory)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 101, size=n).tolist() for n in (3, 11, 25)]
    result = generate(ours, prompts, max_new_tokens=32, eos_ids=())
    for prompt, got in zip(prompts, result.tokens, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["gpt-oss"])
def test_dflash_generate_on_a_transformers_checkpoint_gives_its_greedy_tokens(tmp_path, capsys, case):
    """``dflash-generate --target DIR`` on a checkpoint transformers saved (the shipped tokenizer
    beside it): 32 greedy tokens of a prompt longer than the window, as transformers generates them."""
    import json
    import shutil

    from conftest import make_hf_model

    from dflash.cli.generate import main
    from dflash.io.loading import SHIPPED

    family, overrides = CASES[case]
    hf = make_hf_model(family, **{**overrides, "vocab_size": 4096})  # the tokenizer's
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, tmp_path / name)
    assert main(["--target", str(tmp_path), "--prompt", "def fib(n):\n    a, b = 0, 1\n", "--max-new-tokens",
                 "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = out["prompt_tokens"]
    assert len(prompt) > overrides["sliding_window"] and len(out["tokens"]) == 32  # no end-of-text drawn
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)
    assert out["tokens"] == ref[0, len(prompt):].tolist()
