"""The DFlash training objective against loop-built references and hand-checked examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.attention import attend
from dflash.config import ModelConfig
from dflash.drafters import objective as obj
from dflash.drafters.dflash import DFlashConfig, build_drafter, default_target_layer_ids
from dflash.drafters.objective import default_gamma
from dflash.models import build
from dflash.models.transformer import rope_cos_sin


def _random_batch(rng, b=2, s=24, docs=2):
    seg = np.zeros((b, s), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(3, s - 3), size=docs - 1, replace=False))
        bounds = [0, *cuts.tolist(), s - int(rng.integers(0, 3))]
        for d in range(docs):
            seg[i, bounds[d]:bounds[d + 1]] = d + 1
    loss_mask = (rng.random((b, s)) < 0.8) & (seg > 0)
    return jnp.asarray(seg), jnp.asarray(loss_mask)


def test_anchor_mask_equals_loop_reference():
    rng = np.random.default_rng(0)
    seg, loss_mask = _random_batch(rng)
    anchors, valid = obj.sample_anchors(jax.random.key(1), loss_mask, seg, num_anchors=7)
    k = 4
    got = np.asarray(obj.anchor_block_mask(anchors, valid, seg, k))
    anchors, valid, seg_np = np.asarray(anchors), np.asarray(valid), np.asarray(seg)
    b, a = anchors.shape
    s = seg_np.shape[1]
    want = np.zeros((b, a * k, s + a * k), bool)
    for i in range(b):
        for j in range(a):
            for r in range(k):
                q = j * k + r
                a_ij = anchors[i, j]
                for c in range(s):  # context strictly before the anchor, same document
                    want[i, q, c] = valid[i, j] and c < a_ij and seg_np[i, c] == seg_np[i, a_ij]
                for j2 in range(a):  # its own block only, bidirectionally
                    for r2 in range(k):
                        want[i, q, s + j2 * k + r2] = j2 == j
    np.testing.assert_array_equal(got, want)
    # A block never sees its own anchor position or anything after it in the context.
    for i in range(b):
        for j in range(a):
            assert not got[i, j * k:(j + 1) * k, anchors[i, j]:s].any()


def test_anchors_are_supervised_distinct_and_capped():
    rng = np.random.default_rng(2)
    seg, loss_mask = _random_batch(rng, b=3, s=30, docs=3)
    cand = np.asarray(obj.anchor_candidates(loss_mask, seg))
    anchors, valid = obj.sample_anchors(jax.random.key(3), loss_mask, seg, num_anchors=64)
    anchors, valid = np.asarray(anchors), np.asarray(valid)
    for i in range(3):
        chosen = anchors[i][valid[i]]
        assert len(chosen) == cand[i].sum()  # capped by the available positions
        assert len(set(chosen.tolist())) == len(chosen)
        assert cand[i][chosen].all()
        lm, sg = np.asarray(loss_mask[i]), np.asarray(seg[i])
        assert all(lm[a] and lm[a + 1] and sg[a] == sg[a + 1] for a in chosen)


def test_labels_and_weights_hand_checked():
    # One row, one document of 10 tokens; token at position t is 100 + t.
    tokens = jnp.arange(100, 110)[None]
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1]], bool)
    seg = jnp.ones((1, 10), jnp.int32)
    anchors, valid = jnp.asarray([[2, 7]]), jnp.asarray([[True, True]])
    labels, mask, idx = obj.block_labels(tokens, loss_mask, seg, anchors, valid, block_size=4)
    # Block at anchor 2 predicts positions 3, 4, 5 (same position, not shifted).
    assert np.asarray(labels[0, 0]).tolist() == [103, 104, 105]
    assert np.asarray(mask[0, 0]).tolist() == [True, True, True]
    # Block at anchor 7 predicts 8, 9, then runs off the sequence end.
    assert np.asarray(labels[0, 1, :2]).tolist() == [108, 109]
    assert np.asarray(mask[0, 1]).tolist() == [True, True, False]
    w = np.asarray(obj.loss_weights(16, 7.0))
    assert w.shape == (15,) and w[0] == 1.0
    np.testing.assert_allclose(w[1], np.exp(-1 / 7), rtol=1e-6)
    np.testing.assert_allclose(w[14], np.exp(-14 / 7), rtol=1e-6)
    assert default_gamma(16) == 7 and default_gamma(10) == 5 and default_gamma(8) == 4


def test_decayed_loss_normalises_by_used_weights():
    v = 5
    logits = jnp.zeros((1, 1, 3, v))  # uniform: every CE term is log(5)
    labels = jnp.zeros((1, 1, 3), jnp.int32)
    w = obj.loss_weights(4, 2.0)
    loss, _ = obj.decayed_loss(logits, labels, jnp.asarray([[[True, False, True]]]), w)
    np.testing.assert_allclose(float(loss), np.log(v), rtol=1e-6)
    # Hand-computed: per-position CE 1, 2, 3 with weights 1, e^-1/2, e^-1.
    ce = jnp.asarray([1.0, 2.0, 3.0])
    logits2 = jnp.zeros((1, 1, 3, 2)).at[0, 0, :, 1].set(jnp.log(jnp.exp(ce) - 1.0))  # CE of label 0 = ce
    loss2, _ = obj.decayed_loss(logits2, labels, jnp.ones((1, 1, 3), bool), w)
    want = (1 * 1 + 2 * np.exp(-0.5) + 3 * np.exp(-1)) / (1 + np.exp(-0.5) + np.exp(-1))
    np.testing.assert_allclose(float(loss2), want, rtol=1e-5)


@pytest.mark.parametrize("ce_weight,kl_weight", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0)])
def test_fused_loss_value_and_gradient_equal_the_plain_autodiff_form(ce_weight, kl_weight):
    rng = np.random.default_rng(3)
    b, a, k, v = 2, 3, 5, 37  # awkward sizes; some labels masked, one block fully masked
    logits = jnp.asarray(rng.normal(size=(b, a, k, v)) * 4, jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(b, a, k, v)) * 4, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, a, k)), jnp.int32)
    mask = jnp.asarray(rng.random((b, a, k)) < 0.7).at[1, 2].set(False)
    w = obj.loss_weights(k + 1, 2.5)

    def fused(lg, tl):
        return obj.decayed_loss(lg, labels, mask, w, tl, ce_weight, kl_weight)[0]

    def plain(lg, tl):
        return obj.reference_decayed_loss(lg, labels, mask, w, tl, ce_weight, kl_weight)

    (f_val, (f_grad, f_tgrad)) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(logits, t_logits)
    (p_val, (p_grad, _)) = jax.value_and_grad(plain, argnums=(0, 1))(logits, t_logits)
    np.testing.assert_allclose(float(f_val), float(p_val), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f_grad), np.asarray(p_grad), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(f_grad[1, 2]).max()) == 0.0  # a fully masked block gets no gradient
    assert float(jnp.abs(f_tgrad).max()) == 0.0  # the teacher is frozen
    _, metrics = obj.decayed_loss(logits, labels, mask, w, t_logits, ce_weight, kl_weight)
    assert ("kl" in metrics) == (kl_weight > 0)


def test_simulated_tau_counts_the_leading_run():
    pred = jnp.asarray([[[1, 2, 3, 4], [1, 9, 3, 4]]])
    ref = jnp.asarray([[[1, 2, 3, 0], [1, 2, 3, 4]]])
    mask = jnp.ones((1, 2, 4), bool)
    per_pos, tau = obj.block_accuracy(pred, ref, mask)
    assert float(tau) == 1 + (3 + 1) / 2
    np.testing.assert_allclose(np.asarray(per_pos), [1.0, 0.5, 1.0, 0.5])
    # Per verify step: blocks of tau 4 and 2 -> the harmonic mean 8/3.
    np.testing.assert_allclose(float(obj.step_weighted_tau(pred, ref, mask)), 2 / (1 / 4 + 1 / 2), rtol=1e-6)
    # A block whose first label is masked is not counted.
    mask2 = mask.at[0, 1, 0].set(False)
    np.testing.assert_allclose(float(obj.step_weighted_tau(pred, ref, mask2)), 4.0, rtol=1e-6)


def _window_mask(dense, anchors, window: int, s: int, k: int) -> np.ndarray:
    """``dense`` narrowed to a sliding layer's view, by loops (docs/design.md §5): row (j, r) at
    position a_j + r sees context c with a_j + r - c < window, and its block's rows r2 <= r
    with r - r2 < window."""
    want = np.array(dense)
    for i, j, r in np.ndindex(*anchors.shape, k):
        q, p = j * k + r, int(anchors[i, j]) + r
        for c in range(s):
            want[i, q, c] &= p - c < window
        for r2 in range(k):
            want[i, q, s + j * k + r2] &= r2 <= r and r - r2 < window
    return want


@pytest.mark.parametrize("window, remat", [(0, False), (3, False), (3, True)])
def test_blockwise_drafter_attention_equals_dense_anchor_mask(window, remat):
    """The drafter's blockwise pass == dense attention under ``anchor_block_mask``; a sliding layer
    (window 3: narrower than the context and the block) under that mask cut to its window, in the
    plain and the rematerialised (anchor-chunked, padded) training forms."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    dcfg = DFlashConfig.for_target(cfg, mask_token_id=49, num_layers=1, block_size=4, target_layer_ids=(1,),
                                   layer_types=("sliding_attention",) if window else (),
                                   sliding_window=window)
    drafter = build_drafter(dcfg, seed=5)
    drafter.remat, drafter.anchor_chunk = remat, 2
    rng = np.random.default_rng(6)
    seg, loss_mask = _random_batch(rng, b=2, s=20)
    anchors, valid = obj.sample_anchors(jax.random.key(7), loss_mask, seg, 5)
    b, a, k, d = 2, 5, 4, 32
    x = jnp.asarray(rng.normal(size=(b, a, k, d)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(b, 20, d)), jnp.float32)
    ctx_pos = jnp.broadcast_to(jnp.arange(20), (b, 20))
    q_pos = anchors[..., None] + jnp.arange(k)
    got = drafter(x, q_pos, ctx, ctx_pos, obj.anchor_context_mask(anchors, valid, seg))
    # Dense reference: one attention over [context ; all blocks] with the dense mask.
    layer = drafter.layers[0]
    lc = drafter.layer_cfg
    cos_q, sin_q = rope_cos_sin(lc, q_pos.reshape(b, a * k))
    cos_c, sin_c = rope_cos_sin(lc, ctx_pos)
    h = layer.input_layernorm(x.reshape(b, a * k, d))
    q = layer.self_attn.q(h, cos_q, sin_q)
    kb, vb = layer.self_attn.kv(h, cos_q, sin_q)
    kc, vc = layer.self_attn.kv(ctx, cos_c, sin_c)
    dense = obj.anchor_block_mask(anchors, valid, seg, k)
    if window:
        full = np.asarray(dense)
        dense = jnp.asarray(_window_mask(full, np.asarray(anchors), window, 20, k))
        assert (full & ~np.asarray(dense)).any()  # the window hides something here

    def reference(mask):
        out = attend(q, jnp.concatenate([kc, kb], 1), jnp.concatenate([vc, vb], 1), mask)
        y = x.reshape(b, a * k, d) + layer.self_attn.o_proj(out)
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        return np.asarray(drafter.norm(y).reshape(b, a, k, d))

    np.testing.assert_allclose(np.asarray(got), reference(dense), atol=1e-5)
    if window:  # and the window changed the result
        assert np.abs(np.asarray(got) - reference(obj.anchor_block_mask(anchors, valid, seg, k))).max() > 1e-3


