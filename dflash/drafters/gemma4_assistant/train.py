"""Training a Gemma 4 assistant against its frozen target (docs/design.md, "Gemma 4 assistant").

The target runs once over the packed row, with a cache of the row's length: its producing layers'
keys and values and its final-normed hidden states. For a sampled anchor ``a`` (the engine's
anchor: the target has committed ``0 .. a-1``), the chain is the engine's, all at position ``a``
over the target's keys before ``a`` in ``a``'s document:

    step 1 reads (token a, h_{a-1}: the target's final-normed hidden) -> logits of token a+1
    step j reads (token a+j-1, step j-1's projected output)          -> logits of token a+j

Teacher forcing: step j reads the row's token ``a+j-1``, not the assistant's own draft. Under
verification a draft counts only when every earlier one was accepted, i.e. equal to the token the
sequence goes on with; feeding that token is the engine's input in exactly the cases that are
scored, the label (the row's next token, or the target's greedy one given those tokens) conditions
on it too, and the steps stay free of argmax. The assistant has no keys of its own, so anchors are
independent: only the A sampled anchors are computed (``train.num_anchors >= seq_len - 1``: every
position). CE per step weighted as the block drafters' rows (``objective.loss_weights``), plus the
forward KL to the target's soft-capped distribution (``Transformer.unembed``) when asked.
Shape letters: B rows, S sequence, A anchors, k steps, D width, V vocabulary, c rows per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dflash.drafters import blocks as blk
from dflash.drafters import objective as obj
from dflash.drafters.gemma4_assistant.model import Gemma4Assistant, producers
from dflash.errors import ConfigError
from dflash.models.cache import Cache
from dflash.models.kinds import init_cache
from dflash.models.transformer import Transformer


def target_pass(target: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, Cache]:
    """The frozen target over the packed row: final-normed hidden ``[B, S, D]`` and a cache holding
    the producing layers' keys and values of every position (no other layer's state is kept)."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    made = set(producers(target.cfg).values())
    full = init_cache(target.cfg, b, s, target.dtype)
    cache = Cache(tuple(st if i in made else None for i, st in enumerate(full.layers)), full.lengths, s)
    out = target(tokens, pos, cache, segment_ids=seg, compute_logits=False, final_hidden=True)
    return jax.lax.stop_gradient(out.final), jax.tree.map(jax.lax.stop_gradient, out.cache)


def chain_at_anchors(
    drafter: Gemma4Assistant,
    target: Transformer,
    batch: dict[str, jax.Array],
    t_final_BSD: jax.Array,
    cache: Cache,
    anchors_BA: jax.Array,
    visible_BAS: jax.Array,
) -> jax.Array:
    """The chain's normed outputs ``[B, A, k, D]`` (the head's input) at the anchors (module docstring)."""
    k = drafter.cfg.block_size - 1
    tokens, pos = batch["tokens"], batch["positions"]
    s = tokens.shape[1]
    kv = drafter.target_kv(target.cfg, cache)
    q_pos = jnp.take_along_axis(pos, anchors_BA, axis=1)
    prev = jnp.maximum(anchors_BA - 1, 0)
    h = jnp.take_along_axis(t_final_BSD, prev[..., None], axis=1)  # h_{a-1}
    ys = []
    for j in range(1, k + 1):
        tok = jnp.take_along_axis(tokens, jnp.minimum(anchors_BA + j - 1, s - 1), axis=1)
        emb = jax.lax.stop_gradient(target.embed(tok))
        y, h = drafter.at_anchors(emb, h, q_pos, kv, visible_BAS, pos)
        ys.append(y)
    return jnp.stack(ys, axis=2)


