"""Pallas kernels == their pure-jnp references (interpret mode on CPU), dispatch, model wiring.

Every kernel run starts its output buffers as NaN (``poison=True``: a NaN input aliased to
the output) and the test asserts no NaN survives, so every element is proven written.
Tolerances: float32 2e-5 (abs and rel; measured ~5e-7: only the summation order differs);
bfloat16 2e-2 (abs and rel: the kernel normalises after the PV product, the reference before
it, so probabilities round to bf16 at different scales; a few bf16 ulps of outputs ~1).
Both kernel variants (``tpu``: grid over kv tiles with scalar-prefetched lengths; ``gpu``:
Triton-style split loops) run in interpret mode, so both are checked here.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from dflash.attention import causal_mask, visibility
from dflash.cli import bench_kernels
from dflash.config import LayerSpec, ModelConfig
from dflash.decoding.tree import ancestor_mask
from dflash.drafters.dflash import DFlashConfig, build_drafter
from dflash.errors import ConfigError
from dflash.kernels import (
    anchor_block_attention,
    dispatch,
    reference_anchor_block_attention,
    reference_verify_attention,
    verify_attention,
)
from dflash.kernels.prefill_attention import default_q_tile, prefill_attention, reference_prefill_attention
from dflash.models import build, init_cache

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
ON_CPU = jax.default_backend() == "cpu"


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _qkv(rng, b, t, s, n, kh, h, dtype):
    """q ``[B,T,N,H]`` and a cache layer's k, v ``[B,S,K,H]``."""
    kv_shape = (b, s, kh, h)
    return _normal(rng, (b, t, n, h), dtype), _normal(rng, kv_shape, dtype), _normal(rng, kv_shape, dtype)


def _random_parents(rng, b, n):
    """Random trees in topological order: node i's parent is one of nodes 0..i-1 (root: 0)."""
    parents = np.zeros((b, n), np.int32)
    for i in range(1, n):
        parents[:, i] = rng.integers(0, i, size=b)
    return jnp.asarray(parents)


def _block_mask(kind, rng, b, t):
    if kind == "causal":
        return jnp.broadcast_to(causal_mask(t), (b, t, t))
    if kind == "bidirectional":
        return jnp.ones((b, t, t), bool)
    if kind == "tree":
        return ancestor_mask(_random_parents(rng, b, t))
    if kind == "random":  # every row still sees itself (as in every mask the models build)
        return jnp.asarray(rng.random((b, t, t)) < 0.4) | jnp.eye(t, dtype=bool)
    raise ValueError(kind)


def _close(out, ref, dtype, rows=None):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if rows is not None:
        out, ref = out[rows], ref[rows]
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def _sinks(rng, n):
    """Random sink logits ``[N]``, one of them large (it takes nearly all the mass) and one very
    negative (it takes none)."""
    sinks = rng.standard_normal(n) * 3
    sinks[0], sinks[-1] = 25.0, -40.0
    return jnp.asarray(sinks, jnp.float32)


def _positions(kind, bm, lengths):
    """The block's positions: a tree node sits at ``len + depth`` (its ancestors, itself included,
    minus one), every other block is a chain ``len + t``."""
    t = bm.shape[-1]
    if kind == "tree":
        return lengths[:, None] + jnp.sum(bm, -1).astype(jnp.int32) - 1
    return lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]


# ------------------------------------------------------------------------------- verify attention
# (backend, dtype, N, K, T, S, tile, lengths, mask kind, window, sinks): awkward on purpose:
# lengths off the tile grid, empty prefix (0), maximal (len + T == S), one-token blocks, GQA
# ratios 1/4/8; windows shorter than the block (whole tiles before it skipped), shorter than
# the prefix, longer than the whole cache; sinks random with a large and a very negative one.
VERIFY_CASES = [
    ("tpu", jnp.float32, 2, 2, 5, 37, 8, (0, 13, 32), "causal", 0, False),
    ("tpu", jnp.float32, 8, 2, 7, 50, 16, (3, 43), "tree", 4, True),
    ("tpu", jnp.bfloat16, 8, 1, 1, 21, 8, (0, 20, 9), "causal", 0, True),
    ("tpu", jnp.float32, 4, 1, 4, 64, 16, (60, 16), "bidirectional", 20, True),
    ("tpu", jnp.bfloat16, 4, 2, 6, 30, 8, (24, 5), "random", 0, False),
    ("tpu", jnp.float32, 4, 2, 5, 47, 8, (0, 17, 42), "causal", 3, False),
    ("gpu", jnp.float32, 8, 2, 5, 37, 16, (0, 13, 32), "causal", 9, True),
    ("gpu", jnp.bfloat16, 2, 2, 3, 45, 16, (42, 0), "tree", 0, False),
    ("gpu", jnp.float32, 8, 1, 1, 70, 16, (69, 33), "random", 100, True),
    ("gpu", jnp.float32, 4, 2, 6, 90, 16, (80, 37), "tree", 2, False),
]


