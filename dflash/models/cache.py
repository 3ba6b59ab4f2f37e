"""Per-layer cache states behind one interface: arrays in, arrays out, never stored on modules.

A ``Cache`` holds one state per layer and ``lengths: int32[B]``, the tokens committed per row
(shared by all layers). What a layer's state is belongs to its mixer kind
(``dflash.models.kinds``): attention layers keep keys and values per slot (``KVState``); a
recurrent layer would keep its recurrence. The engine speaks only this interface
(docs/design.md §3):

- a forward pass over a block of ``T`` tokens writes the block into every state and returns the
  cache with ``lengths + T``;
- ``keep(kept_B, T)`` keeps the first ``kept_B`` tokens of that block per row and drops the rest
  (verification's rollback). A slot-per-token state drops nothing: the shorter ``lengths`` hide
  the stale slots, which are overwritten later. A state that folds tokens into one value (a
  recurrence) must, for this, hold what it needs from its last forward (for example its value
  after every block position) and select per row;
- ``commit_path(start_B, path_BP)`` after a *tree* pass makes the accepted path's entries look as
  if that chain alone had been written at ``start``; a state that cannot says so (``TREE = False``)
  and its target is refused for trees up front (``kinds.check_tree``), before anything compiles;
- every array of every state has the batch row on axis 0, so compaction (``take_rows``) and
  the batch's sharding are the same for all;
- each state class names the logical axes of its arrays (``AXES``, names of
  ``dflash.sharding.LOGICAL``), from which the mesh placement is derived.

Shape letters: B rows, S slots, K kv heads, H head dim, T block tokens, P path length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dflash.errors import CacheOverflowError, ConfigError
from dflash.sharding import LAYOUTS, constrain


class LayerState:
    """Base of a layer's cache state (a frozen dataclass registered as a pytree)."""

    AXES: ClassVar[dict[str, tuple[Any, ...]]] = {}
    """Logical axes of each array field (``dflash.sharding.LOGICAL`` names; batch first)."""
    TREE: ClassVar[bool] = False
    """Whether ``commit_path`` works: a target with a state that cannot is refused for trees."""

    def rollback(self, kept_B: jax.Array, block_len: int) -> LayerState:
        """After a pass over ``block_len`` tokens, the state holding only the first ``kept_B``."""
        raise NotImplementedError

    def commit_path(self, start_B: jax.Array, path_BP: jax.Array) -> LayerState:
        """After a tree pass written at ``start``, the state of the chain ``path_BP`` (block indices)."""
        raise ConfigError(f"a {type(self).__name__} layer cannot commit a tree path: tree verification "
                          "(--tree-width, --ngram-branch, --dynamic-tree) is not available for this target")

    def take_rows(self, idx: jax.Array) -> LayerState:
        return jax.tree.map(lambda x: x[idx], self)

    def constrained(self) -> LayerState:
        """Every array pinned to its logical axes (a no-op without a mesh)."""
        return dataclasses.replace(self, **{name: constrain(getattr(self, name), axes)
                                            for name, axes in self.AXES.items()})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVState(LayerState):
    """Keys and values of one attention layer, one slot per committed token: ``[B, S, K, H]``."""

    k: jax.Array
    v: jax.Array
    AXES: ClassVar[dict[str, tuple[Any, ...]]] = {"k": LAYOUTS["kv_cache"], "v": LAYOUTS["kv_cache"]}
    TREE: ClassVar[bool] = True  # a tree commit moves the path's slots

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any) -> KVState:
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape,
                                                          dtype)).constrained()  # two buffers (donation)

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, slots_BT: jax.Array) -> KVState:
        """The block's keys and values scattered into their slots (writes past the end are dropped)."""
        b_BT = jnp.broadcast_to(jnp.arange(k_BTKH.shape[0])[:, None], slots_BT.shape)

        def put(buf, new):
            return buf.at[b_BT, slots_BT].set(new.astype(buf.dtype), mode="drop")

        return KVState(k=put(self.k, k_BTKH), v=put(self.v, v_BTKH)).constrained()

    def rollback(self, kept_B: jax.Array, block_len: int) -> KVState:
        return self  # slots past the new length are invisible and get overwritten later

    def commit_path(self, start_B: jax.Array, path_BP: jax.Array) -> KVState:
        """Moves the path's nodes (written at ``start + block index``) to ``start + depth``."""
        b, p = path_BP.shape
        src_BP = start_B[:, None] + path_BP
        dst_BP = start_B[:, None] + jnp.arange(p, dtype=jnp.int32)[None]
        rows_BP = jnp.broadcast_to(jnp.arange(b)[:, None], (b, p))

        def move(kv):  # gather everything first, then write (paths may overlap)
            moved = kv[rows_BP, jnp.minimum(src_BP, kv.shape[1] - 1)]
            return kv.at[rows_BP, dst_BP].set(moved, mode="drop")

        return KVState(k=move(self.k), v=move(self.v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """One state per layer (``None`` for a layer without one) and the committed ``lengths [B]``.

    ``max_len`` (static) is the slots per row: the most tokens a row can hold.
    """

    layers: tuple[Any, ...]
    lengths: jax.Array
    max_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def keep(self, kept_B: jax.Array, block_len: int) -> Cache:
        """After a forward over ``block_len`` tokens: keep the first ``kept_B`` per row (0..T)."""
        kept_B = kept_B.astype(jnp.int32)
        layers = tuple(None if s is None else s.rollback(kept_B, block_len) for s in self.layers)
        return dataclasses.replace(self, layers=layers, lengths=self.lengths - block_len + kept_B)

    def commit_path(self, start_B: jax.Array, path_BP: jax.Array) -> Cache:
        """After a tree pass written at ``start_B``: the accepted path as a chain (lengths unchanged)."""
        layers = tuple(None if s is None else s.commit_path(start_B, path_BP) for s in self.layers)
        return dataclasses.replace(self, layers=layers)

    def at_lengths(self, lengths_B: jax.Array) -> Cache:
        """The same states with other committed lengths: a positional reset, only meaningful where
        every state is slot-per-token (benchmarks replaying one step; tests)."""
        return dataclasses.replace(self, lengths=lengths_B.astype(jnp.int32))

    def take_rows(self, idx: jax.Array) -> Cache:
        layers = tuple(None if s is None else s.take_rows(idx) for s in self.layers)
        return dataclasses.replace(self, layers=layers, lengths=self.lengths[idx])


def check_fits(needed: int, max_len: int, what: str = "sequence") -> None:
    """Host-side guard: raises instead of letting writes past ``max_len`` be dropped."""
    if needed > max_len:
        raise CacheOverflowError(
            f"{what} needs {needed} cache slots but the cache holds max_len={max_len}; "
            "use a larger max_len or fewer tokens"
        )
