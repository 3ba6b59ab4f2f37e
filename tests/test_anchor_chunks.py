"""The DFlash drafter's rematerialised anchor-chunk path (``train.remat``) equals the plain one.

Under ``remat`` every drafter layer runs over ``anchor_chunk`` anchors at a time in a
checkpointed ``lax.scan`` (memory of one chunk). Blocks never see each other, so the value
and the gradients (params, block inputs, context) must be the plain path's, including when
the anchor count is not a multiple of the chunk (padded anchors) and under a device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from devices import on_cpu_devices
from flax import nnx

from dflash.config import ModelConfig
from dflash.drafters.dflash import DFlashConfig, build_drafter
from dflash.kernels.anchor_attention import merge_anchor_chunks, split_anchor_chunks

CFG = ModelConfig(model_type="qwen3", vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8)
K, S = 4, 13  # block rows, context positions


def case(b: int, a: int, seed: int = 0):
    """Random drafter and inputs: ``a`` anchors per row, a random sparse context mask."""
    dcfg = DFlashConfig.for_target(CFG, mask_token_id=3, num_layers=2, block_size=K, target_layer_ids=(0, 2))
    drafter = build_drafter(dcfg, seed=seed + 1)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, a, K, CFG.hidden_size)), jnp.float32)  # [B, A, Q, D]
    pos = jnp.asarray(rng.integers(0, S, (b, a, 1)) + np.arange(K), jnp.int32)  # [B, A, Q]
    ctx = jnp.asarray(rng.normal(size=(b, S, CFG.hidden_size)), jnp.float32)  # [B, S, D]
    ctx_pos = jnp.broadcast_to(jnp.arange(S), (b, S))
    mask = jnp.asarray(rng.random((b, a, S)) < 0.6).at[0, 0].set(False)  # one block sees no context
    weight = jnp.asarray(rng.normal(size=(b, a, K, CFG.hidden_size)), jnp.float32)
    return drafter, (x, pos, ctx, ctx_pos, mask), weight


def value_and_grads(drafter, inputs, weight, *, remat: bool, chunk: int = 64):
    """Loss, param grads and input grads (block inputs, context) under one setting."""
    drafter.remat, drafter.anchor_chunk = remat, chunk
    x, pos, ctx, ctx_pos, mask = inputs

    def loss(d, x, ctx):
        return ((d(x, pos, ctx, ctx_pos, mask) - weight) ** 2).mean()  # no cancellation: rtol is fair

    fn = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))
    value, (g_params, g_x, g_ctx) = fn(drafter, x, ctx)
    return value, jax.tree.leaves(nnx.state(g_params)) + [g_x, g_ctx]


def assert_same(got, want) -> None:
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_split_merge_round_trip():
    x = jnp.arange(2 * 7 * 3).reshape(2, 7, 3)
    parts = split_anchor_chunks(x, 3)  # [3, 2, 3, 3]: 7 anchors padded to 9
    assert parts.shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(merge_anchor_chunks(parts, 7), x)


def test_chunked_equals_plain_on_awkward_anchor_counts():
    for a, chunk in ((5, 2), (7, 3), (5, 64), (6, 1)):  # padded, padded, one chunk, one anchor per step
        drafter, inputs, weight = case(b=2, a=a, seed=a)
        want = value_and_grads(drafter, inputs, weight, remat=False)
        got = value_and_grads(drafter, inputs, weight, remat=True, chunk=chunk)
        assert_same(got, want)


def test_chunked_path_is_a_rematerialised_scan():
    drafter, (x, pos, ctx, ctx_pos, mask), _ = case(b=1, a=5)
    drafter.remat, drafter.anchor_chunk = True, 2
    jaxpr = str(jax.make_jaxpr(lambda x: drafter(x, pos, ctx, ctx_pos, mask))(x))
    assert jaxpr.count("scan[") >= drafter.cfg.num_layers
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= drafter.cfg.num_layers


def sharded_check() -> None:
    """8-device subprocess: the chunked path under each mesh equals the unsharded plain path."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dflash.sharding import make_mesh

    drafter, inputs, weight = case(b=8, a=5, seed=3)
    want = value_and_grads(drafter, inputs, weight, remat=False)
    for shape in ((8, 1, 1), (2, 2, 2), (1, 2, 4)):
        mesh = make_mesh(shape)
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        placed = tuple(jax.device_put(t, batch) for t in inputs)
        with jax.set_mesh(mesh):
            got = value_and_grads(drafter, placed, jax.device_put(weight, batch), remat=True, chunk=2)
        assert_same(got, want)
        print("ok", shape)


@on_cpu_devices(8)
def test_chunked_equals_plain_on_8_devices():
    sharded_check()