@pytest.mark.parametrize("backend,dtype,n,kh,t,s,tile,lengths,kind,window,sinks", VERIFY_CASES)
def test_verify_attention_matches_reference(backend, dtype, n, kh, t, s, tile, lengths, kind, window, sinks):
    rng = np.random.default_rng(len(lengths) * 100 + t * 10 + n)
    b, h = len(lengths), 16
    q, k, v = _qkv(rng, b, t, s, n, kh, h, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    bm = _block_mask(kind, rng, b, t)
    sinks_N = _sinks(rng, n) if sinks else None
    pos = _positions(kind, bm, lengths)
    out = verify_attention(q, k, v, lengths, bm, sinks_N, pos, window=window, kv_tile=tile, backend=backend,
                           interpret=True, poison=True)
    assert out.shape == (b, t, n, h) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), "an output element was never written"
    _close(out, reference_verify_attention(q, k, v, lengths, bm, sinks_N, pos, window=window), dtype)


@pytest.mark.parametrize("backend,window", [("tpu", 0), ("gpu", 0), ("tpu", 6), ("gpu", 6)])
def test_verify_attention_skips_tiles_past_the_block(backend, window):
    """Slots in tiles wholly at or past ``len + T`` (and, with a window, wholly before every
    query's window) are never read: NaN there changes nothing.

    (Merely masking them would not do: a masked probability 0 times a NaN value is NaN.)
    """
    rng = np.random.default_rng(7)
    b, t, n, kh, h, s, tile = 3, 4, 4, 2, 16, 70, 16
    q, k, v = _qkv(rng, b, t, s, n, kh, h, jnp.float32)
    lengths = jnp.asarray([0, 17, 40], jnp.int32)
    bm = _block_mask("causal", rng, b, t)
    ref = reference_verify_attention(q, k, v, lengths, bm, window=window)
    first_dead = -(-(lengths + t) // tile) * tile  # first slot of the first tile past the block
    dead = jnp.arange(s)[None, :] >= first_dead[:, None]
    if window:  # tiles before the one holding the oldest slot in the first query's window
        dead |= jnp.arange(s)[None, :] < (jnp.maximum(lengths - window + 1, 0) // tile * tile)[:, None]
        assert dead[2, :32].all()
    dead = dead[:, :, None, None]
    k_nan, v_nan = jnp.where(dead, jnp.nan, k), jnp.where(dead, jnp.nan, v)
    out = verify_attention(q, k_nan, v_nan, lengths, bm, window=window, kv_tile=tile, backend=backend,
                           interpret=True, poison=True)
    _close(out, ref, jnp.float32)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_verify_attention_fully_masked_rows_are_zero(backend):
    """A query row with no visible key (empty prefix, empty block-mask row) gives zeros, not NaN.

    ``attend`` gives the mean of all values there instead; no model mask produces such a row
    (every query sees itself), so only rows with a visible key are compared.
    """
    rng = np.random.default_rng(3)
    b, t, n, kh, h, s = 2, 4, 4, 2, 16, 24
    q, k, v = _qkv(rng, b, t, s, n, kh, h, jnp.float32)
    lengths = jnp.asarray([0, 9], jnp.int32)
    bm = jnp.asarray(rng.random((b, t, t)) < 0.5).at[0, 1].set(False).at[0, 3].set(False)
    bm = bm.at[0, 0, 0].set(True)
    out = verify_attention(q, k, v, lengths, bm, kv_tile=16, backend=backend, interpret=True, poison=True)
    visible = np.asarray(visibility(lengths, s, bm).any(-1))  # [B, T]
    assert not visible.all()
    np.testing.assert_array_equal(np.asarray(out)[~visible], 0.0)
    _close(out, reference_verify_attention(q, k, v, lengths, bm), jnp.float32, rows=visible)


def test_tpu_variants_under_the_tpu_interpreter():
    """The Mosaic variants under Pallas' TPU interpreter: SMEM/VMEM, DMAs, NaN-filled
    uninitialised memory (scratch included) and race detection, closer to hardware (verify and
    prefill with windows that skip whole kv tiles, and sinks)."""
    rng = np.random.default_rng(8)
    params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    b, t, n, kh, h, s = 2, 3, 4, 2, 16, 21
    q, k, v = _qkv(rng, b, t, s, n, kh, h, jnp.float32)
    lengths, bm = jnp.asarray([0, 18], jnp.int32), _block_mask("tree", rng, b, t)
    sinks, pos = _sinks(rng, n), _positions("tree", bm, lengths)
    out = verify_attention(q, k, v, lengths, bm, sinks, pos, window=5, kv_tile=8, backend="tpu",
                           interpret=params, poison=True)
    _close(out, reference_verify_attention(q, k, v, lengths, bm, sinks, pos, window=5), jnp.float32)
    a, qn = 3, 2
    qa, kb, vb = (_normal(rng, shape, jnp.float32) for shape in [(b, a, qn, n, h), (b, a, qn, kh, h),
                                                                    (b, a, qn, kh, h)])
    mask = _anchor_mask("anchor", rng, b, a, s)
    out = anchor_block_attention(qa, k, v, kb, vb, mask, ctx_tile=8, anchors_per_program=2, backend="tpu",
                                 interpret=params, poison=True)
    _close(out, reference_anchor_block_attention(qa, k, v, kb, vb, mask), jnp.float32)
    seg = jnp.asarray([[1] * 12 + [2] * 9, [1] * 21], jnp.int32)  # prefill: two documents, one
    qp = _normal(rng, (b, s, n, h), jnp.float32)
    out = prefill_attention(qp, k, v, seg, sinks, window=6, q_tile=8, kv_tile=8, interpret=params)
    _close(out, reference_prefill_attention(qp, k, v, seg, sinks, window=6), jnp.float32)


def test_prefill_query_tile_keeps_a_group_within_scoped_vmem():
    """256-row tiles for narrow groups, fewer rows for 8 heads per kv head (Qwen3-30B-A3B: 128) and
    fewer again for heads wider than 256 (Gemma 4's full layers, 512: 64, i.e. 512 rows per step)."""
    assert [default_q_tile(g) for g in (1, 4, 8, 6)] == [256, 256, 128, 168]
    assert [default_q_tile(g, h) for g, h in ((2, 256), (6, 256), (8, 512), (2, 512))] == [256, 168, 64, 256]


def test_verify_attention_rejects_long_blocks_and_bad_options():
    q = jnp.zeros((1, 129, 2, 16))
    kv = jnp.zeros((1, 200, 2, 16))
    lengths = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="prefill"):
        verify_attention(q, kv, kv, lengths, causal_mask(129), interpret=True)
    with pytest.raises(ValueError, match=r"sinks must be \[N\]=\[2\]"):
        verify_attention(q[:, :4], kv, kv, lengths, causal_mask(4), jnp.zeros((3,)), interpret=True)
    with pytest.raises(ValueError, match="window must be >= 0"):
        verify_attention(q[:, :4], kv, kv, lengths, causal_mask(4), window=-1, interpret=True)


# ------------------------------------------------------------------------- anchor-block attention
# (backend, q dtype, ctx dtype, N, K, A, Q, S, tile, anchors per program, mask kind)
ANCHOR_CASES = [
    ("tpu", jnp.float32, jnp.float32, 4, 4, 5, 3, 37, 8, 2, "anchor"),
    ("tpu", jnp.float32, jnp.float32, 8, 2, 3, 4, 50, 16, None, "random"),
    ("tpu", jnp.bfloat16, jnp.float32, 8, 1, 4, 5, 29, 8, 3, "anchor"),
    ("gpu", jnp.float32, jnp.float32, 8, 2, 5, 3, 37, 16, 2, "anchor"),
    ("gpu", jnp.bfloat16, jnp.bfloat16, 4, 4, 3, 4, 40, 16, None, "random"),
]


def _anchor_mask(kind, rng, b, a, s):
    if kind == "random":
        return jnp.asarray(rng.random((b, a, s)) < 0.3).at[0, 0].set(False)  # one block sees no context
    anchors = rng.integers(0, s + 1, size=(b, a))
    anchors[0, 0], anchors[-1, -1] = 0, s  # empty context and the whole context
    return jnp.asarray(np.arange(s)[None, None] < anchors[..., None])


@pytest.mark.parametrize("backend,dtype,ctx_dtype,n,kh,a,qn,s,tile,per_program,kind", ANCHOR_CASES)
def test_anchor_block_attention_matches_reference(backend, dtype, ctx_dtype, n, kh, a, qn, s, tile,
                                                  per_program, kind):
    rng = np.random.default_rng(a * 100 + s)
    b, h = 2, 16
    q = _normal(rng, (b, a, qn, n, h), dtype)
    kc, vc = _normal(rng, (b, s, kh, h), ctx_dtype), _normal(rng, (b, s, kh, h), ctx_dtype)
    kb, vb = _normal(rng, (b, a, qn, kh, h), dtype), _normal(rng, (b, a, qn, kh, h), dtype)
    mask = _anchor_mask(kind, rng, b, a, s)
    out = anchor_block_attention(q, kc, vc, kb, vb, mask, ctx_tile=tile, anchors_per_program=per_program,
                                 backend=backend, interpret=True, poison=True)
    assert out.shape == (b, a, qn, n, h) and out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), "an output element was never written"
    _close(out, reference_anchor_block_attention(q, kc, vc, kb, vb, mask), dtype)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_anchor_block_attention_skips_dead_context_tiles(backend):
    """Context tiles no anchor of a group sees are never read (NaN there changes nothing)."""
    rng = np.random.default_rng(11)
    b, a, qn, n, kh, h, s, tile = 2, 4, 3, 4, 2, 16, 64, 16
    q = _normal(rng, (b, a, qn, n, h), jnp.float32)
    kc, vc = _normal(rng, (b, s, kh, h), jnp.float32), _normal(rng, (b, s, kh, h), jnp.float32)
    kb, vb = _normal(rng, (b, a, qn, kh, h), jnp.float32), _normal(rng, (b, a, qn, kh, h), jnp.float32)
    anchors = np.array([[3, 9, 20, 30], [0, 5, 14, 2]])  # no anchor sees past tile 1 (slot 31)
    mask = jnp.asarray(np.arange(s)[None, None] < anchors[..., None])
    ref = reference_anchor_block_attention(q, kc, vc, kb, vb, mask)
    dead = (jnp.arange(s) >= 32)[None, :, None, None]
    out = anchor_block_attention(q, jnp.where(dead, jnp.nan, kc), jnp.where(dead, jnp.nan, vc), kb, vb, mask,
                                 ctx_tile=tile, anchors_per_program=2, backend=backend, interpret=True,
                                 poison=True)
    _close(out, ref, jnp.float32)