def test_default_target_layer_ids():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)  # published Qwen3-8B choice
    assert default_target_layer_ids(8, 1) == (4,)
    assert default_target_layer_ids(8, 3) == (1, 3, 5)


@pytest.mark.parametrize("kw,match", [
    ({"block_size": 1}, "block_size"),
    ({"target_layer_ids": (0, 8)}, "out of range"),
    ({"mask_token_id": 50}, "outside the vocabulary"),
])
def test_drafter_config_errors(kw, match):
    cfg = ModelConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=8,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    from dflash.config import ConfigError

    base = {"mask_token_id": 49, "block_size": 4, "target_layer_ids": (1, 2)}
    with pytest.raises(ConfigError, match=match):
        DFlashConfig.for_target(cfg, **{**base, **kw})
    build(cfg)  # the target itself is fine


def test_loss_head_benchmark_times_both_forms():
    from dflash.bench import loss_head_costs

    out = loss_head_costs(batch=1, anchors=3, block_size=4, hidden=8, vocab=19, repeats=1, iters=1)
    for loss in ("ce", "ce_kl"):
        assert out[f"fused_{loss}_s"] > 0 and out[f"reference_{loss}_s"] > 0
        assert out[f"speedup_{loss}"] == out[f"reference_{loss}_s"] / out[f"fused_{loss}_s"]
    assert out["shape"] == [1, 3, 3, 19]


