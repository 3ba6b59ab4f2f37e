"""The interface every draft method implements, written down (the engine relies on nothing else).

A method is a small frozen dataclass: hashable, so it is a static argument of the jitted
engine. The drafter's parameters, if any, travel separately as an nnx module (``drafter``),
and the method's own state is a pytree the engine carries through its ``lax.while_loop``
(every array with the batch row on axis 0, so compaction can drop rows). A chain method
(``ChainDraft``) proposes ``Q - 1`` drafts per step; a tree method (``TreeDraft``) a tree of
candidates verified in one pass. A chain method whose drafter proposes one token per sequential
step (``StepwiseDraft``) can also be drafted as an EAGLE-2 dynamic tree (``dynamic_tree.py``).
All are abstract: a method that does not implement its ``propose`` / ``propose_tree`` cannot be
constructed. ``NoDraft`` and ``NgramDraft`` are in
``methods.py``; the drafters' own methods live with their kinds (``dflash.drafters``).

Shape letters (docs/architecture.md): B rows, Q the block (anchor + k = Q-1 drafts), L token
buffer, V vocabulary, n feature layers, P prompt, T block rows, D model width.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import jax

from dflash.decoding.sampling import SamplingParams
from dflash.models.cache import Cache


class StepInputs(NamedTuple):
    """What a method may read when it proposes, besides its own state."""

    anchor_B: jax.Array  # the last emitted token (the block's first row)
    lengths_B: jax.Array  # committed tokens per row; the anchor sits at this position
    tokens_BL: jax.Array  # prompt + emitted tokens per row (the n-gram drafter reads it)
    total_B: jax.Array  # tokens in ``tokens_BL`` per row (the anchor is the last of them)
    target_cache: Cache  # the target's cache, committed prefix only (Orthrus drafts from it)


class DraftMethod(abc.ABC):
    """What the speculative engine needs from any draft method.

    ``block_size``, ``hidden_layers`` and ``mask_token_id`` are plain attributes (dataclass fields
    or properties of the method): the engine reads them as static values.
    """

    tree: ClassVar[bool] = False
    """True for tree methods: the engine calls ``propose_tree`` and verifies under an ancestor mask."""

    block_size: int
    """Anchor + drafts per verify step: a step accepts at most ``block_size - 1`` drafts."""

    hidden_layers: tuple[int, ...] = ()
    """Target layers whose hidden states ``prefill`` and ``commit`` receive (``()``: none)."""

    mask_token_id: int | None = None
    """The drafter's mask token, never emitted by verification; None if the method has none."""

    commit_tokens: ClassVar[bool] = False
    """True: ``prefill`` also gets the prompt tokens (``tokens_BP=``) and ``commit`` the verified
    tokens ``[anchor, d_1 ..]`` (``tokens_BQ=``, a tree: along the accepted path), for a drafter whose
    cached rows pair a position's features with the token after it (EAGLE-3)."""

    @property
    def verify_tokens(self) -> int:
        """Tokens the target scores per step (cache slots a step may write past the committed ones)."""
        return self.block_size

    def init(self, drafter: Any, batch: int, max_len: int, dtype: Any) -> Any:
        """The method's state for ``batch`` rows of ``max_len`` cache slots (``()`` if stateless)."""
        return ()

    def prefill(self, drafter: Any, state: Any, hidden: jax.Array | None, prompt_lens_B: jax.Array) -> Any:
        """State after the prompt; ``hidden``: ``[n, B, P, D]`` target features of the prompt (or None)."""
        return state

    def commit(self, drafter: Any, state: Any, hidden: jax.Array | None, lengths_B: jax.Array,
               accepted_B: jax.Array) -> Any:
        """State after a verify step that accepted ``accepted_B`` drafts; ``hidden``: features of the
        verified block (a tree: along the accepted path), ``[n, B, T, D]``."""
        return state


class ChainDraft(DraftMethod):
    """A method that drafts one chain of ``Q - 1`` tokens per step."""

    @abc.abstractmethod
    def propose(self, drafter: Any, target: Any, state: Any, step: StepInputs, key: jax.Array,
                sampling: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
        """Drafts ``[B, Q-1]`` int32 after ``step.anchor_B`` and their proposal probabilities
        ``[B, Q-1, V]``, or None when the drafts are deterministic."""


class StepwiseDraft(ChainDraft):
    """A chain method whose drafter proposes one token per sequential step; the dynamic tree
    (decoding/dynamic_tree.py) calls these two instead of ``propose``."""

    @abc.abstractmethod
    def tree_start(self, drafter, target, state, step: StepInputs) -> tuple[jax.Array, Any]:
        """``(logp_BV, carry)``: float32 log-probabilities (over the TARGET vocabulary, -inf where the
        drafter cannot propose, e.g. outside a reduced draft vocabulary) of the token after
        ``step.anchor_B``, and the drafter's carry for expanding the tree (its scratch KV for tree
        nodes etc.; a pytree of arrays, static shapes)."""

    @abc.abstractmethod
    def tree_expand(self, drafter, target, carry, tokens_BK: jax.Array, parents_BK: jax.Array,
                    depth: int) -> tuple[jax.Array, Any]:
        """Feed K new tree nodes at ``depth`` (1-based; their position is ``lengths_B + depth``):
        ``tokens_BK`` int32, ``parents_BK`` int32 = the index of each node's parent among the K nodes
        fed at ``depth - 1`` (for depth 1: all 0 = the anchor/root). Each node attends to the
        committed context and to its own ancestors only (the tree mask). Returns ``logp_BKV`` (the
        distribution of the token after each node, as in tree_start) and the new carry. K is the
        same static value at every depth >= 1 (the tree's top-k); ``depth`` is a Python int."""


class TreeDraft(DraftMethod):
    """A method that drafts a tree of candidates (``decoding.tree.Tree``) per step."""

    tree: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def depth(self) -> int:
        """Drafts along a path (``block_size - 1``)."""

    @abc.abstractmethod
    def propose_tree(self, drafter: Any, target: Any, state: Any, step: StepInputs) -> Any:
        """The tree to verify: anchor first, every node after its parent."""