def test_kernels_differentiate_as_their_references():
    """Under differentiation the ops are the reference (custom VJP): training is unchanged."""
    rng = np.random.default_rng(5)
    b, a, qn, n, kh, h, s = 1, 2, 3, 4, 2, 8, 10
    args = [_normal(rng, shape, jnp.float32) for shape in
            [(b, a, qn, n, h), (b, s, kh, h), (b, s, kh, h), (b, a, qn, kh, h), (b, a, qn, kh, h)]]
    mask = jnp.asarray(rng.random((b, a, s)) < 0.5)

    def loss(fn):
        return lambda *x: jnp.sum(jnp.sin(fn(*x, mask)))

    every = (0, 1, 2, 3, 4)
    kernel = lambda *x: anchor_block_attention(*x, interpret=True)  # noqa: E731
    grads = jax.jit(jax.grad(loss(kernel), argnums=every))(*args)
    ref = jax.jit(jax.grad(loss(reference_anchor_block_attention), argnums=every))(*args)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6)
    q, k, v = args[0][:, 0], args[1], args[2]  # a verify block of T = 3 queries over 10 slots
    lengths, bm = jnp.asarray([4], jnp.int32), causal_mask(qn)
    vfn = lambda fn: jax.jit(jax.grad(lambda q: jnp.sum(fn(q, k, v, lengths, bm) ** 2)))(q)  # noqa: E731
    np.testing.assert_allclose(vfn(lambda *x: verify_attention(*x, interpret=True)),
                               vfn(reference_verify_attention), atol=1e-6)
    # With a window and sinks: the gradients of the queries and of the sinks.
    sinks = _sinks(rng, n) / 10
    sfn = lambda fn: jax.jit(jax.grad(  # noqa: E731
        lambda q, s: jnp.sum(fn(q, k, v, lengths, bm, s, window=3) ** 2), argnums=(0, 1)))(q, sinks)
    for g, r in zip(sfn(lambda *x, **o: verify_attention(*x, **o, interpret=True)),
                    sfn(reference_verify_attention), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6)


