"""EAGLE-3's training objective: training-time test (TTT) against the frozen target.

Step ``i`` (0-based) of row ``t`` predicts token ``t+2+i`` (``Eagle3Drafter.ttt_forward``); its
loss is the cross-entropy of the drafter's draft-vocabulary distribution against the target's
next-token distribution at ``t+1+i`` restricted to the draft vocabulary (softmax over those
columns only), counted where token ``t+2+i`` is supervised, in row ``t``'s document, and the
target's argmax there lies in the draft vocabulary; summed over positions, divided by ``B*S`` and
weighted ``0.8**i`` (SpecForge's ``specforge/core/eagle3.py``). The metrics are the block metrics
of the other kinds (``objective.block_metrics``) with every row an anchor and ``ttt_steps``
predictions per anchor.

Shape letters: B rows, S sequence, W draft vocabulary, V target vocabulary, k TTT steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dflash.drafters import objective as obj
from dflash.drafters.eagle3.model import STEP_DECAY, Eagle3Drafter
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


def ttt_terms(drafter: Eagle3Drafter, feats_BSnD: jax.Array, target_logits_BSV: jax.Array,
              batch: dict[str, jax.Array], steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The TTT loss from the target's features and logits (both treated as constants)."""
    tokens, seg, pos, lm = batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]
    b, s = tokens.shape
    outs = drafter.ttt_forward(feats_BSnD, tokens, pos, seg, steps)
    ids_W = drafter.draft_ids()
    t2d_V = drafter.t2d[...]
    t_argmax_BS = jnp.argmax(target_logits_BSV, axis=-1)
    p_BSW = jax.nn.softmax(target_logits_BSV[..., ids_W].astype(jnp.float32), axis=-1)
    loss = jnp.zeros((), jnp.float32)
    preds, refs, masks, labels = [], [], [], []
    for i, w in enumerate(step_weights(steps)):
        t_arg = shifted(t_argmax_BS, 1 + i)
        mask = label_mask(lm, seg, 2 + i) & t2d_V[t_arg]
        logp_BSW = jax.nn.log_softmax(drafter.head(outs[i]), axis=-1)
        xent = -(shifted(p_BSW, 1 + i) * logp_BSW).sum(-1)
        loss = loss + w * jnp.where(mask, xent, 0.0).sum() / (b * s)
        preds.append(ids_W[jnp.argmax(logp_BSW, axis=-1)])
        refs.append(t_arg)
        labels.append(shifted(tokens, 2 + i))
        masks.append(label_mask(lm, seg, 2 + i))
    stack = lambda xs: jnp.stack(xs, axis=-1)  # noqa: E731  [B, S, k]: every row an anchor
    mask_BSk = stack(masks)
    metrics = {"ce": loss, "weight_sum": mask_BSk.sum().astype(jnp.float32)}
    metrics = obj.block_metrics(metrics, loss, stack(preds), stack(labels), stack(refs), mask_BSk)
    metrics.update(tokens=(lm & (seg > 0)).sum(), blocks=mask_BSk[..., 0].sum())
    return loss, metrics


def ttt_loss(drafter: Eagle3Drafter, target: Transformer, batch: dict[str, jax.Array],
             steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One frozen target pass (features of the drafter's layers and the logits), then TTT."""
    ids = drafter.cfg.target_layer_ids
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    out = target(tokens, pos, segment_ids=seg, hidden_layers=ids, compute_logits=False, final_hidden=True)
    n, b, s, d = out.hidden.shape
    feats = jax.lax.stop_gradient(jnp.transpose(out.hidden, (1, 2, 0, 3)).reshape(b, s, n * d))
    t_logits = jax.lax.stop_gradient(target.unembed(out.final))
    return ttt_terms(drafter, feats, t_logits, batch, steps)
