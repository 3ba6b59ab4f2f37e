"""An independent PyTorch DFlash drafter, written from docs/design.md §5 on `transformers`' Qwen3
building blocks, loads our exported directory and must agree with the JAX drafter; a greedy
speculative loop written in PyTorch must reproduce our engine's tokens and acceptance lengths.

This guards the layout and the semantics serving engines assume: tensor names and ``[out, in]``
orientation (``load_state_dict(strict=True)``), fc + hidden_norm applied once to the target's
hidden states, KV injection (context K/V through each layer's k/v projections, no input norm),
bidirectional attention in the block, same-position labels, the target's embedding and LM head.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from dflash.decoding.speculative import speculative_generate
from dflash.drafters import load_drafter
from dflash.drafters.dflash import DFlashDraft
from dflash.drafters.dflash.hf import save_drafter
from dflash.io import load_target, save_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.tiny_corpus import heldout_prompts


# ----------------------------------------------------------------------------- the reference
class RefAttention(nn.Module):
    def __init__(self, cfg: transformers.Qwen3Config):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n, self.kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n * hd, d, bias=False)
        self.q_norm = Qwen3RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, ctx, rope_q, rope_kv):
        b, t, _ = x.shape
        both = torch.cat([ctx, x], dim=1)  # context (projected features, not normed here) + block
        q = self.q_norm(self.q_proj(x).view(b, t, self.n, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(both).view(b, -1, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(both).view(b, -1, self.kv, self.hd).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, *rope_q)
        k, _ = apply_rotary_pos_emb(k, k, *rope_kv)
        k, v = repeat_kv(k, self.n // self.kv), repeat_kv(v, self.n // self.kv)
        # No mask: the block sees all context (positions < anchor) and all of itself.
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class RefLayer(nn.Module):
    def __init__(self, cfg: transformers.Qwen3Config):
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = RefAttention(cfg)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x, ctx, rope_q, rope_kv):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class RefDFlash(nn.Module):
    def __init__(self, directory: Path):
        super().__init__()
        hf = json.loads((directory / "config.json").read_text())
        cfg = transformers.Qwen3Config(**hf)
        self.layer_ids = hf["dflash_config"]["target_layer_ids"]
        self.mask_id = hf["dflash_config"]["mask_token_id"]
        self.block_size = hf["block_size"]
        # As z-lab's reference reads them: block rows are the raw embedding rows times this scale,
        # the logits the target's head then this soft-cap (Gemma: sqrt(D) and 30; absent: plain).
        self.embed_scale = hf["dflash_config"].get("input_embedding_scale", 1.0)
        self.cap = hf["dflash_config"].get("final_logit_softcapping") or 0.0
        d = cfg.hidden_size
        self.fc = nn.Linear(len(self.layer_ids) * d, d, bias=False)
        self.hidden_norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList([RefLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = Qwen3RotaryEmbedding(cfg)
        weights = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
                   load_file(str(directory / "model.safetensors")).items()}
        # A scaled-embedding target's export also ships the scaled table, for vLLM (dflash.drafters.
        # dflash.hf.scaled_embedding); the reference embeds with the target's table and the scale.
        self.shipped_embedding = weights.pop("embed_tokens.weight", None)
        self.load_state_dict(weights, strict=True)  # exact names, exact [out, in] shapes
        self.eval()

    def draft_logits(self, target: transformers.PreTrainedModel, hidden_states, anchor: int):
        """Logits for positions p+1 .. p+B-1 given the target's hidden states of positions < p."""
        feats = torch.cat([hidden_states[i + 1] for i in self.layer_ids], dim=-1)  # [1, p, n*D]
        p = feats.shape[1]
        ctx = self.hidden_norm(self.fc(feats))
        block = torch.tensor([[anchor] + [self.mask_id] * (self.block_size - 1)])
        x = nn.functional.embedding(block, target.get_input_embeddings().weight) * self.embed_scale
        pos_ctx, pos_q = torch.arange(p)[None], torch.arange(p, p + self.block_size)[None]
        rope_q, rope_ctx = self.rotary(x, pos_q), self.rotary(x, pos_ctx)
        rope_kv = tuple(torch.cat([c, q], dim=1) for c, q in zip(rope_ctx, rope_q, strict=True))
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_kv)
        logits = target.lm_head(self.norm(x))[0, 1:]  # row k predicts the token at p + k
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits


