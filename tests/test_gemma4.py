"""Gemma 4 text targets against ``transformers``: one tiny random ``Gemma4ForCausalLM`` holding every
feature at once (sliding window shorter than the prompts, full layers with their own head shape,
keys as values and proportional RoPE, the last two layers sharing the KV of earlier ones with
double-wide MLPs, per-layer inputs, the expert block beside the dense MLP, soft-capped logits):
logits, our save reopened there, cached decoding, trees over shared KV, greedy tokens through
``dflash-generate``, prompt lookup equal to AR; the presets and what stays refused."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dflash.config import PRESETS, ModelConfig, preset_for_hub_id
from dflash.errors import ConfigError
from dflash.io import load_target, save_target
from dflash.io.loading import SHIPPED
from dflash.models import count_params
from dflash.sharding import logical_axes

S, F = "sliding_attention", "full_attention"
TEXT = dict(vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=32, intermediate_size=48,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=5, layer_types=[S, F] * 3,
            num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
            enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=12,
            final_logit_softcapping=3.0, max_position_embeddings=256, tie_word_embeddings=True)


def save_tiny_gemma4(directory, **overrides) -> transformers.Gemma4ForCausalLM:
    """The tiny model (``TEXT`` with ``overrides``; fp32, eval; norms, scales and layer scalars
    randomised, routers spread so top-k routing is decisive) saved with ``save_pretrained`` in
    ``directory``, with the shipped tokenizer (tests/test_gemma4_dflash.py trains drafters on it)."""
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**{**TEXT, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("router.proj.weight"):
                p.mul_(40.0)
        for name, b in hf.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.7)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, directory / name)
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``save_tiny_gemma4``'s model, its directory and our load of it."""
    directory = tmp_path_factory.mktemp("gemma4")
    return save_tiny_gemma4(directory), directory, load_target(directory)


def _logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _ours(target, ids: np.ndarray) -> np.ndarray:
    return np.asarray(target(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)).logits)


def test_layers_logits_and_our_save_reopened_by_transformers(checkpoint, tmp_path):
    hf, _, ours = checkpoint
    specs = ours.cfg.layers
    assert [s.mixer_option("window", 0) for s in specs] == [5, 0] * 3
    assert [s.mixer_option("kv_store", "") for s in specs] == ["", "", S, F, "", ""]
    assert [s.mixer_option("kv_reuse", "") for s in specs] == ["", "", "", "", S, F]
    assert [s.mlp_option("dense_size") for s in specs] == [48] * 4 + [96] * 2  # double-wide when shared
    assert ours.cfg.per_layer_input_size == 8
    assert ours.init_cache(1, 4).layers[4:] == (None, None)  # consumers store nothing
    for path, param in nnx.to_flat_state(nnx.state(ours, nnx.Param)):  # every parameter has a sharding rule
        logical_axes(".".join(map(str, path)), len(param.shape))
    ids = np.random.default_rng(1).integers(0, 4096, size=(1, 20))
    ref = _logits(hf, ids)
    assert 0.1 < np.abs(ref).max() < 3.0  # soft-capped, not flat
    np.testing.assert_allclose(_ours(ours, ids), ref, atol=1e-4, rtol=0)
    assert count_params(ours) == ours.cfg.num_params() == sum(p.numel() for p in hf.parameters()) + 6
    # a Gemma4ForConditionalGeneration config.json: its text_config, the wrapper's tie_word_embeddings
    # (its weights under model.language_model.* load as Qwen3.5's do)
    wrapped = {"model_type": "gemma4", "tie_word_embeddings": True, "vision_config": None,
               "text_config": {**hf.config.to_dict(), "tie_word_embeddings": False}}
    assert ModelConfig.from_hf(wrapped) == ours.cfg
    save_target(ours, tmp_path / "ours")  # (+6: transformers keeps layer_scalar as a buffer)
    assert ModelConfig.from_hf(json.loads((tmp_path / "ours" / "config.json").read_text())) == ours.cfg
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(_logits(reopened, ids), ref, atol=1e-5, rtol=0)


