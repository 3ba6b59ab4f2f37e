"""``train.remat``: recomputing drafter layers in the backward changes no value or gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.config import ModelConfig
from dflash.drafters.dflash import DFlashConfig, build_drafter
from dflash.drafters.orthrus import OrthrusConfig, build_orthrus
from dflash.models import transformer as tr
from dflash.models.cache import KVState

CFG = ModelConfig(model_type="qwen3", vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8)
B, A, K, S = 2, 3, 4, 11


def grads(drafter, loss):
    def with_remat(flag):
        drafter.remat = flag
        return jax.jit(nnx.value_and_grad(loss))(drafter)

    (v0, g0), (v1, g1) = with_remat(False), with_remat(True)
    graphdef, state = nnx.split(drafter)
    jaxpr = str(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state))
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= drafter.cfg.num_layers  # really rematerialised
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, A, K, CFG.hidden_size)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, S, (B, A, 1)) + np.arange(K), jnp.int32)
    mask = jnp.asarray(rng.random((B, A, S)) < 0.6)
    return rng, x, pos, mask


def test_dflash_remat_same_gradients():
    dcfg = DFlashConfig.for_target(CFG, mask_token_id=3, num_layers=2, block_size=K, target_layer_ids=(0, 2))
    drafter = build_drafter(dcfg, seed=1)
    rng, x, pos, mask = inputs()
    ctx = jnp.asarray(rng.normal(size=(B, S, CFG.hidden_size)), jnp.float32)
    ctx_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    grads(drafter, lambda d: (d(x, pos, ctx, ctx_pos, mask) ** 2).mean())


def test_orthrus_remat_same_gradients():
    target = tr.build(CFG, seed=2)
    drafter = build_orthrus(OrthrusConfig.for_target(CFG, mask_token_id=3, block_size=K), seed=3)
    rng, x, pos, mask = inputs(1)
    kv = lambda: jnp.asarray(rng.normal(size=(B, S, 2, 8)), jnp.float32)  # noqa: E731
    prefix = tuple(KVState(k=kv(), v=kv()) for _ in range(CFG.num_layers))  # the AR K/V of every layer
    grads(drafter, lambda d: (d(target, x, pos, prefix, mask) ** 2).mean())
