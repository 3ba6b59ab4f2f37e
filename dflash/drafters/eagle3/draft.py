"""The engine's method for an EAGLE-3 drafter: its own KV cache of committed rows, k chained steps.

Cache invariant (docs/design.md, "EAGLE-3"): with ``L`` committed tokens (the anchor at ``L``),
the drafter's cache holds rows ``0 .. L-2`` (row ``t`` = target features at ``t`` + token ``t+1``)
and the state keeps the features at ``L-1``, whose partner, the anchor, is only known when
drafting. A draft step ``j`` is the row at ``L-1+j``: step 0 pairs those features with the anchor;
step ``j > 0`` pairs the drafter's own output at step ``j-1`` with the token it drafted. Draft rows
are scratch (never kept); ``commit`` writes the verified rows from the target's features.

Shape letters: B rows, Q block (anchor + drafts), P prompt, n feature layers, D width, V vocabulary,
K tree nodes per depth, R scratch rows.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs, StepwiseDraft
from dflash.decoding.methods import check_block, drafts_from_logits
from dflash.drafters.eagle3.model import Eagle3Drafter
from dflash.models.cache import Cache


class Eagle3State(NamedTuple):
    cache: Cache  # rows 0 .. L-2 (lengths = L-1)
    feats_BnD: jax.Array  # the target's features at L-1, waiting for the anchor


class TreeCarry(NamedTuple):
    cache: Cache  # the committed rows (read only)
    scratch_k: jax.Array  # [B, R, K, H]: the root and every tree node fed so far
    scratch_v: jax.Array
    sees_BKR: jax.Array  # the last fed nodes' ancestors (themselves included) among the scratch rows
    hidden_BKD: jax.Array  # their pre-norm outputs, fed to their children
    base_B: jax.Array  # the root row's position (L-1)


def features(hidden_nBTD: jax.Array) -> jax.Array:
    n, b, t, d = hidden_nBTD.shape
    return jnp.transpose(hidden_nBTD, (1, 2, 0, 3)).reshape(b, t, n * d)


@dataclasses.dataclass(frozen=True)
class Eagle3Draft(StepwiseDraft):
    """Chained one-token steps; argmax drafts, or (``stochastic`` and sampling) drafts drawn from the
    drafter's processed distribution q, returned with q (verification stays lossless)."""

    block_size: int
    hidden_layers: tuple[int, ...]
    stochastic: bool = False
    commit_tokens = True
    mask_token_id = None

    @classmethod
    def of(cls, drafter: Eagle3Drafter, stochastic: bool = False,
           block_size: int | None = None) -> Eagle3Draft:
        return cls(check_block(block_size, drafter.cfg.block_size), tuple(drafter.cfg.target_layer_ids),
                   stochastic)

    def init(self, drafter: Eagle3Drafter, batch: int, max_len: int, dtype) -> Eagle3State:
        n = len(self.hidden_layers) * drafter.cfg.hidden_size
        return Eagle3State(drafter.init_cache(batch, max_len, dtype), jnp.zeros((batch, n), dtype))

    def _write(self, drafter: Eagle3Drafter, state: Eagle3State, feats_BTnD, tokens_BT,
               kept_B) -> Eagle3State:
        """Rows ``len .. len+T-1`` (features ``feats[:, i]`` with ``tokens[:, i]``); keeps ``kept_B``
        of them and holds the features after them for the next anchor."""
        cache = state.cache
        positions = cache.lengths[:, None] + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None]
        _, cache = drafter.extend(cache, drafter.embed(tokens_BT), drafter.project(feats_BTnD), positions,
                                  cache.lengths + kept_B)
        return Eagle3State(cache, state.feats_BnD)

    def prefill(self, drafter: Eagle3Drafter, state: Eagle3State, hidden, prompt_lens_B, *, tokens_BP):
        feats = features(hidden)  # [B, P, nD]: rows t = 0 .. P-2 pair them with tokens t+1
        nxt = jnp.pad(tokens_BP[:, 1:], ((0, 0), (0, 1)))
        state = self._write(drafter, state, feats.astype(state.feats_BnD.dtype), nxt, prompt_lens_B - 1)
        last = jnp.take_along_axis(feats, (prompt_lens_B - 1)[:, None, None], axis=1)[:, 0]
        return Eagle3State(state.cache, last.astype(state.feats_BnD.dtype))

    def commit(self, drafter: Eagle3Drafter, state: Eagle3State, hidden, lengths_B, accepted_B, *, tokens_BQ):
        # Rows L-1 .. L-1+a: the held features, then the block's, each with the verified token after it.
        feats = features(hidden).astype(state.feats_BnD.dtype)  # [B, Q, nD] at L .. L+Q-1
        rows = jnp.concatenate([state.feats_BnD[:, None], feats[:, :-1]], axis=1)
        state = self._write(drafter, state, rows, tokens_BQ, accepted_B + 1)
        held = jnp.take_along_axis(feats, accepted_B[:, None, None], axis=1)[:, 0]  # features at L+a
        return Eagle3State(state.cache, held)

    def propose(self, drafter: Eagle3Drafter, target, state: Eagle3State, step: StepInputs, key, sampling):
        cache = state.cache
        emb, hid = drafter.embed(step.anchor_B)[:, None], drafter.project(state.feats_BnD)[:, None]
        drafts, qs = [], []
        for j in range(self.block_size - 1):
            h, cache = drafter.extend(cache, emb, hid, cache.lengths[:, None], cache.lengths + 1)
            tok, q = drafts_from_logits(drafter.target_logits(h), None, self.stochastic,
                                        jax.random.fold_in(key, j), sampling)
            drafts.append(tok[:, 0])
            qs.append(q)
            emb, hid = drafter.embed(tok), h
        q_BkV = None if qs[0] is None else jnp.concatenate(qs, axis=1)
        return jnp.stack(drafts, axis=1), q_BkV

    # ------------------------------------------------------------------ the dynamic tree's protocol
    def tree_start(self, drafter: Eagle3Drafter, target, state: Eagle3State, step: StepInputs
                   ) -> tuple[jax.Array, TreeCarry]:
        cache = state.cache
        b = step.anchor_B.shape[0]
        lc = drafter.layer_cfg
        empty = jnp.zeros((b, 0, lc.num_kv_heads, lc.head_dim), cache.layers[0].k.dtype)
        sees = jnp.ones((b, 1, 1), bool)
        h, (k_s, v_s) = drafter.scratch_rows(cache, drafter.embed(step.anchor_B)[:, None],
                                             drafter.project(state.feats_BnD)[:, None],
                                             cache.lengths[:, None], (empty, empty), sees)
        logp = jax.nn.log_softmax(drafter.target_logits(h[:, 0]), axis=-1)
        return logp, TreeCarry(cache, k_s, v_s, sees, h, cache.lengths)

    def tree_expand(self, drafter: Eagle3Drafter, target, carry: TreeCarry, tokens_BK, parents_BK, depth: int
                    ) -> tuple[jax.Array, TreeCarry]:
        b, k = tokens_BK.shape
        parent_sees = jnp.take_along_axis(carry.sees_BKR, parents_BK[:, :, None], axis=1)  # [B, K, R]
        sees = jnp.concatenate([parent_sees, jnp.broadcast_to(jnp.eye(k, dtype=bool), (b, k, k))], axis=-1)
        hid = jnp.take_along_axis(carry.hidden_BKD, parents_BK[:, :, None], axis=1)
        positions = jnp.broadcast_to((carry.base_B + depth)[:, None], (b, k))
        h, (k_s, v_s) = drafter.scratch_rows(carry.cache, drafter.embed(tokens_BK), hid, positions,
                                             (carry.scratch_k, carry.scratch_v), sees)
        logp = jax.nn.log_softmax(drafter.target_logits(h), axis=-1)
        return logp, carry._replace(scratch_k=k_s, scratch_v=v_s, sees_BKR=sees, hidden_BKD=h)
