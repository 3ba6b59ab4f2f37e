"""EAGLE-2's dynamic draft tree with static shapes (docs/design.md §7, "Dynamic trees").

A stepwise drafter (``method.StepwiseDraft``: EAGLE-3, MTP) drafts one token per sequential step,
so it can grow a tree where the draft is confident and prune it where it is not. With depth ``d``,
top-k ``k`` and ``N`` verified nodes (the root, i.e. the anchor, excluded, as EAGLE's
``total_token``; the target scores ``N + 1`` tokens):

- the root's ``k`` likeliest tokens are level 1 (a node's score is the sum of the draft's
  log-probabilities along its path: its cumulative draft log-prob);
- at each depth ``j < d`` the frontier (level 1 at ``j = 1``, else the ``k`` best of the ``k*k``
  candidates made at ``j``) is fed to the drafter (``tree_expand``); each frontier node proposes
  its ``k`` likeliest children (distinct tokens), the ``k*k`` candidates at depth ``j + 1``;
- the candidate pool is level 1 plus every depth's ``k*k`` candidates, ``k + (d-1)k^2`` nodes in
  pool order (by depth, then frontier rank, then child rank); the tree is the ``N`` best pool
  nodes by score, ties to the earlier pool node, laid out in pool order.

Why the selection is prefix-closed (a selected node's parent is selected): rank the pool by
(score descending, pool index ascending), a total order; the tree is its first ``N`` nodes. A
child's score is its parent's plus a log-probability, clamped to <= 0, so score(child) <=
score(parent); and its parent is earlier in the pool (a smaller depth). So the parent ranks
strictly before the child: higher score, or equal score and smaller index. The first ``N`` of
a total order then hold every selected node's parent. ``lax.top_k`` breaks ties to the lower
index, which is exactly this order. The same holds for the frontiers: each is the top ``k`` of
one depth's candidates in the same order.

Lossless verification (``tree.verify_tree``, greedy or sampled with sibling rejection) needs
distinct siblings: a node's children are distinct entries of one top-k. A child the draft cannot
propose (log-prob -inf: the mask token, outside a reduced draft vocabulary, or fewer than ``k``
proposable tokens) gets score -inf and is blanked (token -1, never accepted); its subtree is
-inf too. Shapes: ``B`` rows, ``K`` top-k, ``V`` vocabulary, ``P`` pool, ``T = 1 + N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs, StepwiseDraft, TreeDraft
from dflash.decoding.tree import Tree, top_few
from dflash.errors import ConfigError

Expand = Callable[[jax.Array, jax.Array, int], jax.Array]
"""``(tokens_BK, parents_BK, depth) -> logp_BKV``: the drafter fed one frontier (its carry closed over)."""


def pool_size(depth: int, top_k: int) -> int:
    """Candidate nodes of a dynamic tree: level 1 plus ``top_k**2`` per deeper level."""
    return top_k + (depth - 1) * top_k * top_k


def check_shape(depth: int, top_k: int, total: int) -> None:
    """``total`` verified nodes must fit the candidate pool (a one-line ``ConfigError`` if not)."""
    if depth < 1 or top_k < 1:
        raise ConfigError(f"dynamic tree depth and top-k must be >= 1, got depth {depth}, top-k {top_k}")
    if not 1 <= total <= pool_size(depth, top_k):
        raise ConfigError(f"dynamic tree total tokens must be in 1..{pool_size(depth, top_k)} (the candidate "
                          f"pool of depth {depth}, top-k {top_k}), got {total}")


def dynamic_tree(anchor_B: jax.Array, logp_BV: jax.Array, expand: Expand, depth: int, top_k: int,
                 total: int, mask_token_id: int | None = None) -> Tree:
    """The ``total`` best nodes of the EAGLE-2 candidate pool, as a ``Tree`` (root first)."""
    b, v = logp_BV.shape
    if top_k > v:
        raise ConfigError(f"dynamic tree top-k {top_k} exceeds the vocabulary ({v})")
    check_shape(depth, top_k, total)

    def clean(logp: jax.Array) -> jax.Array:  # never the mask; <= 0 keeps scores monotone
        logp = jnp.minimum(logp.astype(jnp.float32), 0.0)
        return logp if mask_token_id is None else logp.at[..., mask_token_id].set(-jnp.inf)

    score_BK, tok_BK = top_few(clean(logp_BV), top_k)  # level 1, by score then token
    scores, tokens = [score_BK], [tok_BK]
    parents = [jnp.full((b, top_k), -1, jnp.int32)]  # pool index of the parent (-1: the root)
    depths = [jnp.ones((b, top_k), jnp.int32)]
    front_pool_BK = jnp.broadcast_to(jnp.arange(top_k, dtype=jnp.int32), (b, top_k))
    front_parent_BK = jnp.zeros((b, top_k), jnp.int32)  # level 1 hangs below the root
    offset = top_k
    for level in range(1, depth):  # feed the frontier at ``level``, make the candidates at ``level + 1``
        logp_BKV = expand(tok_BK, front_parent_BK, level)
        child_lp_BKK, child_tok_BKK = top_few(clean(logp_BKV), top_k)
        cand_BC = (score_BK[:, :, None] + child_lp_BKK).reshape(b, top_k * top_k)  # C = K*K, frontier-major
        cand_tok_BC = child_tok_BKK.reshape(b, top_k * top_k)
        scores.append(cand_BC)
        tokens.append(cand_tok_BC)
        parents.append(jnp.repeat(front_pool_BK, top_k, axis=1))
        depths.append(jnp.full((b, top_k * top_k), level + 1, jnp.int32))
        score_BK, pick_BK = jax.lax.top_k(cand_BC, top_k)  # the next frontier; ties to the lower index
        pick_BK = pick_BK.astype(jnp.int32)
        tok_BK = jnp.take_along_axis(cand_tok_BC, pick_BK, axis=1)
        front_parent_BK = pick_BK // top_k  # its parent's rank in the frontier fed at ``level``
        front_pool_BK = offset + pick_BK
        offset += top_k * top_k
    score_BP, tok_BP, parent_BP, depth_BP = (jnp.concatenate(x, axis=1)
                                             for x in (scores, tokens, parents, depths))
    _, chosen_BN = jax.lax.top_k(score_BP, total)
    chosen_BN = jnp.sort(chosen_BN.astype(jnp.int32), axis=1)  # pool order: parents first
    rows_B1 = jnp.arange(b)[:, None]
    slot_BP = jnp.zeros(score_BP.shape, jnp.int32).at[rows_B1, chosen_BN].set(jnp.arange(1, total + 1))
    parent_BN = jnp.take_along_axis(parent_BP, chosen_BN, axis=1)
    parent_slot_BN = jnp.where(parent_BN < 0, 0,
                               jnp.take_along_axis(slot_BP, jnp.maximum(parent_BN, 0), axis=1))
    node_tok_BN = jnp.where(jnp.take_along_axis(score_BP, chosen_BN, axis=1) == -jnp.inf, -1,
                            jnp.take_along_axis(tok_BP, chosen_BN, axis=1))
    zeros_B1 = jnp.zeros((b, 1), jnp.int32)
    return Tree(tokens=jnp.concatenate([anchor_B[:, None].astype(jnp.int32), node_tok_BN], axis=1),
                parents=jnp.concatenate([zeros_B1, parent_slot_BN], axis=1),
                depth=jnp.concatenate([zeros_B1, jnp.take_along_axis(depth_BP, chosen_BN, axis=1)], axis=1))


@dataclasses.dataclass(frozen=True)
class DynamicTreeDraft(TreeDraft):
    """A stepwise chain method drafted as an EAGLE-2 dynamic tree (greedy, or sampling with
    sibling rejection). The depth is the chain's (``block_size - 1``: build the chain with the block
    you want, as ``drafters.dynamic_tree_method_for`` does), so acceptance lengths compare with
    chain drafting; ``verify_tokens`` is the tree (anchor + ``total_tokens``). The chain's own state
    is handled exactly as for a chain (init / prefill / commit, fed the accepted path's features):
    the tree lives only in the drafter's scratch carry."""

    chain: StepwiseDraft
    top_k: int = 10
    total_tokens: int = 60

    @classmethod
    def around(cls, chain: Any, top_k: int = 10, total_tokens: int = 60, label: str | None = None
               ) -> DynamicTreeDraft:
        """The dynamic-tree version of a stepwise chain method; ``label``: how errors name its drafter."""
        if not isinstance(chain, StepwiseDraft):
            name = label or type(chain).__name__
            raise ConfigError(f"dynamic tree needs a drafter that drafts one token per step (EAGLE-3, MTP); "
                              f"{name} drafts a block: use --tree-width")
        depth = chain.block_size - 1
        check_shape(depth, top_k, total_tokens)
        return cls(chain, top_k, total_tokens)

    @property
    def block_size(self) -> int:
        return self.chain.block_size

    @property
    def depth(self) -> int:
        return self.chain.block_size - 1

    @property
    def mask_token_id(self) -> int | None:
        return self.chain.mask_token_id

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.chain.hidden_layers

    @property
    def verify_tokens(self) -> int:
        return 1 + self.total_tokens

    @property
    def commit_tokens(self) -> bool:  # the chain's: the engine then hands over the accepted path's tokens
        return self.chain.commit_tokens

    def init(self, drafter, batch: int, max_len: int, dtype) -> Any:
        return self.chain.init(drafter, batch, max_len, dtype)

    def prefill(self, drafter, state, hidden, prompt_lens_B, **tokens):
        return self.chain.prefill(drafter, state, hidden, prompt_lens_B, **tokens)

    def commit(self, drafter, state, hidden_path, lengths_B, accepted_B, **tokens):
        return self.chain.commit(drafter, state, hidden_path, lengths_B, accepted_B, **tokens)

    def propose_tree(self, drafter, target, state, step: StepInputs) -> Tree:
        logp_BV, carry = self.chain.tree_start(drafter, target, state, step)

        def expand(tokens_BK, parents_BK, depth):
            nonlocal carry
            logp_BKV, carry = self.chain.tree_expand(drafter, target, carry, tokens_BK, parents_BK, depth)
            return logp_BKV

        return dynamic_tree(step.anchor_B, logp_BV, expand, self.depth, self.top_k, self.total_tokens,
                            self.chain.mask_token_id)
