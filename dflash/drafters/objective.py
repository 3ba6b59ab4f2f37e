"""Drafter training objective: anchors, the sparse anchor-block mask, labels, decayed loss.

Shared by DFlash and Orthrus: both draft blocks at sampled anchors and produce ``Q-1`` logits
per block for the tokens at ``a+1 .. a+Q-1`` (DFlash from rows 1..Q-1, Orthrus from rows
0..Q-2 with the one-position shift); ``score_blocks`` turns those into loss and metrics.
Pure functions of arrays (no state), so the train step, eval and the tests share them.
Shape letters (docs/architecture.md): B batch rows, S sequence, A anchors per row, Q = block_size,
k = Q - 1 drafted rows, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}  # loss-decay gamma of the published recipe


def default_gamma(block_size: int) -> float:
    """Published gamma for B = 8/10/16; other sizes scale B = 16's value proportionally."""
    return GAMMA_BY_BLOCK.get(block_size, 7.0 * block_size / 16)


def anchor_candidates(loss_mask_BS: jax.Array, segment_ids_BS: jax.Array) -> jax.Array:
    """``[B, S]``: positions ``a`` with tokens ``a`` and ``a+1`` both supervised, same document."""
    nxt_mask = jnp.pad(loss_mask_BS[:, 1:], ((0, 0), (0, 1)))
    nxt_seg = jnp.pad(segment_ids_BS[:, 1:], ((0, 0), (0, 1)))
    return loss_mask_BS & nxt_mask & (segment_ids_BS == nxt_seg) & (segment_ids_BS > 0)


