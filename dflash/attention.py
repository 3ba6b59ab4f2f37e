"""Reference attention: the one definition that the models and the kernels' references share.

``attend`` is the pure-jnp grouped-query attention every path is measured against: the
target and the drafters call it directly, and ``reference_verify_attention`` /
``reference_anchor_block_attention`` are built on it. What a query may see in a KV cache
(``visibility``) is defined here too. It lives here, below both ``dflash.models`` and
``dflash.kernels``, so neither has to import the other for it.

Shape letters (docs/architecture.md): B batch, T queries, S keys, N query heads, K kv heads,
G = N / K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives no NaN


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array,
           sinks_N: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention with a boolean visibility mask; softmax in float32. ``[B, T, N*H]``.

    ``sinks_N``: one extra logit per query head (gpt-oss's attention sinks), a softmax column
    that takes probability mass and is dropped after the softmax.
    """
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kh, n // kh, h)
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, NEG_INF)
    if sinks_N is None:
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    else:
        sink_BKGT1 = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(1, kh, n // kh, 1, 1),
                                      (*scores_BKGTS.shape[:-1], 1))
        probs_BKGTS = jax.nn.softmax(jnp.concatenate([scores_BKGTS, sink_BKGT1], axis=-1), axis=-1)[..., :-1]
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return out_BTKGH.reshape(b, t, n * h)


def causal_mask(block_len: int) -> jax.Array:
    """``[T, T]`` lower-triangular mask (query t sees block keys <= t)."""
    return jnp.tril(jnp.ones((block_len, block_len), dtype=bool))


def block_slots(lengths: jax.Array, block_len: int) -> jax.Array:
    """Slots ``[B, T]`` where a block of ``block_len`` new tokens is written."""
    return lengths[:, None] + jnp.arange(block_len, dtype=jnp.int32)[None, :]


def visibility(lengths: jax.Array, max_len: int, block_mask: jax.Array) -> jax.Array:
    """``[B, T, S]`` mask: prefix slots ``< len`` plus the block slots ``block_mask`` allows.

    ``block_mask`` is ``[T, T]`` or ``[B, T, T]`` over the block written at ``[len, len+T)``.
    """
    batch = lengths.shape[0]
    block_len = block_mask.shape[-1]
    if block_mask.ndim == 2:
        block_mask = jnp.broadcast_to(block_mask, (batch, block_len, block_len))
    slot_S = jnp.arange(max_len, dtype=jnp.int32)
    rel_BS = slot_S[None, :] - lengths[:, None]  # slot index relative to the block start
    in_block_BS = (rel_BS >= 0) & (rel_BS < block_len)
    idx_BTS = jnp.broadcast_to(jnp.clip(rel_BS, 0, block_len - 1)[:, None, :],
                               (batch, block_len, max_len))
    block_BTS = jnp.take_along_axis(block_mask, idx_BTS, axis=2)
    prefix_BS = rel_BS < 0
    return prefix_BS[:, None, :] | (in_block_BS[:, None, :] & block_BTS)


def key_positions(lengths: jax.Array, max_len: int, positions_BT: jax.Array) -> jax.Array:
    """``[B, S]``: the position of the token in each cache slot once a block at ``positions_BT`` is
    written at ``[len, len+T)`` (prefix slot s holds position s; a tree node sits at its depth)."""
    block_len = positions_BT.shape[1]
    rel_BS = jnp.arange(max_len, dtype=jnp.int32)[None, :] - lengths[:, None]
    in_block = jnp.take_along_axis(positions_BT, jnp.clip(rel_BS, 0, block_len - 1), axis=1)
    return jnp.where(rel_BS < 0, jnp.arange(max_len, dtype=jnp.int32)[None, :], in_block)


def window_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int) -> jax.Array:
    """``[B, T, S]``: a key is inside the sliding window of a query ``window`` positions wide
    (the query's own position and the ``window - 1`` before it), as ``transformers`` defines it."""
    return (q_pos_BT[:, :, None] - k_pos_BS[:, None, :]) < window
