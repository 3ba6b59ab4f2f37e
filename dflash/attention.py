"""Reference attention: the one definition that the models and the kernels' references share.

``attend`` is the pure-jnp grouped-query attention every path is measured against: the
target and the drafters call it directly, and ``reference_verify_attention`` /
``reference_anchor_block_attention`` are built on it. It lives here, below both
``dflash.models`` and ``dflash.kernels``, so neither has to import the other for it.

Shape letters (docs/architecture.md): B batch, T queries, S keys, N query heads, K kv heads,
G = N / K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives no NaN


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query attention with a boolean visibility mask; softmax in float32. ``[B, T, N*H]``."""
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kh, n // kh, h)
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n * h)
