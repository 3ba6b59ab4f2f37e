"""Memory-bounded loss head: CE, KL and the eval metrics without ``[rows, V]`` logits.

``objective.score_blocks`` takes logits of every drafted row over the whole vocabulary: at
the Qwen3-8B preset that is ``[32, 512, 15, 151936]`` fp32 (~19 GB per device on 8 devices)
plus a vocabulary-sized backward. Here the drafter's final hidden states and the LM head's
``[D, V]`` weight come in instead, and the logits are made ``chunk`` rows of each sequence at
a time inside a ``lax.scan`` whose body is rematerialised (``jax.checkpoint``): the forward
keeps only per-row scalars, the backward recomputes one chunk's logits at a time and runs
``objective.ce_kl_rows``' fused backward on it. Peak logits memory is
``B_local * chunk * V_local`` floats.

Vocabulary-parallel: each chunk's logits are constrained to ``(batch, -, vocab)``, so with
the head split over ``tensor`` every device holds only its vocabulary slice and the
logsumexp / argmax / label pick become all-reduces over ``tensor`` (GSPMD inserts them).

Shape letters: B batch rows, A anchors, k = K-1 rows per block, R = A*k rows per sequence,
c rows per chunk, n chunks, S sequence, D width, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dflash.drafters import objective as obj
from dflash.models.transformer import softcap
from dflash.sharding import constrain

DEFAULT_CHUNK = 256  # rows of each sequence per chunk (``train.loss_chunk``)

class RowStats(NamedTuple):
    ce: jax.Array  # [B, R] float32 cross-entropy of each row's label
    kl: jax.Array | None  # [B, R] float32 KL(target || drafter) (``kl=True``)
    pred: jax.Array  # [B, R] int32 the drafter's argmax
    t_pred: jax.Array | None  # [B, R] int32 the target's argmax (with target hidden states)


def _logits(h_BcD: jax.Array, w_DV: jax.Array, cap: float = 0.0) -> jax.Array:
    """One chunk's logits ``[B, c, V]``: fp32 accumulation and the soft-cap ``cap``, as
    ``Transformer.unembed`` makes them."""
    logits = jnp.einsum("BcD,DV->BcV", h_BcD, w_DV, preferred_element_type=jnp.float32)
    return constrain(softcap(logits, cap), ("batch", None, "vocab"))


def row_stats(h_BRD: jax.Array, w_DV: jax.Array, labels_BR: jax.Array, t_h_BRD: jax.Array | None = None,
              *, chunk: int = DEFAULT_CHUNK, kl: bool = False, target_labels: bool = False,
              logit_softcap: float = 0.0) -> RowStats:
    """Per-row CE (and KL) of ``logits = softcap(h @ w)``, computed ``chunk`` rows of each sequence at
    a time.

    ``t_h_BRD``: the target's final-normed hidden state for the same rows (its logits are
    ``softcap(t_h @ w)``, never differentiated); needed for ``kl`` and ``target_labels`` (CE on the
    target's argmax). ``logit_softcap``: the target's ``final_logit_softcapping`` (Gemma), applied
    to both, so both are the logits ``Transformer.unembed`` makes. Gradients flow into ``h`` and
    ``w`` exactly as through the dense form.
    """
    if (kl or target_labels) and t_h_BRD is None:
        raise ValueError("the KL term and target labels need the target's hidden states")
    if chunk < 1:
        raise ValueError(f"loss chunk must be >= 1, got {chunk}")
    b, r = labels_BR.shape
    c = min(chunk, r)
    n = -(-r // c)

    def split(x: jax.Array) -> jax.Array:  # [B, R, ...] -> [n, B, c, ...] (zero-padded rows)
        x = jnp.pad(x, [(0, 0), (0, n * c - r)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(b, n, c, *x.shape[2:]), 0, 1)

    def merge(y: jax.Array | None) -> jax.Array | None:  # [n, B, c] -> [B, R]
        return None if y is None else jnp.swapaxes(y, 0, 1).reshape(b, n * c)[:, :r]

    t_xs = None if t_h_BRD is None else split(jax.lax.stop_gradient(t_h_BRD))

    @jax.checkpoint
    def body(carry, xs):
        h_BcD, labels_Bc, t_BcD = xs
        logits_BcV = _logits(h_BcD, w_DV, logit_softcap)
        t_logits_BcV = t_pred_Bc = None
        if t_BcD is not None:
            t_logits_BcV = jax.lax.stop_gradient(_logits(t_BcD, w_DV, logit_softcap))
            t_pred_Bc = jnp.argmax(t_logits_BcV, axis=-1).astype(jnp.int32)
        if target_labels:
            labels_Bc = t_pred_Bc
        ce_Bc, kl_Bc = obj.ce_kl_rows(logits_BcV, labels_Bc, t_logits_BcV if kl else None)
        return carry, (ce_Bc, kl_Bc, jnp.argmax(logits_BcV, axis=-1).astype(jnp.int32), t_pred_Bc)

    _, (ce, kl_rows, pred, t_pred) = jax.lax.scan(body, None, (split(h_BRD), split(labels_BR), t_xs))
    return RowStats(merge(ce), merge(kl_rows), merge(pred), merge(t_pred))


def score_hidden(h_BAkD: jax.Array, w_DV: jax.Array, labels_BAk: jax.Array, label_mask_BAk: jax.Array,
                 label_idx_BAk: jax.Array, t_final_BSD: jax.Array | None, *, gamma: float,
                 ce_weight: float, kl_weight: float, target_labels: bool = False,
                 chunk: int = DEFAULT_CHUNK, logit_softcap: float = 0.0) -> tuple[jax.Array, dict]:
    """``objective.score_blocks`` from hidden states: same loss, gradient and metrics.

    ``h_BAkD``: the rows whose logits ``softcap(h @ w_DV, logit_softcap)`` ``score_blocks`` would take;
    ``t_final_BSD``: the target's final-normed hidden states of its clean pass
    (``Transformer(..., final_hidden=True).final``; None when the loss needs no target),
    gathered at ``label_idx - 1`` before any logits are made.
    """
    b, a, k, d = h_BAkD.shape
    t_h = None
    if t_final_BSD is None:
        if kl_weight > 0 or target_labels:
            raise ValueError("the KL term and target labels need the target's logits")
    else:
        prev_BR = (label_idx_BAk - 1).reshape(b, a * k)
        t_h = jnp.take_along_axis(t_final_BSD, prev_BR[..., None], axis=1)  # [B, R, D]
    stats = row_stats(h_BAkD.reshape(b, a * k, d), w_DV, labels_BAk.reshape(b, a * k), t_h, chunk=chunk,
                      kl=kl_weight > 0, target_labels=target_labels, logit_softcap=logit_softcap)
    shape = labels_BAk.shape
    t_argmax = labels_BAk if stats.t_pred is None else stats.t_pred.reshape(shape)
    if target_labels:
        labels_BAk = t_argmax
    w_BAk = obj.loss_weights(k + 1, gamma)[None, None, :] * label_mask_BAk
    kl_BAk = None if stats.kl is None else stats.kl.reshape(shape)
    loss, metrics = obj.weighted_terms(stats.ce.reshape(shape), kl_BAk, w_BAk, ce_weight, kl_weight)
    return loss, obj.block_metrics(metrics, loss, stats.pred.reshape(shape), labels_BAk, t_argmax,
                                   label_mask_BAk)