# ---------------------------------------------------------------------------- dispatch and models
CFG = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())


@pytest.fixture(scope="module")
def target():
    """One tiny random target for the model tests (attention_impl auto; tests run copies under others)."""
    return build(CFG, seed=2)


def test_dispatch_defaults_and_the_constructor_field(target):
    assert dispatch.resolve_impl("reference") == "reference"
    assert dispatch.resolve_impl("pallas") == "pallas"
    if ON_CPU:
        assert dispatch.resolve_impl("auto") == "reference"  # CPU defaults are unchanged
    with pytest.raises(ConfigError, match="attention_impl"):
        dispatch.resolve_impl("flash")
    with pytest.raises(ConfigError, match="unknown attention_impl 'flash'"):
        build(CFG, attention_impl="flash")
    assert target.attention_impl == "auto"
    pallas = build(CFG, seed=2, attention_impl="pallas")
    assert pallas.attention_impl == "pallas"
    assert nnx.graphdef(pallas) != nnx.graphdef(target)  # static: a jitted step never mixes impls
    dcfg = DFlashConfig.for_target(CFG, mask_token_id=60, num_layers=1, block_size=4)
    assert build_drafter(dcfg, attention_impl="reference").attention_impl == "reference"
    q = jnp.zeros((1, 129, 4, 8))
    assert not dispatch.use_verify_kernel("pallas", q, jnp.zeros((1, 200, 2, 8)))  # prefill: reference
    assert dispatch.use_verify_kernel("pallas", q[:, :16], jnp.zeros((1, 200, 2, 8)))


