"""Speculative engine: greedy output == AR greedy output, token for token, for every method."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dflash.config import ModelConfig
from dflash.decoding import generate
from dflash.decoding.compiled import COMPILES
from dflash.decoding.method import ChainDraft
from dflash.decoding.methods import NgramDraft, NoDraft
from dflash.decoding.speculative import speculative_generate
from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter
from dflash.models import build

CFG = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())
MASK = 60


def sharpened_target():
    """A tiny random target, sharpened so greedy continuations repeat (real n-gram acceptances)."""
    model = build(CFG, seed=1)
    model.embed_tokens[...] = model.embed_tokens[...] * 8.0
    return model


@pytest.fixture(scope="module")
def target():
    return sharpened_target()


def _prompts(batch: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60, size=int(n)).tolist() for n in rng.integers(1, 30, size=batch)]


@dataclasses.dataclass(frozen=True)
class OracleDraft(ChainDraft):
    """Test-only: proposes the known greedy continuation, corrupting some positions.

    Exercises every acceptance count 0..K-1, which untrained drafters rarely reach.
    """

    block_size: int
    hidden_layers: tuple[int, ...] = ()

    def init(self, drafter, batch, max_len, dtype):
        return drafter  # (reference tokens [B, L], corrupt-here flags [B, L]) ride in the state

    def prefill(self, drafter, state, hidden, prompt_lens):
        return state

    def propose(self, drafter, target, state, step, key, sampling):
        ref_BL, bad_BL = state
        idx = jnp.minimum(step.total_B[:, None] + jnp.arange(self.block_size - 1)[None], ref_BL.shape[1] - 1)
        ref = jnp.take_along_axis(ref_BL, idx, axis=1)
        bad = jnp.take_along_axis(bad_BL, idx, axis=1)
        return jnp.where(bad, (ref + 1) % 60, ref).astype(jnp.int32), None

    def commit(self, drafter, state, hidden, lengths, accepted):
        return state


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("block", [4, 16])
def test_untrained_dflash_is_lossless(target, batch, block):
    prompts = _prompts(batch, seed=batch * 100 + block)
    ref = generate(target, prompts, max_new_tokens=40, eos_ids=())
    cfg = DFlashConfig.for_target(CFG, mask_token_id=MASK, num_layers=2, block_size=block,
                                  target_layer_ids=(0, 2))
    drafter = build_drafter(cfg, seed=block)
    out = speculative_generate(target, prompts, method=DFlashDraft.of(drafter), drafter=drafter,
                               max_new_tokens=40, eos_ids=(), mask_token_id=MASK)
    assert out.tokens == ref.tokens
    assert all(1 <= a <= block for row in out.acceptance_lengths for a in row)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("block", [4, 16])
def test_ngram_and_ar_methods_are_lossless(target, batch, block):
    prompts = _prompts(batch, seed=7 + batch + block)
    ref = generate(target, prompts, max_new_tokens=48, eos_ids=())
    for method in (NoDraft(), NgramDraft(block_size=block)):
        out = speculative_generate(target, prompts, method=method, max_new_tokens=48, eos_ids=())
        assert out.tokens == ref.tokens, method
    assert speculative_generate(target, prompts, method=NoDraft(), max_new_tokens=48,
                                eos_ids=()).tau == 1.0


def _oracle(prompts, continuations, corrupt_rate: float, seed: int = 0):
    ref_buf = np.zeros((len(prompts), 256), np.int32)
    for i, (p, t) in enumerate(zip(prompts, continuations, strict=True)):
        ref_buf[i, : len(p) + len(t)] = p + t
    bad = np.random.default_rng(seed).random(ref_buf.shape) < corrupt_rate
    return jnp.asarray(ref_buf), jnp.asarray(bad)


@pytest.mark.parametrize("corrupt_rate", [0.3, 0.1, 0.0])
def test_high_acceptance_paths_are_lossless(target, corrupt_rate):
    prompts = _prompts(4, seed=int(corrupt_rate * 10))
    budgets = [33, 50, 17, 50]
    ref = generate(target, prompts, max_new_tokens=budgets, eos_ids=())
    out = speculative_generate(target, prompts, method=OracleDraft(block_size=8),
                               drafter=_oracle(prompts, ref.tokens, corrupt_rate),
                               max_new_tokens=budgets, eos_ids=())
    assert out.tokens == ref.tokens
    hist = out.histogram()
    if corrupt_rate == 0.0:
        assert out.tau > 6.5  # nearly every block fully accepted
    else:
        assert sum(1 for h in hist if h) >= 3  # several different acceptance counts exercised


def test_eos_inside_an_accepted_block_stops_the_row(target):
    prompts = _prompts(3, seed=11)
    free = generate(target, prompts, max_new_tokens=40, eos_ids=())
    eos = free.tokens[1][9]
    ref = generate(target, prompts, max_new_tokens=40, eos_ids=(eos,))
    out = speculative_generate(target, prompts, method=OracleDraft(8),
                               drafter=_oracle(prompts, free.tokens, 0.0), max_new_tokens=40, eos_ids=(eos,))
    assert out.tokens == ref.tokens
    assert out.tokens[1][-1] == eos


def test_drafter_cache_path_equals_training_path():
    """Drafting through the context cache == the dense training forward over the same context."""
    cfg = DFlashConfig.for_target(CFG, mask_token_id=MASK, num_layers=2, block_size=6,
                                  target_layer_ids=(1, 2))
    drafter = build_drafter(cfg, seed=3)
    target = build(CFG, seed=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 60, size=(2, 23)))
    hidden = target(ids, jnp.broadcast_to(jnp.arange(23), (2, 23)), hidden_layers=(1, 2)).hidden
    feats = DFlashDraft._features(hidden)  # [B, S, n*D]
    p = jnp.asarray([17, 9])  # per-row anchor positions: context is 0..p-1
    anchor = ids[jnp.arange(2), p]
    # Cache path: context written in two chunks (prefill then an extension), stale tail rolled back.
    cache = drafter.init_context_cache(2, 40)
    cache = drafter.extend_context(cache, feats[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)),
                                   jnp.asarray([8, 8]))
    cache = drafter.extend_context(cache, feats[:, 8:], jnp.broadcast_to(jnp.arange(8, 23), (2, 15)), p)
    got = drafter.draft_logits(target, cache, anchor)
    # Training path: the whole context, one block per row, context visible strictly before p.
    block = jnp.concatenate([anchor[:, None], jnp.full((2, 5), MASK)], axis=1)
    x = target.embed(block)[:, None]  # [B, A=1, K, D]
    q_pos = (p[:, None] + jnp.arange(6)[None])[:, None]
    ctx = drafter.project_context(feats)
    ctx_mask = (jnp.arange(23)[None, None] < p[:, None, None])  # [B, 1, S]
    h = drafter(x, q_pos, ctx, jnp.broadcast_to(jnp.arange(23), (2, 23)), ctx_mask)
    want = target.unembed(h[:, 0, 1:])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_engine_compiles_once_for_many_steps(target):
    prompts = _prompts(2, seed=3)
    method = NgramDraft(block_size=4)
    before = COMPILES[0]
    speculative_generate(target, prompts, method=method, max_new_tokens=64, eos_ids=())
    assert COMPILES[0] == before + 2  # the start (prefill) and the loop programs
    out = speculative_generate(target, _prompts(2, seed=4), method=method, max_new_tokens=64, eos_ids=())
    assert len(out.acceptance_lengths[0]) > 10  # many loop steps ran ...
    assert COMPILES[0] == before + 2  # ... under the one compiled program, compiled once
    assert out.compile_s == 0.0


def test_finished_rows_leave_the_device_batch(target):
    """Batch 8 with budgets 4..60: once at most half the rows are active, the rest run alone."""
    prompts = _prompts(8, seed=5)
    budgets = [4, 60, 8, 56, 12, 52, 16, 48]
    ref = generate(target, prompts, max_new_tokens=budgets, eos_ids=())
    method = NgramDraft(block_size=4)
    out = speculative_generate(target, prompts, method=method, max_new_tokens=budgets, eos_ids=())
    assert out.tokens == ref.tokens and [len(t) for t in out.tokens] == budgets
    assert out.device_batches[0] == 8 and out.device_batches[1] <= 4  # compacted
    full = speculative_generate(target, prompts, method=method, max_new_tokens=budgets, eos_ids=(),
                                compact=False)
    assert full.device_batches == [8] and full.tokens == out.tokens
    assert full.acceptance_lengths == out.acceptance_lengths and full.target_forwards == out.target_forwards


@pytest.mark.parametrize("batch,block", [(1, 16), (4, 4)])
def test_trained_shipped_drafter_is_lossless(batch, block):
    """The shipped tiny-code-dflash drafter on the shipped target: speculative == AR greedy."""
    from dflash.drafters import resolve_method
    from dflash.io import load_target
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.tiny_corpus import heldout_prompts

    target, tok = load_target("tiny-code"), load_tokenizer("tiny-code")
    prompts = [tok(p).input_ids[-64:] for p in heldout_prompts(batch, seed=1)]
    ref = generate(target, prompts, max_new_tokens=64, eos_ids=target.cfg.eos_token_id)
    method, drafter = resolve_method("tiny-code-dflash", target, block_size=block)
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=64,
                               eos_ids=target.cfg.eos_token_id, mask_token_id=drafter.cfg.mask_token_id)
    assert out.tokens == ref.tokens
    assert max(a for row in out.acceptance_lengths for a in row) > 1  # it really drafts