def test_cached_decoding_rollback_and_a_tree_over_shared_kv_equal_the_uncached_pass(checkpoint):
    """Two 4-token blocks, a third of which 2 tokens are kept, then one token at a time (past the
    window): every step's logits are transformers' uncached pass's. Then a tree over the shared KV (root r,
    children a and b, d under b): its nodes' logits are their chains', and after committing the
    path r, b, d the next token's logits are that chain's. (Jitted, 3 shapes: compiles dominate.)"""
    hf, _, ours = checkpoint
    graphdef, state = nnx.split(ours)
    step = jax.jit(lambda state, ids, pos, cache, mask: nnx.merge(graphdef, state)(ids, pos, cache,
                                                                                   block_mask=mask))
    causal = jnp.tril(jnp.ones((4, 4), bool))
    seq = np.random.default_rng(2).integers(0, 4096, size=(1, 15))
    nodes, parent = np.array([[11, 22, 33, 44]]), [-1, 0, 0, 2]
    path = [0, 2, 3]  # r, b, d
    full = _logits(hf, np.concatenate([seq, nodes[:, path], [[66]]], axis=1))  # 19 tokens (parity: above)
    cache = ours.init_cache(1, 24)
    for start in (0, 4):
        out = step(state, jnp.asarray(seq[:, start:start + 4]), jnp.arange(start, start + 4)[None], cache,
                   causal)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits), full[:, start:start + 4], atol=1e-4, rtol=0)
    block = np.concatenate([seq[:, 8:10], [[7, 8]]], axis=1)  # two right tokens, two wrong ones
    out = step(state, jnp.asarray(block), jnp.arange(8, 12)[None], cache, causal)
    np.testing.assert_allclose(np.asarray(out.logits)[:, :2], full[:, 8:10], atol=1e-4, rtol=0)
    cache = out.cache.keep(jnp.array([2]), 4)
    for t in range(10, 15):
        out = step(state, jnp.asarray(seq[:, t:t + 1]), jnp.array([[t]]), cache, causal[:1, :1])
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, t], atol=1e-4, rtol=0)
    mask, depth = np.eye(4, dtype=bool), np.zeros(4, int)
    for i in range(4):
        j = parent[i]
        while j >= 0:
            mask[i, j], j, depth[i] = True, parent[j], depth[i] + 1
    out = step(state, jnp.asarray(nodes), jnp.asarray(15 + depth)[None], cache, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out.logits)[:, path], full[:, 15:18], atol=1e-4, rtol=0)
    cache = out.cache.commit_path(cache.lengths, jnp.array([path])).keep(jnp.array([3]), 4)
    out = step(state, jnp.asarray([[66]]), jnp.array([[18]]), cache, causal[:1, :1])
    np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, 18], atol=1e-4, rtol=0)


def test_greedy_tokens_through_dflash_generate_and_prompt_lookup_equal_transformers(checkpoint, capsys):
    """``dflash-generate --target DIR``: 32 greedy tokens as transformers generates them; chain
    speculative decoding with prompt lookup (repetitive prompts: drafts accepted) equals AR."""
    from dflash.cli.generate import main
    from dflash.decoding.methods import NgramDraft
    from dflash.decoding.speculative import speculative_generate

    hf, directory, ours = checkpoint
    assert main(["--target", str(directory), "--prompt", "def fib(n):\n    a, b = 0, 1\n",
                 "--max-new-tokens", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = out["prompt_tokens"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)
    assert out["tokens"] == ref[0, len(prompt):].tolist()
    # Repetitive prompts: the lookup drafts tokens every step (rejected by this random target),
    # so every step verifies a 4-token block over the shared KV and rolls the drafts back.
    rng = np.random.default_rng(3)
    prompts = [(rng.integers(5, 4000, n).tolist() * 3)[:3 * n - 1] for n in (4, 9, 3)]
    budgets = [20, 7, 16]
    lookup = speculative_generate(ours, prompts, method=NgramDraft(block_size=4), max_new_tokens=budgets,
                                  eos_ids=())
    for prompt, got, n in zip(prompts, lookup.tokens, budgets, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


# gemma-4-31B / 26B-A4B (their text_config keys that we read; dflash.config cites the sources).
PUBLISHED = {"google/gemma-4-31B-it": 31, "google/gemma-4-26B-A4B-it": 26}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(hub_id):
    cfg = preset_for_hub_id(hub_id)
    assert abs(cfg.num_params() / 1e9 - PUBLISHED[hub_id]) < 0.05 * PUBLISHED[hub_id], cfg.num_params()
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg in PRESETS.values()


@pytest.mark.parametrize("bad,match", [
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"rope_parameters": {S: {"rope_type": "default", "rope_theta": 1e4},
                          F: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}},
     f"rope_parameters.{F}"),
    ({"num_kv_shared_layers": 5}, "num_kv_shared_layers"),
    ({"enable_moe_block": True, "num_experts": None}, "num_experts"),
])
def test_what_stays_unsupported_is_refused_naming_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**TEXT, "model_type": "gemma4_text", **bad})