def _with_impl(model, impl: str):
    """The same parameters under another ``attention_impl`` (a fresh module: the field is static)."""
    graphdef, state = nnx.split(model)
    twin = nnx.merge(graphdef, state)
    twin.attention_impl = dispatch.check_impl(impl)  # what the constructor sets
    return twin


def _both(model, fn):
    """``fn(module)`` under the reference and under the Pallas kernels. ``fn`` must take the module
    as an argument of its jitted functions: a module captured in a closure would hit jit's cache
    (a closure is not part of the cache key) and silently run the first implementation twice."""
    out = [fn(_with_impl(model, impl)) for impl in ("reference", "pallas")]
    assert model.attention_impl == "auto"  # the original is untouched
    return out[0], out[1]


def _gpt_oss_like() -> nnx.Module:
    """A tiny target whose layers alternate a sliding window of 3 with full attention, both with
    random attention sinks (gpt-oss's layout)."""
    from dataclasses import replace

    layers = (LayerSpec(mixer_options={"window": 3, "sinks": True}), LayerSpec(mixer_options={"sinks": True}))
    model = build(replace(CFG, layers=layers), seed=2)
    rng = np.random.default_rng(9)
    for layer in model.layers:
        layer.self_attn.sinks[...] = jnp.asarray(rng.standard_normal(CFG.num_heads) * 2, jnp.float32)
    return model


@pytest.mark.parametrize("layers", ["plain", "window+sinks"])
def test_target_logits_equal_with_pallas_and_reference(target, layers):
    """Prefill, a causal verify block and a tree block, all at ragged lengths, and no cache
    (a window of 3 is shorter than the prompts and than the blocks)."""
    model = target if layers == "plain" else _gpt_oss_like()
    rng = np.random.default_rng(0)
    b, p, t = 2, 9, 4
    tokens = jnp.asarray(rng.integers(0, 60, (b, p)), jnp.int32)
    block = jnp.asarray(rng.integers(0, 60, (b, t)), jnp.int32)
    prompt_lens = jnp.asarray([9, 4], jnp.int32)
    tree = ancestor_mask(jnp.asarray([[0, 0, 0, 1], [0, 0, 1, 2]], jnp.int32))
    depth = jnp.sum(tree, -1).astype(jnp.int32) - 1

    @jax.jit
    def run(m):
        cache = init_cache(CFG, b, 24)
        pos = jnp.broadcast_to(jnp.arange(p), (b, p))
        pre = m(tokens, pos, cache)
        cache = pre.cache.at_lengths(prompt_lens)
        bpos = prompt_lens[:, None] + jnp.arange(t)[None]
        chain = m(block, bpos, cache)
        treed = m(block, prompt_lens[:, None] + depth, cache, block_mask=tree)  # a node sits at its depth
        plain = m(tokens, pos)
        return pre.logits, chain.logits, treed.logits, plain.logits

    ref, pallas = _both(model, run)
    assert run._cache_size() == 2  # one trace per implementation: both really ran
    for r, o in zip(ref, pallas, strict=True):
        np.testing.assert_allclose(o, r, atol=2e-5, rtol=2e-5)