def sample_anchors(key: jax.Array, loss_mask_BS: jax.Array, segment_ids_BS: jax.Array,
                   num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """Up to ``num_anchors`` distinct random anchors per row (sorted); ``valid`` flags real ones.

    Rows with fewer candidates than ``num_anchors`` get invalid (masked) extra anchors; ``A``
    is ``min(num_anchors, S)``.
    """
    cand_BS = anchor_candidates(loss_mask_BS, segment_ids_BS)
    scores_BS = jnp.where(cand_BS, jax.random.uniform(key, cand_BS.shape), -1.0)
    top_BA, idx_BA = jax.lax.top_k(scores_BS, min(num_anchors, cand_BS.shape[1]))
    valid_BA = top_BA >= 0.0
    # Sort valid anchors ascending (invalid ones last) so blocks appear in sequence order.
    order = jnp.argsort(jnp.where(valid_BA, idx_BA, jnp.iinfo(jnp.int32).max), axis=1)
    return (jnp.take_along_axis(idx_BA, order, 1).astype(jnp.int32),
            jnp.take_along_axis(valid_BA, order, 1))


def anchor_context_mask(anchors_BA: jax.Array, valid_BA: jax.Array, segment_ids_BS: jax.Array) -> jax.Array:
    """``[B, A, S]``: block j sees context positions ``s < a_j`` of its own document only."""
    pos_S = jnp.arange(segment_ids_BS.shape[1])
    seg_at_anchor_BA = jnp.take_along_axis(segment_ids_BS, anchors_BA, axis=1)
    return ((pos_S[None, None, :] < anchors_BA[:, :, None])
            & (segment_ids_BS[:, None, :] == seg_at_anchor_BA[:, :, None])
            & valid_BA[:, :, None])


def anchor_block_mask(anchors_BA: jax.Array, valid_BA: jax.Array, segment_ids_BS: jax.Array,
                      block_size: int) -> jax.Array:
    """Dense ``[B, A*Q, S + A*Q]`` form of the sparse anchor mask (the reference semantics).

    Row (j, k) sees context ``s < a_j`` of its own document and all of block j; blocks never
    see each other; an invalid anchor's rows see only their own block. The drafter computes
    the same attention blockwise from ``anchor_context_mask`` without materialising this.
    """
    b, a = anchors_BA.shape
    ctx_BQS = jnp.repeat(anchor_context_mask(anchors_BA, valid_BA, segment_ids_BS), block_size, axis=1)
    block_id_Q = jnp.repeat(jnp.arange(a), block_size)
    blk_QQ = block_id_Q[:, None] == block_id_Q[None, :]
    return jnp.concatenate([ctx_BQS, jnp.broadcast_to(blk_QQ, (b, a * block_size, a * block_size))],
                           axis=2)


def block_labels(tokens_BS: jax.Array, loss_mask_BS: jax.Array, segment_ids_BS: jax.Array,
                 anchors_BA: jax.Array, valid_BA: jax.Array, block_size: int):
    """Labels ``[B, A, Q-1]``: the token at ``a + k`` (k = 1..Q-1), and where it counts.

    A label counts when it lies inside the sequence, in the anchor's document, is supervised
    by the loss mask, and its anchor is valid.
    """
    s = tokens_BS.shape[1]
    idx_BAk = anchors_BA[:, :, None] + jnp.arange(1, block_size)[None, None, :]
    inside = idx_BAk < s
    idx_c = jnp.minimum(idx_BAk, s - 1)
    flat = idx_c.reshape(idx_c.shape[0], -1)
    gather = lambda x: jnp.take_along_axis(x, flat, axis=1).reshape(idx_c.shape)  # noqa: E731
    seg_anchor = jnp.take_along_axis(segment_ids_BS, anchors_BA, axis=1)[:, :, None]
    mask = inside & gather(loss_mask_BS) & (gather(segment_ids_BS) == seg_anchor) & valid_BA[:, :, None]
    return gather(tokens_BS), mask, idx_c


def loss_weights(block_size: int, gamma: float) -> jax.Array:
    """``w_k = exp(-(k-1)/gamma)`` for k = 1..Q-1: early block positions matter most."""
    k = jnp.arange(1, block_size, dtype=jnp.float32)
    return jnp.exp(-(k - 1.0) / gamma)


@jax.custom_vjp
def ce_kl_rows(logits_NV: jax.Array, labels_N: jax.Array,
               target_logits_NV: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Per-row ``CE(labels)`` and forward ``KL(target || softmax(logits))`` (None without a target).

    Same values as ``log_softmax`` + ``take_along_axis``, but with a hand-written backward: the
    logits' gradient ``g_ce (softmax - onehot) + g_kl (softmax - p_target)`` is one fused pass
    over ``[N, V]``. Autodiff of the plain form scatters the CE gradient into a zero ``[N, V]``
    one-hot and walks the vocabulary several more times, which cost 55% (CE) to 65% (CE + KL)
    of the loss head's time on CPU. No gradient flows into ``target_logits`` (a frozen teacher).
    """
    return _ce_kl_rows_fwd(logits_NV, labels_N, target_logits_NV)[0]


def _ce_kl_rows_fwd(logits_NV, labels_N, target_logits_NV):
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    # The label's logit as a masked sum, not a gather: a vocabulary split over devices then
    # reduces like the logsumexp (an all-reduce) instead of being gathered whole.
    onehot_NV = labels_N[..., None] == jnp.arange(logits_NV.shape[-1])
    ce_N = lse_N - jnp.where(onehot_NV, logits_NV, 0.0).sum(-1)
    kl_N = None
    if target_logits_NV is not None:
        logp_t = jax.nn.log_softmax(target_logits_NV, axis=-1)
        # sum p_t (log p_t - log q) with log q = logits - lse and sum p_t = 1
        kl_N = (jnp.exp(logp_t) * (logp_t - logits_NV)).sum(-1) + lse_N
    return (ce_N, kl_N), (logits_NV, lse_N, labels_N, target_logits_NV)


def _ce_kl_rows_bwd(res, g):
    logits_NV, lse_N, labels_N, target_logits_NV = res
    g_ce_N, g_kl_N = g
    q_NV = jnp.exp(logits_NV - lse_N[..., None])
    onehot_NV = labels_N[..., None] == jnp.arange(logits_NV.shape[-1])
    d_NV = g_ce_N[..., None] * (q_NV - onehot_NV)
    d_target = None
    if target_logits_NV is not None:
        d_NV = d_NV + g_kl_N[..., None] * (q_NV - jax.nn.softmax(target_logits_NV, axis=-1))
        d_target = jnp.zeros_like(target_logits_NV)
    return d_NV, None, d_target


ce_kl_rows.defvjp(_ce_kl_rows_fwd, _ce_kl_rows_bwd)


def decayed_loss(logits_BAkV: jax.Array, labels_BAk: jax.Array, mask_BAk: jax.Array,
                 weights_k: jax.Array, target_logits_BAkV: jax.Array | None = None,
                 ce_weight: float = 1.0, kl_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """Weighted CE (+ optional forward KL to the target), normalised by the sum of used weights."""
    w_BAk = weights_k[None, None, :] * mask_BAk
    use_kl = target_logits_BAkV is not None and kl_weight > 0
    t_logits = jax.lax.stop_gradient(target_logits_BAkV.astype(jnp.float32)) if use_kl else None
    ce_BAk, kl_BAk = ce_kl_rows(logits_BAkV.astype(jnp.float32), labels_BAk, t_logits)
    return weighted_terms(ce_BAk, kl_BAk, w_BAk, ce_weight, kl_weight)


def weighted_terms(ce_BAk: jax.Array, kl_BAk: jax.Array | None, w_BAk: jax.Array, ce_weight: float,
                   kl_weight: float) -> tuple[jax.Array, dict]:
    """Loss and metrics from per-row CE / KL and their weights (``w_k`` times the label mask)."""
    denom = jnp.maximum(w_BAk.sum(), 1e-9)
    metrics = {"ce": (ce_BAk * w_BAk).sum() / denom, "weight_sum": denom}
    loss = ce_weight * metrics["ce"]
    if kl_BAk is not None:
        metrics["kl"] = (kl_BAk * w_BAk).sum() / denom
        loss = loss + kl_weight * metrics["kl"]
    return loss, metrics


def reference_decayed_loss(logits_BAkV: jax.Array, labels_BAk: jax.Array, mask_BAk: jax.Array,
                           weights_k: jax.Array, target_logits_BAkV: jax.Array | None = None,
                           ce_weight: float = 1.0, kl_weight: float = 0.0) -> jax.Array:
    """``decayed_loss``'s value written with autodiff-only ops: the reference its tests and
    ``dflash.bench.loss_head_costs`` compare the hand-written backward against."""
    logp = jax.nn.log_softmax(logits_BAkV.astype(jnp.float32), axis=-1)
    w_BAk = weights_k[None, None, :] * mask_BAk
    denom = jnp.maximum(w_BAk.sum(), 1e-9)
    ce_BAk = -jnp.take_along_axis(logp, labels_BAk[..., None], axis=-1)[..., 0]
    loss = ce_weight * (ce_BAk * w_BAk).sum() / denom
    if target_logits_BAkV is not None and kl_weight > 0:
        logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(target_logits_BAkV.astype(jnp.float32)), axis=-1)
        loss = loss + kl_weight * ((jnp.exp(logp_t) * (logp_t - logp)).sum(-1) * w_BAk).sum() / denom
    return loss


def block_accuracy(pred_BAk: jax.Array, ref_BAk: jax.Array, mask_BAk: jax.Array):
    """Per-position accuracy ``[Q-1]`` and the simulated acceptance length tau.

    tau of a block = 1 + length of the leading run of correct predictions (a masked label
    ends the run), the quantity greedy verification would accept; averaged over blocks whose
    first label counts.
    """
    correct = (pred_BAk == ref_BAk) & mask_BAk
    per_pos = correct.sum((0, 1)) / jnp.maximum(mask_BAk.sum((0, 1)), 1)
    run = jnp.cumprod(correct.astype(jnp.int32), axis=-1).sum(-1)  # [B, A]
    counted = mask_BAk[..., 0]
    tau = 1.0 + (run * counted).sum() / jnp.maximum(counted.sum(), 1)
    return per_pos, tau


def step_weighted_tau(pred_BAk: jax.Array, ref_BAk: jax.Array, mask_BAk: jax.Array) -> jax.Array:
    """Simulated tau per *verify step*: the harmonic mean of the per-block acceptance lengths.

    Decoding from a position with acceptance length t advances t tokens in one step, so a
    stretch where t holds costs (its length / t) steps, and tokens / steps = 1 / mean(1 / t)
    when every position is as likely to be a step's anchor. The plain mean over anchors
    (``block_accuracy``) counts easy stretches (repetition loops, t ~ B) as often as hard ones
    and overstates decoding tau; this one can understate it (a decoder entering a loop lands
    on its start, where t is largest). docs/benchmarks.md compares both with real tau.
    """
    correct = (pred_BAk == ref_BAk) & mask_BAk
    tau_BA = 1.0 + jnp.cumprod(correct.astype(jnp.int32), axis=-1).sum(-1)  # [B, A]
    counted = mask_BAk[..., 0]
    return counted.sum() / jnp.maximum((counted / tau_BA).sum(), 1e-9)


def acceptance_counts(pred_BAk: jax.Array, ref_BAk: jax.Array, mask_BAk: jax.Array) -> jax.Array:
    """``[K]`` counts of counted blocks whose simulated acceptance length is 1 .. K: the
    histogram whose mean is ``block_accuracy``'s tau (TensorBoard's acceptance histogram)."""
    correct = (pred_BAk == ref_BAk) & mask_BAk
    tau_BA = 1 + jnp.cumprod(correct.astype(jnp.int32), axis=-1).sum(-1)  # [B, A]
    counted = mask_BAk[..., 0].astype(jnp.int32)
    return jnp.zeros(mask_BAk.shape[-1] + 1, jnp.int32).at[(tau_BA - 1).reshape(-1)].add(counted.reshape(-1))


def score_blocks(logits_BAkV: jax.Array, labels_BAk: jax.Array, label_mask_BAk: jax.Array,
                 label_idx_BAk: jax.Array, target_logits_BSV: jax.Array | None, *, gamma: float,
                 ce_weight: float, kl_weight: float, target_labels: bool = False) -> tuple[jax.Array, dict]:
    """Loss and metrics of drafted blocks whose ``Q-1`` rows predict the tokens at ``label_idx``.

    The target's distribution for the token at position ``i`` sits at ``i - 1`` of its clean
    (teacher-forced) pass: argmax ids are gathered for the simulated tau, full distributions
    only when the KL term needs them. ``target_labels``: CE on the target's own argmax instead
    of the data (self-distillation). ``target_logits_BSV=None`` (a train step that needs no
    target logits: CE on the data, no KL) measures the simulated tau against the labels.
    """
    b = logits_BAkV.shape[0]
    k = labels_BAk.shape[-1] + 1
    prev = (label_idx_BAk - 1).reshape(b, -1)  # [B, A*(Q-1)]
    if target_logits_BSV is None:
        if kl_weight > 0 or target_labels:
            raise ValueError("the KL term and target labels need the target's logits")
        t_argmax = labels_BAk
    else:
        t_argmax_BS = jnp.argmax(target_logits_BSV, axis=-1)
        t_argmax = jnp.take_along_axis(t_argmax_BS, prev, axis=1).reshape(labels_BAk.shape)
    t_at = None
    if kl_weight > 0:
        t_at = jnp.take_along_axis(target_logits_BSV, prev[..., None], axis=1).reshape(logits_BAkV.shape)
    if target_labels:
        labels_BAk = t_argmax
    loss, metrics = decayed_loss(logits_BAkV, labels_BAk, label_mask_BAk, loss_weights(k, gamma), t_at,
                                 ce_weight, kl_weight)
    return loss, block_metrics(metrics, loss, jnp.argmax(logits_BAkV, axis=-1), labels_BAk, t_argmax,
                               label_mask_BAk)


def block_metrics(metrics: dict, loss: jax.Array, pred_BAk: jax.Array, labels_BAk: jax.Array,
                  t_argmax_BAk: jax.Array, label_mask_BAk: jax.Array) -> dict:
    """``metrics`` (the loss terms) plus the accuracies and simulated taus of ``score_blocks``;
    shared with the chunked loss head (``dflash.drafters.loss_head``)."""
    per_pos, tau_labels = block_accuracy(pred_BAk, labels_BAk, label_mask_BAk)
    _, tau_target = block_accuracy(pred_BAk, t_argmax_BAk, label_mask_BAk)
    metrics.update(loss=loss, accuracy=per_pos, tau_sim=tau_target, tau_sim_labels=tau_labels,
                   tau_sim_steps=step_weighted_tau(pred_BAk, t_argmax_BAk, label_mask_BAk),
                   acceptance_counts=acceptance_counts(pred_BAk, t_argmax_BAk, label_mask_BAk),
                   # the denominators of those means: chunked evaluation combines them exactly
                   blocks_counted=label_mask_BAk[..., 0].sum(), position_count=label_mask_BAk.sum((0, 1)))
    return metrics


def combine_chunk_metrics(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """``score_blocks`` metrics of several batches -> the metrics of their union, exactly.

    Each metric is a mean over its own batch; weighting it by that batch's denominator (loss
    weights, counted blocks, labels per position) gives the mean over all of them. The per-step
    tau is a harmonic mean, so its reciprocals are what add up.
    """
    def values(name: str) -> np.ndarray:  # [C] or [C, Q-1]
        return np.stack([np.asarray(c[name], np.float64) for c in chunks])

    w, n, pos = values("weight_sum"), values("blocks_counted"), values("position_count")

    def mean(name: str, weights: np.ndarray, empty: float) -> float:
        return float((values(name) * weights).sum() / weights.sum()) if weights.sum() > 0 else empty

    has = n > 0  # a batch without counted blocks has no per-step tau (its 1/tau terms are 0)
    steps = float(n[has].sum() / (n[has] / values("tau_sim_steps")[has]).sum()) if has.any() else 0.0
    return {"loss": mean("loss", w, 0.0), "tau_sim": mean("tau_sim", n, 1.0), "tau_sim_steps": steps,
            "tau_sim_labels": mean("tau_sim_labels", n, 1.0),
            "accuracy": ((values("accuracy") * pos).sum(0) / np.maximum(pos.sum(0), 1)).tolist(),
            "acceptance_counts": values("acceptance_counts").sum(0).astype(int).tolist()}
