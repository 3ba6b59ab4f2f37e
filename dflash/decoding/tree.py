"""Tree drafting and tree verification, greedy and sampled (docs/design.md §7 "Trees").

A drafter's block pass (DFlash, Orthrus) gives a distribution for every position ``p+1 .. p+D``.
Instead of one
chain of argmaxes, we keep the ``W`` best partial paths at every depth (beam search over the
per-position log-probabilities): ``W * D`` nodes, laid out level by level, so every node's parent
comes before it and the tree is prefix-closed by construction. The argmax chain is always beam 0,
so a tree never accepts fewer tokens than the chain from the same state.

The target verifies ``[anchor, nodes...]`` in one pass: positions are ``len + depth`` and each
node sees the committed prefix plus its ancestors (the ancestor mask). Each node gets the target's
choice of the token after it: the argmax (greedy) or one independent sample from the processed
target distribution there (sampling). A node is accepted when its token is its parent's choice
and its parent is accepted; the deepest accepted node wins and its own choice is the bonus token.
Its path's entries are then moved so the cache looks exactly as if the chain had been verified
(``Cache.commit_path``).

Sampling is lossless: siblings are distinct tokens (each beam's children are distinct top-k
entries), so at most one child matches a node's sample and the emitted tokens are a chain of
draws from p, each given the tokens before it. This is the recursive rejection over siblings of
docs/design.md §7 for deterministic candidates: rejecting sibling c (q one-hot) leaves p with c
removed and renormalised, so trying the siblings in turn and sampling the residual draws
exactly one token from p.

A prompt-lookup chain can be grafted on as one more branch (``graft_chain``): the drafter and
the n-gram drafter fail in different places (the drafter in loops it has not learned, lookup on
novel text), and the target scores both in the same pass, so a step accepts the longer of the two.
The chain shares the tree's nodes where it agrees with a tree path and branches off below the
deepest agreeing node, so siblings stay distinct and sampling stays lossless.

Shapes: ``B`` rows, ``W`` beam width, ``D`` depth, ``T = 1 + W*D`` tree tokens (root first), plus
``D`` when a chain is grafted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs, TreeDraft
from dflash.decoding.methods import LogitsDraft, NgramDraft
from dflash.errors import ConfigError


class Tree(NamedTuple):
    tokens: jax.Array  # [B, T] int32: the anchor, then the nodes level by level
    parents: jax.Array  # [B, T] int32: block index of each node's parent (root: 0)
    depth: jax.Array  # [B, T] int32: 0 for the root, 1..D for nodes


def top_few(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` over the last axis for a small ``k``, as ``k`` argmax passes.

    XLA:CPU turns a ``top_k`` over a ``[B, D, V]`` array into a full sort of every row (4.7 ms per
    drafted block for V = 4096 here, against 0.1 ms for a few argmaxes). Ties go to the lower
    index, as in ``top_k``.
    """
    vals, idx = [], []
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    for _ in range(k):
        i = jnp.argmax(x, axis=-1).astype(jnp.int32)
        vals.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
        idx.append(i)
        x = jnp.where(iota == i[..., None], -jnp.inf, x)
    return jnp.stack(vals, axis=-1), jnp.stack(idx, axis=-1)


def beam_tree(anchor_B: jax.Array, logp_BDV: jax.Array, width: int) -> Tree:
    """The ``width`` best paths (sum of per-position log-probs) at every depth, as one tree."""
    b, d, _ = logp_BDV.shape
    top_lp_BDW, top_tok_BDW = top_few(logp_BDV, width)  # best children per position
    score_BW = top_lp_BDW[:, 0]  # level 1: the W best tokens at position p+1
    tokens, parents = [top_tok_BDW[:, 0]], [jnp.zeros((b, width), jnp.int32)]
    for level in range(1, d):
        cand_BWW = score_BW[:, :, None] + top_lp_BDW[:, level][:, None, :]  # [B, beam, child]
        score_BW, flat_BW = jax.lax.top_k(cand_BWW.reshape(b, width * width), width)
        beam_BW, child_BW = flat_BW // width, flat_BW % width
        tokens.append(jnp.take_along_axis(top_tok_BDW[:, level], child_BW, axis=1))
        parents.append(1 + (level - 1) * width + beam_BW)  # block index of the kept beam's node
    depth_T = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                               jnp.repeat(jnp.arange(1, d + 1, dtype=jnp.int32), width)])
    return Tree(
        tokens=jnp.concatenate([anchor_B[:, None], *tokens], axis=1).astype(jnp.int32),
        parents=jnp.concatenate([jnp.zeros((b, 1), jnp.int32), *parents], axis=1).astype(jnp.int32),
        depth=jnp.broadcast_to(depth_T, (b, 1 + width * d)),
    )


