"""Memory-bounded attention: prefill (chunked jnp, Pallas kernel) and the drafter's chunked anchor
attention equal their dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices

from dflash.attention import attend
from dflash.config import ModelConfig
from dflash.kernels import dispatch
from dflash.kernels import prefill_attention as pa
from dflash.models import init_cache
from dflash.models import transformer as tr


def make_qkv(seed=0, b=2, s=37, n=4, kh=2, h=16, dtype=jnp.float32, docs=4):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    seg = np.sort(rng.integers(0, docs, (b, s)), axis=1)  # packed documents; 0 = padding runs too
    return f(b, s, n, h), f(b, s, kh, h), f(b, s, kh, h), jnp.asarray(seg, jnp.int32)


def dense(q, k, v, seg, sinks=None, window=0):
    """The model's attention exactly as the trainer builds it: tril & same segment (& inside the
    sliding window: ``t - s < window``), then ``attend`` (with the sinks)."""
    b, s = seg.shape
    mask = jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    if window:
        mask &= (jnp.arange(s)[:, None] - jnp.arange(s)[None, :] < window)[None]
    return attend(q, k, v, mask, sinks).reshape(q.shape)


def make_sinks(n=4, seed=0):
    """Random sink logits ``[N]``: one large (takes nearly all the mass), one very negative."""
    sinks = np.random.default_rng(seed).normal(size=n) * 3
    sinks[0], sinks[-1] = 20.0, -40.0
    return jnp.asarray(sinks, jnp.float32)


# (chunk, window, sinks): windows shorter than a chunk, than a document, longer than the row
@pytest.mark.parametrize("chunk,window,sinks", [(1, 0, False), (8, 5, True), (37, 0, True), (100, 50, False)])
def test_chunked_equals_dense(chunk, window, sinks):
    q, k, v, seg = make_qkv()
    sinks_N = make_sinks() if sinks else None
    want = np.asarray(dense(q, k, v, seg, sinks_N, window))
    got = pa.chunked_prefill_attention(q, k, v, seg, sinks_N, window=window, chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    ref = pa.reference_prefill_attention(q, k, v, seg, sinks_N, window=window)
    np.testing.assert_array_equal(np.asarray(ref), want)


@pytest.mark.parametrize("shape,tiles,window,sinks", [
    (dict(b=2, s=37, n=4, kh=2, h=16), (8, 16), 0, False),  # S not a multiple of either tile
    (dict(b=1, s=64, n=6, kh=2, h=8), (16, 8), 11, True),   # kv tile < query tile; G = 3; kv tiles skipped
    (dict(b=3, s=20, n=2, kh=2, h=16), (32, 32), 0, True),  # one tile bigger than S; G = 1
    (dict(b=2, s=37, n=4, kh=2, h=16), (8, 8), 3, False),   # a window shorter than a tile
])
def test_kernel_equals_dense_in_interpret_mode(shape, tiles, window, sinks):
    q, k, v, seg = make_qkv(**shape)
    sinks_N = make_sinks(shape["n"]) if sinks else None
    got = pa.prefill_attention(q, k, v, seg, sinks_N, window=window, q_tile=tiles[0], kv_tile=tiles[1],
                               interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense(q, k, v, seg, sinks_N, window)), rtol=1e-5,
                               atol=1e-6)


def test_kernel_bf16_and_gradient_is_the_chunked_form():
    q, k, v, seg = make_qkv(seed=1, dtype=jnp.bfloat16)
    got = pa.prefill_attention(q, k, v, seg, q_tile=8, kv_tile=8, interpret=True)
    want = dense(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)
    q, k, v, seg = make_qkv(seed=2)
    loss = lambda fn: lambda q, k, v: (fn(q, k, v, seg) ** 2).sum()  # noqa: E731
    g_kernel = jax.grad(loss(lambda *a: pa.prefill_attention(*a, q_tile=8, kv_tile=8, interpret=True)),
                        argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_kernel, g_dense, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # With a window and sinks (their gradient too), through the chunked form at a chunk < S.
    sinks = make_sinks(seed=3) / 10
    loss = lambda fn: lambda q, k, v, s: (fn(q, k, v, seg, s, window=6) ** 2).sum()  # noqa: E731
    every = (0, 1, 2, 3)
    kernel = lambda *a, **o: pa.prefill_attention(*a, **o, q_tile=8, kv_tile=8, interpret=True)  # noqa: E731
    g_kernel = jax.jit(jax.grad(loss(kernel), argnums=every))(q, k, v, sinks)
    g_chunked = jax.jit(jax.grad(loss(lambda *a, **o: pa.chunked_prefill_attention(*a, **o, chunk=8)),
                                 argnums=every))(q, k, v, sinks)
    g_dense = jax.jit(jax.grad(loss(dense), argnums=every))(q, k, v, sinks)
    for a, c, b in zip(g_kernel, g_chunked, g_dense, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_refused():
    q, k, v, seg = make_qkv()
    with pytest.raises(ValueError, match="k/v must be"):
        pa.prefill_attention(q, k[:, :5], v[:, :5], seg)
    with pytest.raises(ValueError, match="segment_ids"):
        pa.prefill_attention(q, k, v, seg[:, :5])
    with pytest.raises(ValueError, match=r"sinks must be \[N\]=\[4\]"):
        pa.prefill_attention(q, k, v, seg, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="window must be >= 0"):
        pa.prefill_attention(q, k, v, seg, window=-3)


@pytest.mark.parametrize("impl", ["auto", "reference", "pallas"])
def test_model_segment_ids_equal_the_dense_doc_mask(impl):
    """``Transformer(segment_ids=...)`` == the dense doc mask the trainer used, without and with a cache."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    model = tr.build(cfg, seed=3, attention_impl=impl)
    _, _, _, seg = make_qkv(b=2, s=23, docs=3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 23)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(23), (2, 23))
    mask = jnp.tril(jnp.ones((23, 23), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    want = model(tokens, pos, block_mask=mask, final_hidden=True)
    got = model(tokens, pos, segment_ids=seg, final_hidden=True)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.final), np.asarray(want.final), rtol=1e-4, atol=1e-5)
    want_c = model(tokens, pos, init_cache(cfg, 2, 23), block_mask=mask)
    got_c = model(tokens, pos, init_cache(cfg, 2, 23), segment_ids=seg)
    for got_s, want_s in zip(got_c.cache.layers, want_c.cache.layers, strict=True):  # every layer's K/V
        np.testing.assert_allclose(np.asarray(got_s.k), np.asarray(want_s.k), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_c.logits), np.asarray(want_c.logits), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids replaces block_mask"):
        model(tokens, pos, block_mask=mask, segment_ids=seg)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])  # A = 7: dividing, non-dividing, one chunk, bigger
