"""KV cache invariants: cached == uncached, batching == alone, masks == loop references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.attention import visibility
from dflash.config import ModelConfig
from dflash.decoding import generate
from dflash.errors import CacheOverflowError
from dflash.models import build, init_cache

CFG = ModelConfig(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())


@pytest.fixture(scope="module")
def model():
    return build(CFG, seed=3)


def _uncached(model, ids):
    pos = jnp.arange(ids.shape[1])[None]
    return np.asarray(model(jnp.asarray(ids)[None] if ids.ndim == 1 else jnp.asarray(ids), pos).logits)


def test_cached_chunks_equal_uncached_forward(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 67, size=(2, 29)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(29), (2, 29))).logits)
    cache = init_cache(CFG, 2, 40)
    got = []
    for start, stop in [(0, 7), (7, 8), (8, 20), (20, 29)]:  # prefill, 1 token, blocks
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        out = model(jnp.asarray(ids[:, start:stop]), pos, cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [29, 29]


def test_rollback_then_rewrite_equals_clean_run(model):
    """Speculative pattern: write a wrong block, roll back, write the right tokens."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 67, size=(1, 20)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.arange(20)[None]).logits)
    cache = model(jnp.asarray(ids[:, :10]), jnp.arange(10)[None], init_cache(CFG, 1, 32)).cache
    # A block of 8 whose first 2 "drafts" are right: keep them (length 12), roll back the rest.
    block = rng.integers(0, 67, size=(1, 8)).astype(np.int32)
    block[:, :2] = ids[:, 10:12]
    cache = model(jnp.asarray(block), jnp.arange(10, 18)[None], cache).cache
    cache = cache.at_lengths(jnp.array([12]))
    # Short blocks next, while stale K/V still sits in slots 14..17: it must be invisible.
    for lo, hi in ((12, 14), (14, 15), (15, 20)):
        out = model(jnp.asarray(ids[:, lo:hi]), jnp.arange(lo, hi)[None], cache)
        np.testing.assert_allclose(np.asarray(out.logits), full[:, lo:hi], atol=1e-5, rtol=0)
        cache = out.cache
    assert np.asarray(cache.lengths).tolist() == [20]


def test_rows_with_different_lengths_decode_like_alone(model):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 67, size=n).tolist() for n in (1, 9, 4, 17)]
    batched = generate(model, prompts, max_new_tokens=[12, 5, 12, 9], eos_ids=())
    for prompt, budget, got in zip(prompts, [12, 5, 12, 9], batched.tokens, strict=True):
        alone = generate(model, [prompt], max_new_tokens=budget, eos_ids=())
        assert got == alone.tokens[0]
        assert len(got) == budget


def test_block_mask_visibility_matches_loop_reference():
    rng = np.random.default_rng(3)
    batch, block, max_len = 3, 5, 13
    lengths = np.array([0, 4, 8], dtype=np.int32)
    tree = rng.random((batch, block, block)) < 0.5  # arbitrary per-row masks
    for bm in (np.ones((block, block), bool), np.tril(np.ones((block, block), bool)), tree):
        got = np.asarray(visibility(jnp.asarray(lengths), max_len, jnp.asarray(bm)))
        bm3 = np.broadcast_to(bm, (batch, block, block))
        want = np.zeros((batch, block, max_len), bool)
        for b in range(batch):
            for t in range(block):
                for s in range(max_len):
                    if s < lengths[b]:
                        want[b, t, s] = True
                    elif s < lengths[b] + block:
                        want[b, t, s] = bm3[b, t, s - lengths[b]]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["bidirectional", "tree"])
def test_masked_block_over_cache_equals_uncached_dense_mask(model, kind):
    """A block attending to the cached prefix under a mask == one dense uncached pass."""
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, 67, size=(2, 13)).astype(np.int32))
    p, t = 6, 7
    if kind == "bidirectional":
        bm = np.ones((t, t), bool)
    else:  # random ancestor-style mask: each node sees itself and a random subset of others
        bm = (rng.random((t, t)) < 0.4) | np.eye(t, dtype=bool)
    cache = model(ids[:, :p], jnp.broadcast_to(jnp.arange(p), (2, p)), init_cache(CFG, 2, 16)).cache
    got = model(ids[:, p:], jnp.broadcast_to(jnp.arange(p, p + t), (2, t)), cache,
                block_mask=jnp.asarray(bm)).logits
    dense = np.tril(np.ones((p + t, p + t), bool))
    dense[p:, p:] = bm
    want = model(ids, jnp.broadcast_to(jnp.arange(p + t), (2, p + t)), block_mask=jnp.asarray(dense)).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, p:]), atol=1e-5, rtol=0)
    causal = model(ids[:, p:], jnp.broadcast_to(jnp.arange(p, p + t), (2, t)), cache).logits
    assert np.abs(np.asarray(causal[:, 0]) - np.asarray(got[:, 0])).max() > 1e-4  # the mask matters


def test_overlong_prompt_is_an_error(model):
    with pytest.raises(CacheOverflowError, match="max_len=16"):
        generate(model, [[1] * 10], max_new_tokens=7, max_len=16)
    with pytest.raises(CacheOverflowError):
        generate(model, [[1] * 20], max_new_tokens=1, max_len=16)


def test_generation_is_jitted_once_per_shape(model):
    """Same bucketed shapes reuse the compiled decode loop (no per-token host work)."""
    from dflash.decoding.compiled import COMPILES

    before = COMPILES[0]
    generate(model, [[1, 2, 3]], max_new_tokens=8, eos_ids=())
    assert COMPILES[0] == before + 1
    again = generate(model, [[4, 5, 6, 7, 8]], max_new_tokens=8, eos_ids=(), key=jax.random.key(5))
    assert COMPILES[0] == before + 1 and again.compile_s == 0.0
    generate(model, [[4, 5, 6, 7, 8]], max_new_tokens=40, eos_ids=())  # a new budget: a new program
    assert COMPILES[0] == before + 2
