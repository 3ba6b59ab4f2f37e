"""Functional KV cache: arrays in, arrays out, never stored on modules.

Slot ``s`` of row ``b`` holds the key/value written by the ``s``-th token committed to that
row. Visibility is *derived*: a query block written at slots ``[len_b, len_b + T)`` sees
every slot ``< len_b`` (the committed prefix) plus the block slots its ``block_mask``
allows (causal for AR chains, bidirectional for diffusion blocks, ancestor masks for
trees). Rollback after verification only moves ``lengths`` (O(1), no recompilation); stale
slots are masked and later overwritten.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dflash.config import ModelConfig
from dflash.errors import CacheOverflowError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: ``[layers, batch, max_len, kv_heads, head_dim]``; lengths: ``int32[batch]``."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """Commit or roll back: O(1), slots at ``>= lengths`` become invisible."""
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache with ``max_len`` slots per row."""
    if max_len <= 0:
        raise CacheOverflowError(f"max_len must be positive, got {max_len}")
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32)
    )


def check_fits(needed: int, max_len: int, what: str = "sequence") -> None:
    """Host-side guard: raises instead of letting writes past ``max_len`` be dropped."""
    if needed > max_len:
        raise CacheOverflowError(
            f"{what} needs {needed} cache slots but the cache holds max_len={max_len}; "
            "use a larger max_len or fewer tokens"
        )


def block_slots(lengths: jax.Array, block_len: int) -> jax.Array:
    """Slots ``[B, T]`` where a block of ``block_len`` new tokens is written."""
    return lengths[:, None] + jnp.arange(block_len, dtype=jnp.int32)[None, :]


def write_layer(cache_kv: jax.Array, layer: int, new_BTKD: jax.Array, slots_BT: jax.Array) -> jax.Array:
    """Scatters one layer's new keys (or values) into the full ``[L,B,S,K,D]`` array."""
    b_BT = jnp.broadcast_to(jnp.arange(new_BTKD.shape[0])[:, None], slots_BT.shape)
    return cache_kv.at[layer, b_BT, slots_BT].set(new_BTKD.astype(cache_kv.dtype), mode="drop")


def causal_mask(block_len: int) -> jax.Array:
    """``[T, T]`` lower-triangular mask (query t sees block keys <= t)."""
    return jnp.tril(jnp.ones((block_len, block_len), dtype=bool))


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