def along_paths(parents_BT: jax.Array, node_ok_BT: jax.Array) -> jax.Array:
    """``[B, T]``: node t holds iff ``node_ok`` holds at t and at all its ancestors except the root."""
    b, t = parents_BT.shape

    def follow(i, ok):
        parent_ok = jnp.take_along_axis(ok, parents_BT[:, i][:, None], axis=1)[:, 0]
        return ok.at[:, i].set(jnp.where(i > 0, parent_ok & node_ok_BT[:, i], True))

    return jax.lax.fori_loop(0, t, follow, jnp.zeros((b, t), bool))


def graft_chain(tree: Tree, chain_BD: jax.Array) -> Tree:
    """``tree`` plus the candidate chain ``chain_BD`` (-1: no candidate) as one more branch.

    The deepest tree node whose root path spells ``chain[:c]`` is shared: the chain's first ``c``
    nodes are blanked (-1, never accepted) and node ``c+1`` hangs below the shared node, so no
    node has two children with the same token. Chain node i sits at block index ``T + i - 1``.
    """
    b, t = tree.tokens.shape
    d = chain_BD.shape[1]
    want_BT = jnp.take_along_axis(chain_BD, jnp.maximum(tree.depth - 1, 0), axis=1)  # chain token there
    on_BT = along_paths(tree.parents, tree.tokens == want_BT)  # root paths that spell a chain prefix
    shared_B = jnp.argmax(jnp.where(on_BT, tree.depth, -1), axis=1).astype(jnp.int32)  # one per depth
    c_B = jnp.take_along_axis(tree.depth, shared_B[:, None], axis=1)  # [B, 1] agreeing depth
    i_D = jnp.arange(1, d + 1, dtype=jnp.int32)[None]
    own_parent_D = jnp.where(i_D == 1, 0, t + i_D - 2)  # the previous chain node (node 1: the root)
    return Tree(
        tokens=jnp.concatenate([tree.tokens, jnp.where(i_D <= c_B, -1, chain_BD)], axis=1).astype(jnp.int32),
        parents=jnp.concatenate([tree.parents, jnp.where(i_D == c_B + 1, shared_B[:, None], own_parent_D)],
                                axis=1).astype(jnp.int32),
        depth=jnp.concatenate([tree.depth, jnp.broadcast_to(i_D, (b, d))], axis=1),
    )


def ancestor_mask(parents_BT: jax.Array) -> jax.Array:
    """``[B, T, T]``: node t sees node s iff s is t or one of its ancestors (parents come first)."""
    b, t = parents_BT.shape
    eye = jnp.eye(t, dtype=bool)

    def add(i, mask):
        row = jnp.take_along_axis(mask, parents_BT[:, i][:, None, None], axis=1)[:, 0]  # parent's row
        return mask.at[:, i].set(jnp.where(i > 0, row | eye[i], eye[i]))

    return jax.lax.fori_loop(0, t, add, jnp.broadcast_to(eye, (b, t, t)))


class TreeVerdict(NamedTuple):
    accepted: jax.Array  # [B] accepted nodes on the chosen path (its depth)
    path: jax.Array  # [B, D+1] block indices of the path, root first; entries past ``accepted`` repeat
    extra: jax.Array  # [B] the target's choice after the path's last node (the bonus token)