def row_stats(y_BRD: jax.Array, table_VD: jax.Array, labels_BR: jax.Array, t_h_BRD: jax.Array | None,
              target: Transformer, *, chunk: int, kl: bool, target_labels: bool):
    """Per-row CE (and KL), the assistant's argmax and the target's, ``chunk`` rows at a time with the
    logits rematerialised: the assistant's ``y @ E_assistantᵀ``, the target's ``target.unembed`` of its
    hidden state (its own head and soft-cap)."""
    b, r = labels_BR.shape
    c = min(chunk, r)
    n = -(-r // c)

    def split(x):  # [B, R, ...] -> [n, B, c, ...]
        x = jnp.pad(x, [(0, 0), (0, n * c - r)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(b, n, c, *x.shape[2:]), 0, 1)

    def merge(y):  # [n, B, c] -> [B, R]
        return None if y is None else jnp.swapaxes(y, 0, 1).reshape(b, n * c)[:, :r]

    @jax.checkpoint
    def body(carry, xs):
        y_BcD, labels_Bc, t_BcD = xs
        logits = jnp.einsum("bcd,vd->bcv", y_BcD, table_VD, preferred_element_type=jnp.float32)
        t_logits = t_pred = None
        if t_BcD is not None:
            t_logits = jax.lax.stop_gradient(target.unembed(t_BcD))
            t_pred = jnp.argmax(t_logits, axis=-1).astype(jnp.int32)
        if target_labels:
            labels_Bc = t_pred
        ce, kl_rows = obj.ce_kl_rows(logits, labels_Bc, t_logits if kl else None)
        return carry, (ce, kl_rows, jnp.argmax(logits, axis=-1).astype(jnp.int32), t_pred)

    t_xs = None if t_h_BRD is None else split(t_h_BRD)
    _, (ce, kl_rows, pred, t_pred) = jax.lax.scan(body, None, (split(y_BRD), split(labels_BR), t_xs))
    return merge(ce), merge(kl_rows), merge(pred), merge(t_pred)


def assistant_loss(
    drafter: Gemma4Assistant,
    target: Transformer,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    num_anchors: int,
    gamma: float,
    ce_weight: float,
    kl_weight: float,
    target_labels: bool = False,
    target_metrics: bool = True,
    loss_chunk: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one packed batch (``DrafterKind.loss``)."""
    if drafter.centroids is not None:
        raise ConfigError("training a centroid-head Gemma 4 assistant (use_ordered_embeddings) is not "
                          "supported: its top-k centroid choice has no gradient; train a plain head")
    k = drafter.cfg.block_size - 1
    seg = batch["segment_ids"]
    t_final, cache = target_pass(target, batch)
    blocks = blk.anchor_blocks(target, batch, key, num_anchors, k + 1, mask_token_id=0)
    anchors = blocks.label_idx[:, :, 0] - 1
    prev = jnp.maximum(anchors - 1, 0)
    same_doc = jnp.take_along_axis(seg, prev, axis=1) == jnp.take_along_axis(seg, anchors, axis=1)
    label_mask = blocks.label_mask & ((anchors >= 1) & same_doc)[..., None]  # h_{a-1} in a's document
    y = chain_at_anchors(drafter, target, batch, t_final, cache, anchors, blocks.ctx_mask)
    b, a = anchors.shape
    need_target = target_metrics or kl_weight > 0 or target_labels
    t_h = None
    if need_target:  # the target's hidden state before each label: its logits of that label
        t_h = jnp.take_along_axis(t_final, (blocks.label_idx - 1).reshape(b, a * k)[..., None], axis=1)
    ce, kl_rows, pred, t_pred = row_stats(
        y.reshape(b, a * k, -1), drafter.head_table(), blocks.labels.reshape(b, a * k), t_h, target,
        chunk=loss_chunk, kl=kl_weight > 0, target_labels=target_labels)
    shape = blocks.labels.shape
    labels = blocks.labels if t_pred is None or not target_labels else t_pred.reshape(shape)
    t_argmax = blocks.labels if t_pred is None else t_pred.reshape(shape)
    w = obj.loss_weights(k + 1, gamma)[None, None, :] * label_mask
    loss, metrics = obj.weighted_terms(ce.reshape(shape), None if kl_rows is None else kl_rows.reshape(shape),
                                       w, ce_weight, kl_weight)
    metrics = obj.block_metrics(metrics, loss, pred.reshape(shape), labels, t_argmax, label_mask)
    metrics.update(tokens=(batch["loss_mask"] & (seg > 0)).sum(), blocks=blocks.valid.sum())
    return loss, metrics