def ref_speculative_greedy(target, drafter: RefDFlash, prompt: list[int], max_new: int,
                           eos: set[int]) -> tuple[list[int], list[int]]:
    """Greedy DFlash decoding, uncached, step by step (docs/design.md §5/§7): tokens, accepted+1 per step."""
    gen = [int(target(torch.tensor([prompt])).logits[0, -1].argmax())]
    accs: list[int] = []
    while gen[-1] not in eos and len(gen) < max_new:
        seq = prompt + gen  # the anchor gen[-1] sits at position p = len(seq) - 1
        p = len(seq) - 1
        hidden = target(torch.tensor([seq[:p]]), output_hidden_states=True).hidden_states
        logits = drafter.draft_logits(target, hidden, seq[p])
        logits[:, drafter.mask_id] = -float("inf")  # the mask token is never proposed
        drafts = logits.argmax(-1).tolist()
        preds = target(torch.tensor([seq + drafts])).logits[0, p:].argmax(-1).tolist()  # [B]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == preds[accepted]:
            accepted += 1
        accs.append(accepted + 1)
        emitted = drafts[:accepted] + [preds[accepted]]
        for tok in emitted[: max_new - len(gen)]:
            gen.append(tok)
            if tok in eos:
                break
    return gen, accs


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The shipped tiny target + trained drafter, exported as an fp32 pair, opened by both sides."""
    out = tmp_path_factory.mktemp("pair")
    target = load_target("tiny-code")
    drafter = load_drafter("tiny-code-dflash", target.cfg)
    save_target(target, out / "target")
    save_drafter(drafter, out / "drafter", target_name="tiny-code", target_cfg=target.cfg)
    hf_target = transformers.AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    return target, load_drafter(out / "drafter", target.cfg), hf_target, RefDFlash(out / "drafter")


@torch.no_grad()
@pytest.mark.parametrize("context_len", [1, 37, 130])
def test_reference_drafter_gives_the_same_draft_logits(pair, context_len):
    target, drafter, hf_target, ref = pair
    rng = np.random.default_rng(context_len)
    tokens = rng.integers(0, 4000, size=context_len + 1).tolist()
    hidden = hf_target(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
    ref_logits = ref.draft_logits(hf_target, hidden, tokens[-1]).numpy()  # [B-1, V]
    # Ours, from the same target hidden states through the drafter's context cache.
    feats = np.concatenate([hidden[i + 1].numpy() for i in drafter.cfg.target_layer_ids], axis=-1)
    cache = drafter.init_context_cache(1, context_len + 8)
    cache = drafter.extend_context(cache, jnp.asarray(feats), jnp.arange(context_len)[None],
                                   jnp.array([context_len]))
    ours = np.asarray(drafter.draft_logits(target, cache, jnp.array([tokens[-1]])))[0]
    assert ours.shape == ref_logits.shape == (drafter.cfg.block_size - 1, target.cfg.vocab_size)
    np.testing.assert_allclose(ours, ref_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_reference_speculative_loop_matches_our_engine(pair):
    target, drafter, hf_target, ref = pair
    tok = load_tokenizer("tiny-code")
    prompts = [tok(p).input_ids[-48:] for p in heldout_prompts(3, seed=2)]
    eos = tuple(target.cfg.eos_token_id)
    ours = speculative_generate(target, prompts, method=DFlashDraft.of(drafter), drafter=drafter,
                                max_new_tokens=40, eos_ids=eos, mask_token_id=drafter.cfg.mask_token_id)
    for i, prompt in enumerate(prompts):
        tokens, accs = ref_speculative_greedy(hf_target, ref, prompt, 40, set(eos))
        assert ours.tokens[i] == tokens
        assert ours.acceptance_lengths[i] == accs
    assert max(max(a) for a in ours.acceptance_lengths) > 1  # drafts were accepted, not only bonus tokens
