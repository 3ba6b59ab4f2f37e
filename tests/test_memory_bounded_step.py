"""The train step's memory-bounded pipeline (prefill attention by segment ids, chunked anchor
attention, row-chunked loss head) gives the dense pipeline's loss, gradient and metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dflash.config import ModelConfig
from dflash.drafters import objective as obj
from dflash.drafters.blocks import anchor_blocks, document_mask
from dflash.drafters.dflash import DFLASH, DFlashConfig, build_drafter
from dflash.drafters.orthrus import ORTHRUS, OrthrusConfig, OrthrusDrafter
from dflash.models import build, init_cache

CFG = ModelConfig(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def packed_batch(seed: int = 0, rows: int = 2, length: int = 29) -> dict[str, jax.Array]:
    """Several documents per row, a padding tail (segment 0) and unsupervised prompt stretches."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(1, 4, (rows, length)), axis=1)
    seg[:, -3:] = 0
    pos = np.zeros_like(seg)
    for r in range(rows):
        for s in range(1, length):
            pos[r, s] = pos[r, s - 1] + 1 if seg[r, s] == seg[r, s - 1] else 0
    return {"tokens": jnp.asarray(rng.integers(0, 60, (rows, length)), jnp.int32),
            "loss_mask": jnp.asarray((rng.random((rows, length)) < 0.8) & (seg > 0)),
            "segment_ids": jnp.asarray(seg, jnp.int32), "positions": jnp.asarray(pos, jnp.int32)}


def dense_dflash(d, target, batch, key, *, num_anchors, loss_chunk, **loss_kw):
    """The pre-issue-18 DFlash forward: dense doc mask, all-row target logits, dense loss head."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    out = target(tokens, pos, block_mask=document_mask(seg), hidden_layers=d.cfg.target_layer_ids)
    feats = jnp.transpose(jax.lax.stop_gradient(out.hidden), (1, 2, 0, 3)).reshape(b, s, -1)
    blocks = anchor_blocks(target, batch, key, num_anchors, d.cfg.block_size, d.cfg.mask_token_id)
    ctx = d.project_context(feats)
    h = d(blocks.x, blocks.q_pos, ctx, pos, blocks.ctx_mask)
    return obj.score_blocks(target.unembed(h[:, :, 1:]), blocks.labels, blocks.label_mask, blocks.label_idx,
                            jax.lax.stop_gradient(out.logits), **loss_kw)


def dense_orthrus(d, target, batch, key, *, num_anchors, loss_chunk, **loss_kw):
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    out = target(tokens, pos, init_cache(target.cfg, b, s), block_mask=document_mask(seg))
    blocks = anchor_blocks(target, batch, key, num_anchors, d.cfg.block_size, d.cfg.mask_token_id)
    h = d(target, blocks.x, blocks.q_pos, out.cache.layers, blocks.ctx_mask)
    return obj.score_blocks(target.logits(h[:, :, : d.cfg.block_size - 1]), blocks.labels, blocks.label_mask,
                            blocks.label_idx, jax.lax.stop_gradient(out.logits), **loss_kw)


def set_attention_impl(model: nnx.Module, impl: str) -> None:
    """Every module's static ``attention_impl`` (the constructor's argument) set to ``impl``."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "attention_impl"):
            node.attention_impl = impl


def compare(drafter, target, new, dense, kw):
    batch, key = packed_batch(), jax.random.key(3)

    def run(fn, impl):
        set_attention_impl(target, impl)
        set_attention_impl(drafter, impl)
        return jax.jit(nnx.value_and_grad(lambda d: fn(d, target, batch, key, **kw), has_aux=True))(drafter)

    (got, g_metrics), g_grad = run(new, "auto")
    (want, w_metrics), w_grad = run(dense, "reference")
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for name in ("ce", "tau_sim", "tau_sim_labels", "tau_sim_steps", "accuracy", "weight_sum"):
        np.testing.assert_allclose(np.asarray(g_metrics[name]), np.asarray(w_metrics[name]), rtol=1e-5,
                                   err_msg=name)
    for a, b in zip(jax.tree.leaves(g_grad), jax.tree.leaves(w_grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ce_w,kl_w,labels", [(1.0, 0.0, False), (1.0, 0.5, False), (1.0, 0.0, True)])
def test_dflash_step_equals_the_dense_pipeline(ce_w, kl_w, labels):
    target = build(CFG, seed=0)
    drafter = build_drafter(DFlashConfig.for_target(CFG, mask_token_id=66, num_layers=2, block_size=4,
                                                    target_layer_ids=(1, 2)), seed=1)
    kw = dict(num_anchors=18, gamma=2.0, ce_weight=ce_w, kl_weight=kl_w, target_labels=labels, loss_chunk=5)
    compare(drafter, target, DFLASH.loss, dense_dflash, kw)


def test_orthrus_step_equals_the_dense_pipeline():
    target = build(CFG, seed=2)
    dcfg = OrthrusConfig.for_target(CFG, mask_token_id=66, block_size=5)
    drafter = OrthrusDrafter.from_target(target, dcfg)
    kw = dict(num_anchors=17, gamma=2.0, ce_weight=0.3, kl_weight=1.0, target_labels=False, loss_chunk=7)
    compare(drafter, target, ORTHRUS.loss, dense_orthrus, kw)