def test_chunked_anchor_attention_equals_the_reference_value_and_gradient(chunk):
    from dflash.kernels import anchor_attention as aa

    rng = np.random.default_rng(5)
    b, a, qn, n, kh, h, s = 2, 7, 4, 4, 2, 8, 19
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    args = (f(b, a, qn, n, h), f(b, s, kh, h), f(b, s, kh, h), f(b, a, qn, kh, h), f(b, a, qn, kh, h))
    mask = jnp.asarray(rng.random((b, a, s)) < 0.6).at[0, 3].set(False)  # one block sees no context

    def loss(fn):
        return lambda *x: (fn(*x, mask) ** 2).sum()

    want = jax.value_and_grad(loss(aa.reference_anchor_block_attention), argnums=range(5))(*args)
    got = jax.jit(jax.value_and_grad(loss(lambda *x: aa.chunked_anchor_block_attention(*x, chunk=chunk)),
                                     argnums=range(5)))(*args)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    kernel_grad = jax.grad(loss(lambda *x: aa.anchor_block_attention(*x, interpret=True)))(*args)
    np.testing.assert_allclose(np.asarray(kernel_grad), np.asarray(want[1][0]), rtol=1e-4, atol=1e-5)


def sharded_kernels_check() -> None:
    """8 simulated devices: under a mesh the kernels run per shard (shard_map) and equal the
    unsharded references, including meshes whose axes do not divide the heads or the batch
    (verify with a window, sinks split with the query heads and positions with the rows)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dflash.kernels.verify_attention import reference_verify_attention

    q, k, v, seg = make_qkv(b=4, s=24, n=4, kh=2, h=16)
    want_prefill = np.asarray(dense(q, k, v, seg))
    lengths = jnp.asarray([3, 0, 10, 7], jnp.int32)
    bm = jnp.tril(jnp.ones((6, 6), bool))
    qv, sinks = q[:, :6], make_sinks()
    pos = lengths[:, None] + jnp.arange(6)[None]
    want_verify = np.asarray(reference_verify_attention(qv, k, v, lengths, bm, sinks, pos, window=4))
    for shape in ((8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)):
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        put = lambda x, mesh=mesh: jax.device_put(x, NamedSharding(mesh, P()))  # noqa: E731
        with jax.set_mesh(mesh):
            got = jax.jit(lambda *a: dispatch.prefill_attention(*a, impl="pallas"))(*map(put, (q, k, v, seg)))
            np.testing.assert_allclose(np.asarray(got), want_prefill, rtol=1e-5, atol=1e-6)
            verify_args = map(put, (qv, k, v, lengths, bm, sinks, pos))
            got = jax.jit(lambda *a: dispatch.verify_attention(*a, window=4))(*verify_args)
            np.testing.assert_allclose(np.asarray(got), want_verify, rtol=1e-5, atol=1e-6)
        print("ok", shape)


@on_cpu_devices(8)
def test_kernels_run_per_shard_under_a_mesh():
    sharded_kernels_check()  # asserts every mesh equals the unsharded result
