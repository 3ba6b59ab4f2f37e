"""EAGLE-3's training objective: training-time test (TTT) against the frozen target.

Step ``i`` (0-based) of row ``t`` predicts token ``t+2+i`` (``Eagle3Drafter.ttt_forward``); its
loss is the cross-entropy of the drafter's draft-vocabulary distribution against the target's
next-token distribution at ``t+1+i`` restricted to the draft vocabulary (softmax over those
columns only), counted where token ``t+2+i`` is supervised, in row ``t``'s document, and the
target's argmax there lies in the draft vocabulary; summed over positions, divided by ``B*S`` and
weighted ``0.8**i`` (SpecForge's ``specforge/core/eagle3.py``). The metrics are the block metrics
of the other kinds (``objective.block_metrics``) with every row an anchor and ``ttt_steps``
predictions per anchor.

Memory: nothing of size ``[B, S, V]`` or ``[B, N, S, S]`` exists, and no step keeps ``[B, S, W]``
logits: the target's logits, each step's attention and each step's draft logits are made
``train.loss_chunk`` rows of each sequence at a time (``model.seq_map``), the last two
rematerialised in the backward; only the target's draft-vocabulary distribution ``[B, S, W]``
(float32) is kept, once. The values are the dense form's, row for row.

Shape letters: B rows, S sequence, W draft vocabulary, V target vocabulary, k TTT steps,
c rows per chunk, R padded rows, X the target's final width (D) or V.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dflash.drafters import objective as obj
from dflash.drafters.eagle3.model import DEFAULT_CHUNK, STEP_DECAY, Eagle3Drafter, seq_map
from dflash.models.transformer import Transformer


def shifted(x_BS: jax.Array, by: int, fill=0) -> jax.Array:
    """``x[:, t + by]`` at ``t`` (``fill`` past the end)."""
    pad = [(0, 0), (0, by)] + [(0, 0)] * (x_BS.ndim - 2)
    return jnp.pad(x_BS[:, by:], pad, constant_values=fill)


def label_mask(loss_mask_BS: jax.Array, segment_ids_BS: jax.Array, ahead: int) -> jax.Array:
    """``[B, S]``: token ``t + ahead`` is supervised and in row ``t``'s document."""
    return (shifted(loss_mask_BS, ahead, False) & (shifted(segment_ids_BS, ahead, -1) == segment_ids_BS)
            & (segment_ids_BS > 0))


def step_weights(steps: int) -> tuple[float, ...]:
    return tuple(STEP_DECAY ** i for i in range(steps))


def target_dist(t_BSX: jax.Array, ids_W: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                chunk: int) -> tuple[jax.Array, jax.Array]:
    """The target's argmax over its whole vocabulary ``[B, S]`` and its distribution renormalised to
    the draft vocabulary ``[B, S, W]`` (float32), from ``logits = logits_fn(t)`` made ``chunk`` rows
    at a time: the ``[B, S, V]`` logits never exist whole."""
    def one(_, t_BcX):
        logits_BcV = logits_fn(t_BcX)
        return (jnp.argmax(logits_BcV, axis=-1),
                jax.nn.softmax(logits_BcV[..., ids_W].astype(jnp.float32), axis=-1))

    return seq_map(one, jax.lax.stop_gradient(t_BSX), t_BSX.shape[1], chunk, remat=False)


def step_xent(drafter: Eagle3Drafter, h_BSD: jax.Array, p_BRW: jax.Array, ahead: int,
              chunk: int) -> tuple[jax.Array, jax.Array]:
    """Per row ``t`` of one TTT step: the cross-entropy of the drafter's draft-vocabulary
    distribution (from its pre-norm output ``h``) against ``p[t + ahead]``, and its argmax (a draft
    id). ``p_BRW`` is zero-padded past the sequence (``R >= S + ahead`` rounded up to chunks). The
    logits are made ``chunk`` rows at a time and remade in the backward: none of ``[B, S, W]`` is
    kept between the steps."""
    def one(start, h_BcD):
        logp_BcW = jax.nn.log_softmax(drafter.head(h_BcD), axis=-1)
        p_BcW = jax.lax.dynamic_slice_in_dim(p_BRW, start + ahead, h_BcD.shape[1], axis=1)
        return -(p_BcW * logp_BcW).sum(-1), jnp.argmax(logp_BcW, axis=-1)

    return seq_map(one, h_BSD, h_BSD.shape[1], chunk, remat=True)


def ttt_terms(drafter: Eagle3Drafter, feats_BSnD: jax.Array, t_BSX: jax.Array, batch: dict[str, jax.Array],
              steps: int, *, logits_fn: Callable[[jax.Array], jax.Array] = lambda x: x,
              chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The TTT loss from the target's features and ``t_BSX`` (both treated as constants): its final
    hidden states with ``logits_fn`` its LM head, or (the default identity) its logits. ``chunk``:
    rows of each sequence per chunk of the target's logits, the attention and each step's loss."""
    tokens, seg, pos, lm = batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]
    b, s = tokens.shape
    outs = drafter.ttt_forward(feats_BSnD, tokens, pos, seg, steps, chunk)
    ids_W = drafter.draft_ids()
    t2d_V = drafter.t2d[...]
    t_argmax_BS, p_BSW = target_dist(t_BSX, ids_W, logits_fn, chunk)
    c = min(chunk, s)
    p_BRW = jnp.pad(p_BSW, ((0, 0), (0, -(-s // c) * c - s + steps), (0, 0)))  # 0 past the end
    loss = jnp.zeros((), jnp.float32)
    preds, refs, masks, labels = [], [], [], []
    for i, w in enumerate(step_weights(steps)):
        t_arg = shifted(t_argmax_BS, 1 + i)
        mask = label_mask(lm, seg, 2 + i) & t2d_V[t_arg]
        xent_BS, pred_BS = step_xent(drafter, outs[i], p_BRW, 1 + i, chunk)
        loss = loss + w * jnp.where(mask, xent_BS, 0.0).sum() / (b * s)
        preds.append(ids_W[pred_BS])
        refs.append(t_arg)
        labels.append(shifted(tokens, 2 + i))
        masks.append(label_mask(lm, seg, 2 + i))
    stack = lambda xs: jnp.stack(xs, axis=-1)  # noqa: E731  [B, S, k]: every row an anchor
    mask_BSk = stack(masks)
    metrics = {"ce": loss, "weight_sum": mask_BSk.sum().astype(jnp.float32)}
    metrics = obj.block_metrics(metrics, loss, stack(preds), stack(labels), stack(refs), mask_BSk)
    metrics.update(tokens=(lm & (seg > 0)).sum(), blocks=mask_BSk[..., 0].sum())
    return loss, metrics


def ttt_loss(drafter: Eagle3Drafter, target: Transformer, batch: dict[str, jax.Array], steps: int,
             chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One frozen target pass (features of the drafter's layers and the final hidden states), then
    TTT with the target's logits made ``chunk`` rows at a time."""
    ids = drafter.cfg.target_layer_ids
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    out = target(tokens, pos, segment_ids=seg, hidden_layers=ids, compute_logits=False, final_hidden=True)
    n, b, s, d = out.hidden.shape
    feats = jax.lax.stop_gradient(jnp.transpose(out.hidden, (1, 2, 0, 3)).reshape(b, s, n * d))
    return ttt_terms(drafter, feats, out.final, batch, steps, logits_fn=target.unembed, chunk=chunk)