def test_chunked_metrics_combine_to_the_whole_batch():
    """Evaluation runs held-out rows in chunks: combining the chunks' score_blocks metrics must
    give the metrics of all rows at once (loss, both taus, per-position accuracy)."""
    rng = np.random.default_rng(7)
    b, a, k, v, s = 5, 6, 4, 11, 20
    labels = jnp.asarray(rng.integers(0, v, (b, a, k - 1)))
    logits = jnp.asarray(rng.normal(size=(b, a, k - 1, v)), jnp.float32)
    # Make some predictions right, so that runs of accepted drafts have several lengths.
    logits = logits + 4.0 * jax.nn.one_hot(labels, v) * jnp.asarray(rng.random((b, a, k - 1, 1)) < 0.6)
    mask = jnp.asarray(rng.random((b, a, k - 1)) < 0.85)
    mask = mask.at[3].set(False)  # a row without a single counted block
    idx = jnp.asarray(rng.integers(1, s, (b, a, k - 1)))
    t_logits = jnp.asarray(rng.normal(size=(b, s, v)), jnp.float32)
    kw = dict(gamma=2.0, ce_weight=1.0, kl_weight=0.5)
    whole = obj.score_blocks(logits, labels, mask, idx, t_logits, **kw)[1]
    parts = [obj.score_blocks(logits[i:j], labels[i:j], mask[i:j], idx[i:j], t_logits[i:j], **kw)[1]
             for i, j in ((0, 2), (2, 3), (3, 4), (4, 5))]  # (3, 4): nothing counted
    got = obj.combine_chunk_metrics(parts)
    for name in ("loss", "tau_sim", "tau_sim_steps", "tau_sim_labels"):
        np.testing.assert_allclose(got[name], float(whole[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["accuracy"], np.asarray(whole["accuracy"]), rtol=1e-5)
    # The acceptance histogram: counts of blocks by simulated length, whose mean is tau_sim.
    counts = np.asarray(got["acceptance_counts"])
    assert counts.tolist() == np.asarray(whole["acceptance_counts"]).tolist()
    assert counts.sum() == int(mask[..., 0].sum()) and counts[1:].sum() > 0
    np.testing.assert_allclose((counts * np.arange(1, k + 1)).sum() / counts.sum(), got["tau_sim"], rtol=1e-5)
    assert 1.0 < got["tau_sim"] < k  # the example is not degenerate