def verify_tree(choice_BT: jax.Array, tree: Tree, max_depth: int, mask_id: int) -> TreeVerdict:
    """Deepest node whose every token on its root path is its parent's choice.

    ``choice_BT``: the target's token after every node, the argmax or one independent sample per
    node (``sampling.sample`` over the tree's logits ``[B, T, V]``).
    """
    b = tree.tokens.shape[0]
    expected_BT = jnp.take_along_axis(choice_BT, tree.parents, axis=1)  # what the target says there
    ok_BT = along_paths(tree.parents, (tree.tokens == expected_BT) & (tree.tokens != mask_id))
    reach_BT = jnp.where(ok_BT, tree.depth, -1)
    best_B = jnp.argmax(reach_BT, axis=1).astype(jnp.int32)  # first of the deepest accepted nodes
    accepted = jnp.take_along_axis(tree.depth, best_B[:, None], axis=1)[:, 0]

    def climb(_, carry):
        node, path = carry  # walk from the best node to the root, filling path[depth(node)]
        d = jnp.take_along_axis(tree.depth, node[:, None], axis=1)[:, 0]
        path = path.at[jnp.arange(b), d].set(node)
        return jnp.take_along_axis(tree.parents, node[:, None], axis=1)[:, 0], path

    path0 = jnp.broadcast_to(best_B[:, None], (b, max_depth + 1))
    _, path = jax.lax.fori_loop(0, max_depth + 1, climb, (best_B, path0))
    return TreeVerdict(accepted, path, jnp.take_along_axis(choice_BT, best_B[:, None], axis=1)[:, 0])


def gather_path(x_nBTD: jax.Array, path_BP: jax.Array) -> jax.Array:
    """``[n, B, P, D]``: per-node activations (e.g. target hidden states) along the path."""
    return jnp.take_along_axis(x_nBTD, path_BP[None, :, :, None], axis=2)


@dataclasses.dataclass(frozen=True)
class BeamTreeDraft(TreeDraft):
    """A chain method's per-position distributions drafted as a beam tree instead of a chain
    (greedy, or sampling with sibling rejection).

    One pass of the chain's drafter gives the block's ``depth`` distributions
    (``chain.draft_logits``); the tree keeps ``width`` paths per depth. With ``lookup`` (an
    ``NgramDraft``), the prompt-lookup chain is grafted on as one more branch (``graft_chain``).
    ``block_size`` is the chain-equivalent block (anchor + ``depth``), so acceptance lengths
    compare with chain drafting; ``verify_tokens`` is what the target scores per step. The
    chain's own state is handled exactly as for a chain, fed with the hidden states of the
    accepted path.
    """

    chain: LogitsDraft  # block_size = depth + 1
    width: int
    lookup: NgramDraft | None = None  # with the same block size

    @classmethod
    def around(cls, chain: Any, width: int, lookup: bool = False) -> BeamTreeDraft:
        """The tree version of a chain method (one whose drafts are the argmax of per-position logits)."""
        if not isinstance(chain, LogitsDraft) or chain.stochastic:
            kind = "stochastic drafts" if isinstance(chain, LogitsDraft) else type(chain).__name__
            raise ConfigError(f"tree drafting (--tree-width, --ngram-branch) needs a drafter with "
                              f"argmax drafts of per-position distributions, not {kind}")
        if width < 1:
            raise ConfigError(f"tree width must be >= 1, got {width}")
        return cls(chain, width, NgramDraft(block_size=chain.block_size) if lookup else None)

    @property
    def block_size(self) -> int:
        return self.chain.block_size

    @property
    def mask_token_id(self) -> int | None:
        return self.chain.mask_token_id

    @property
    def depth(self) -> int:
        return self.chain.block_size - 1

    @property
    def verify_tokens(self) -> int:
        return 1 + (self.width + (self.lookup is not None)) * self.depth

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.chain.hidden_layers

    def init(self, drafter, batch: int, max_len: int, dtype) -> Any:
        return self.chain.init(drafter, batch, max_len, dtype)

    def prefill(self, drafter, state, hidden, prompt_lens_B):
        return self.chain.prefill(drafter, state, hidden, prompt_lens_B)

    def propose_tree(self, drafter, target, state, step: StepInputs) -> Tree:
        logits = self.chain.draft_logits(drafter, target, state, step)  # [B, D, V]
        if self.chain.mask_token_id is not None:
            logits = logits.at[..., self.chain.mask_token_id].set(-jnp.inf)  # never proposed
        tree = beam_tree(step.anchor_B, jax.nn.log_softmax(logits, axis=-1), self.width)
        if self.lookup is None:
            return tree
        return graft_chain(tree, self.lookup.lookup(step.tokens_BL, step.total_B))

    def commit(self, drafter, state, hidden_path, lengths_B, accepted_B):
        return self.chain.commit(drafter, state, hidden_path, lengths_B, accepted_B)