def test_drafter_logits_equal_with_pallas_and_reference(target):
    """The DFlash drafter's training pass (many anchor blocks) and its drafting pass."""
    dcfg = DFlashConfig.for_target(CFG, mask_token_id=60, num_layers=1, block_size=4, target_layer_ids=(0, 1))
    drafter = build_drafter(dcfg, seed=4)
    rng = np.random.default_rng(1)
    b, a, k, s, d = 2, 3, 4, 11, CFG.hidden_size
    x = _normal(rng, (b, a, k, d), jnp.float32)
    anchors = jnp.asarray([[0, 5, 11], [3, 7, 2]], jnp.int32)
    q_pos = anchors[..., None] + jnp.arange(k)
    ctx = _normal(rng, (b, s, d), jnp.float32)
    ctx_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    ctx_mask = jnp.arange(s)[None, None] < anchors[..., None]
    cache = drafter.init_context_cache(b, 16)
    feats = _normal(rng, (b, 6, 2 * d), jnp.float32)
    cache = jax.jit(lambda m, *args: m.extend_context(*args))(
        drafter, cache, feats, jnp.broadcast_to(jnp.arange(6), (b, 6)), jnp.asarray([6, 2]))

    def forward(m):
        train = jax.jit(lambda m, *args: m(*args))(m, x, q_pos, ctx, ctx_pos, ctx_mask)
        draft = jax.jit(lambda m, t, c, anchor: m.draft_logits(t, c, anchor))(
            m, target, cache, jnp.asarray([5, 9], jnp.int32))
        return train, draft

    ref, pallas = _both(drafter, forward)
    for r, o in zip(ref, pallas, strict=True):
        np.testing.assert_allclose(o, r, atol=2e-5, rtol=2e-5)


# -------------------------------------------------------------------------------------- benchmark
def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] and report["copy_bandwidth_gbs"] > 0
    ops = {row["op"] for row in report["results"]}
    assert {"verify_attention", "anchor_block_attention"} <= ops
    impls = {row["impl"] for row in report["results"]}
    assert {"pallas", "reference", "dot_product_attention"} <= impls
    assert all(row["time_ms"] > 0 for row in report["results"] if "error" not in row)


# -------------------------------------------------------------------- accelerator-only (compiled)
@pytest.mark.accelerator
@pytest.mark.skipif(ON_CPU, reason="needs a TPU or GPU: compiles the kernels for real")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_match_reference_on_accelerator(dtype):
    """Qwen3-8B head shapes, compiled (not interpreted) on the platform's kernel variant."""
    rng = np.random.default_rng(0)
    b, t, n, kh, h, s = 2, 16, 32, 8, 128, 1000
    q, k, v = _qkv(rng, b, t, s, n, kh, h, dtype)
    lengths = jnp.asarray([0, s - t], jnp.int32)
    bm = _block_mask("tree", rng, b, t)
    out = jax.jit(lambda *x: verify_attention(*x, poison=True))(q, k, v, lengths, bm)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # GPU float32 dots may run as TF32
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(reference_verify_attention(q, k, v, lengths, bm), np.float32),
                               atol=tol, rtol=tol)
    a, qn, sc = 8, 16, 700
    qa = _normal(rng, (b, a, qn, n, h), dtype)
    kc, vc = _normal(rng, (b, sc, kh, h), dtype), _normal(rng, (b, sc, kh, h), dtype)
    kb, vb = _normal(rng, (b, a, qn, kh, h), dtype), _normal(rng, (b, a, qn, kh, h), dtype)
    mask = jnp.arange(sc)[None, None] < jnp.asarray(rng.integers(0, sc, (b, a)))[..., None]
    out = jax.jit(lambda *x: anchor_block_attention(*x, poison=True))(qa, kc, vc, kb, vb, mask)
    ref = reference_anchor_block_attention(qa, kc, vc, kb, vb, mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
