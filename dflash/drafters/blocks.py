"""What every block drafter's training loss shares: anchor blocks and their scoring.

A packed batch's anchors are sampled, each becomes a block ``[anchor, MASK x (Q-1)]`` with its
labels and its prefix mask (``anchor_blocks``), and the drafter's hidden states for the drafted
rows are scored by the memory-bounded loss head (``score``). The kinds differ only in how a block
is drafted (``dflash.drafters.dflash.kind``, ``dflash.drafters.orthrus.kind``). No gradient reaches
the target (docs/design.md §5, §6).

Shape letters (docs/architecture.md): B rows, S sequence, A anchors per row, Q block rows
(the block size), D model width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dflash.drafters import loss_head
from dflash.drafters import objective as obj
from dflash.models.transformer import Transformer


def document_mask(seg_BS: jax.Array) -> jax.Array:
    """``[B, S, S]`` causal attention within each packed document (segment ids)."""
    s = seg_BS.shape[1]
    return jnp.tril(jnp.ones((s, s), bool))[None] & (seg_BS[:, :, None] == seg_BS[:, None, :])


class AnchorBlocks(NamedTuple):
    x: jax.Array  # [B, A, Q, D] embedded [anchor, MASK x] blocks (no gradient)
    q_pos: jax.Array  # [B, A, Q] their positions (within the anchor's document)
    ctx_mask: jax.Array  # [B, A, S] block j sees positions < a_j of its own document
    labels: jax.Array  # [B, A, Q-1] tokens at a+1 .. a+Q-1
    label_mask: jax.Array  # [B, A, Q-1]
    label_idx: jax.Array  # [B, A, Q-1] their positions in the row
    valid: jax.Array  # [B, A]


def anchor_blocks(target: Transformer, batch: dict[str, jax.Array], key: jax.Array, num_anchors: int,
                  block_size: int, mask_token_id: int) -> AnchorBlocks:
    """Samples anchors and builds their blocks, labels and prefix masks (shared by every kind)."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    b, q = tokens.shape[0], block_size
    anchors, valid = obj.sample_anchors(key, loss_mask, seg, num_anchors)  # [B, A]
    labels, label_mask, idx = obj.block_labels(tokens, loss_mask, seg, anchors, valid, q)
    a = anchors.shape[1]
    anchor_tok = jnp.take_along_axis(tokens, anchors, axis=1)
    block = jnp.concatenate([anchor_tok[..., None], jnp.full((b, a, q - 1), mask_token_id)], axis=-1)
    x = jax.lax.stop_gradient(target.embed(block.reshape(b, a * q))).reshape(b, a, q, -1)
    q_pos = jnp.take_along_axis(pos, anchors, axis=1)[..., None] + jnp.arange(q)  # [B, A, Q]
    ctx_mask = obj.anchor_context_mask(anchors, valid, seg)  # [B, A, S]
    return AnchorBlocks(x, q_pos, ctx_mask, labels, label_mask, idx, valid)


def blocks_at(target: Transformer, seq_1S: jax.Array, anchors_A: jax.Array, block: int,
              mask_token_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blocks at every anchor of one causal sequence: embedded ``[1, A, Q, D]``, positions
    ``[1, A, Q]`` and prefix masks ``[1, A, S]`` (block j sees the positions before its anchor)."""
    a, s = anchors_A.shape[0], seq_1S.shape[1]
    tokens_AQ = jnp.concatenate([seq_1S[0, anchors_A][:, None], jnp.full((a, block - 1), mask_token_id)],
                                axis=1)
    x = target.embed(tokens_AQ.reshape(1, a * block)).reshape(1, a, block, -1)
    q_pos = anchors_A[None, :, None] + jnp.arange(block)  # [1, A, Q]
    ctx_mask = obj.anchor_context_mask(anchors_A[None], jnp.ones((1, a), bool), jnp.ones((1, s), jnp.int32))
    return x, q_pos, ctx_mask


def score(h_BAkD: jax.Array, target: Transformer, blocks: AnchorBlocks, t_final_BSD: jax.Array | None,
          batch: dict[str, jax.Array], **loss_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``score_blocks`` of the rows whose logits are ``target.unembed(h)`` (the LM head and the
    target's soft-cap), in row chunks (``loss_head``)."""
    loss, metrics = loss_head.score_hidden(h_BAkD, target.head_weight(), blocks.labels, blocks.label_mask,
                                           blocks.label_idx, t_final_BSD,
                                           logit_softcap=target.cfg.final_logit_softcapping, **loss_kw)
    metrics.update(tokens=(batch["loss_mask"] & (batch["segment_ids"] > 0)).sum(), blocks=blocks.valid.sum())
    return loss, metrics
