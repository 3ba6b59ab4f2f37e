"""The engine's method for an MTP head: k chained steps per verify pass, its own KV cache of
committed positions written from the target's verified hidden states (docs/design.md, "MTP heads").

The head at position t pairs the target's hidden ``h_t`` with the embedding of token ``t + 1``, so
with ``L`` tokens committed (the anchor at ``L``) its cache holds slots ``0 .. L-2`` and the
method keeps ``h_{L-1}`` aside (``pending``): the token after it, the anchor, is known only once
verification has chosen it. Step 1 of a proposal is the head at ``L-1`` on (``h_{L-1}``, anchor);
step j at ``L-2+j`` on (step j-1's output, draft j-1). The proposal's own cache writes are scratch
(``propose`` returns no state); ``commit`` writes the verified pairs. Shape letters: B rows,
Q block, k = Q-1 drafts, T positions, D width, V vocabulary, K tree nodes per depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs, StepwiseDraft
from dflash.decoding.methods import check_block, drafts_from_logits
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.tree import ancestor_mask
from dflash.drafters.mtp.model import MTPHead
from dflash.errors import ConfigError
from dflash.models.cache import Cache
from dflash.models.transformer import FINAL_NORMED, INPUT_EMBEDDINGS, Transformer

TREE_SLOTS = 256
"""Scratch slots past the engine's cache the head keeps for a dynamic tree's nodes (each depth
re-runs the root and every node fed so far in one pass, written past the committed slots)."""


class MTPState(NamedTuple):
    cache: Cache  # committed slots: lengths = the target's committed tokens - 1
    pending_BD: jax.Array  # the target's final-normed hidden at the last committed position


class TreeCarry(NamedTuple):
    cache: Cache  # the committed cache (never written by the tree)
    x_BTD: jax.Array  # the head's inputs of the root and every node fed so far
    parents_BT: jax.Array  # each node's parent among them (the root: itself, index 0)
    positions_BT: jax.Array
    last_BKD: jax.Array  # the head's outputs at the nodes of the last depth fed


@dataclasses.dataclass(frozen=True)
class MTPDraft(StepwiseDraft):
    """k = ``block_size - 1`` chained MTP steps; argmax drafts unless ``stochastic`` (then, when
    sampling, each draft is drawn from the head's processed distribution, which is returned)."""

    block_size: int
    stochastic: bool = False
    hidden_layers: tuple[int, ...] = (INPUT_EMBEDDINGS, FINAL_NORMED)
    mask_token_id: int | None = None

    @classmethod
    def of(cls, head: MTPHead, stochastic: bool = False, block_size: int | None = None) -> MTPDraft:
        if head.cfg.num_layers != 1:
            raise ConfigError(
                f"the engine chains a one-layer MTP head; this head has {head.cfg.num_layers} "
                "layers (num_nextn_predict_layers / mtp_num_hidden_layers)"
            )
        return cls(check_block(block_size, max(head.cfg.block_size, block_size or 0)), stochastic)

    # ------------------------------------------------------------------ committed state
    def init(self, head: MTPHead, batch: int, max_len: int, dtype: Any) -> MTPState:
        return MTPState(
            head.init_cache(batch, max_len + TREE_SLOTS, dtype),
            jnp.zeros((batch, head.cfg.hidden_size), dtype),
        )

    @staticmethod
    def _write(
        head: MTPHead,
        state: MTPState,
        emb_BTD: jax.Array,
        hid_BTD: jax.Array,
        new_lengths_B: jax.Array,
        pending_BD: jax.Array,
    ) -> MTPState:
        """The pairs (``hid[t]``, ``emb[t]``) written at the slots from the cache's length on; the
        cache then keeps ``new_lengths``."""
        cache = state.cache
        positions = cache.lengths[:, None] + jnp.arange(emb_BTD.shape[1])[None]
        _, cache = head(head.inputs(emb_BTD, hid_BTD), positions, cache)
        return MTPState(
            Cache(cache.layers, new_lengths_B.astype(jnp.int32), cache.max_len),
            pending_BD.astype(state.pending_BD.dtype),
        )

    def prefill(self, head: MTPHead, state: MTPState, hidden, prompt_lens_B):
        emb, hid = hidden  # [B, P, D] each: the prompt's embeddings and final-normed hidden states
        emb_next = jnp.pad(emb[:, 1:], ((0, 0), (0, 1), (0, 0)))  # slot P-1: padding, never kept
        last = jnp.take_along_axis(hid, (prompt_lens_B - 1)[:, None, None], axis=1)[:, 0]
        return self._write(head, state, emb_next, hid, prompt_lens_B - 1, last)

    def commit(self, head: MTPHead, state: MTPState, hidden, lengths_B, accepted_B):
        # Block rows: anchor (at lengths_B) + drafts. Slot lengths_B-1+i pairs hid[i-1] (i=0: the
        # pending one) with emb[i]; the anchor and the accepted drafts make accepted+1 real slots.
        emb, hid = hidden  # [B, Q, D]
        prev = jnp.concatenate([state.pending_BD[:, None].astype(hid.dtype), hid[:, :-1]], axis=1)
        last = jnp.take_along_axis(hid, accepted_B[:, None, None], axis=1)[:, 0]
        return self._write(head, state, emb, prev, lengths_B + accepted_B, last)

    # ------------------------------------------------------------------ chain
    def propose(
        self,
        head: MTPHead,
        target: Transformer,
        state: MTPState,
        step: StepInputs,
        key: jax.Array,
        sampling: SamplingParams,
    ) -> tuple[jax.Array, jax.Array | None]:
        cache, hid_B1D, token_B = state.cache, state.pending_BD[:, None], step.anchor_B
        drafts, qs = [], []
        for j in range(self.block_size - 1):  # scratch writes at slots L-1+j: never kept
            x = head.inputs(target.embed(token_B[:, None]), hid_B1D)
            hid_B1D, cache = head(x, cache.lengths[:, None], cache)
            logits_BV = target.unembed(hid_B1D.astype(target.embed_tokens.dtype))[:, 0]
            token_B, q = drafts_from_logits(
                logits_BV, None, self.stochastic, jax.random.fold_in(key, j), sampling
            )
            drafts.append(token_B)
            qs.append(q)
        return jnp.stack(drafts, axis=1), None if qs[0] is None else jnp.stack(qs, axis=1)

    # ------------------------------------------------------------------ dynamic tree
    def _logp(self, target: Transformer, y_BTD: jax.Array) -> jax.Array:
        logits = target.unembed(y_BTD.astype(target.embed_tokens.dtype))
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def tree_start(
        self, head: MTPHead, target: Transformer, state: MTPState, step: StepInputs
    ) -> tuple[jax.Array, TreeCarry]:
        x = head.inputs(target.embed(step.anchor_B[:, None]), state.pending_BD[:, None])
        positions = state.cache.lengths[:, None]
        y, _ = head(x, positions, state.cache)
        b = x.shape[0]
        carry = TreeCarry(state.cache, x, jnp.zeros((b, 1), jnp.int32), positions, y)
        return self._logp(target, y)[:, 0], carry

    def tree_expand(
        self,
        head: MTPHead,
        target: Transformer,
        carry: TreeCarry,
        tokens_BK: jax.Array,
        parents_BK: jax.Array,
        depth: int,
    ) -> tuple[jax.Array, TreeCarry]:
        k = tokens_BK.shape[1]
        parent_h = jnp.take_along_axis(carry.last_BKD, parents_BK[..., None], axis=1)
        x = jnp.concatenate([carry.x_BTD, head.inputs(target.embed(jnp.maximum(tokens_BK, 0)), parent_h)], 1)
        if x.shape[1] > TREE_SLOTS:
            raise ConfigError(
                f"a dynamic tree of {x.shape[1]} MTP nodes exceeds the head's {TREE_SLOTS} scratch slots"
            )
        first_prev = carry.x_BTD.shape[1] - carry.last_BKD.shape[1]  # where the last depth's nodes start
        parents = jnp.concatenate([carry.parents_BT, first_prev + parents_BK.astype(jnp.int32)], axis=1)
        positions = jnp.concatenate(
            [carry.positions_BT, carry.cache.lengths[:, None] + jnp.full((1, k), depth, jnp.int32)], axis=1
        )
        y, _ = head(x, positions, carry.cache, block_mask=ancestor_mask(parents))
        y_new = y[:, -k:]
        return self._logp(target, y_new), TreeCarry(carry.cache, x, parents, positions, y_new)
