"""The interface every draft method implements, written down (the engine relies on nothing else).

A method is a small frozen dataclass: hashable, so it is a static argument of the jitted
engine. The drafter's parameters, if any, travel separately as an nnx module (``drafter``),
and the method's own state is a pytree the engine carries through its ``lax.while_loop``.
``NoDraft``, ``NgramDraft``, ``DFlashDraft``, ``OrthrusDraft`` (``drafters.py``) and
``DFlashTreeDraft`` (``tree.py``) all derive from ``DraftMethod``; the engine
(``speculative.py``) reads only the members below.

Shape letters (docs/architecture.md): B rows, Q the block (anchor + k = Q-1 drafts), L token
buffer, V vocabulary, n feature layers, P prompt, T block rows, D model width.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax

from dflash import cache as kvc
from dflash.decoding.sampling import SamplingParams


@runtime_checkable
class DraftMethod(Protocol):
    """What the speculative engine needs from a draft method.

    A tree method (``tree = True``, ``tree.DFlashTreeDraft``) also has ``depth`` (drafts along a
    path) and ``propose_tree(drafter, target, state, anchor_B, tokens_BL, total_B) -> Tree``,
    which the engine calls instead of ``propose``.
    """

    block_size: int
    """Anchor + drafts per verify step: a step accepts at most ``block_size - 1`` drafts."""

    tree: ClassVar[bool] = False
    """True for tree methods: the engine calls ``propose_tree`` and verifies under an ancestor mask."""

    reads_target_cache: ClassVar[bool] = False
    """True if ``propose`` needs the target's KV cache (Orthrus); it is then passed as ``target_cache=``."""

    hidden_layers: tuple[int, ...]
    """Target layers whose hidden states ``prefill`` and ``commit`` receive (``()``: none). Declared
    here, set by each method (a dataclass field or a class attribute)."""

    mask_token_id: int = -1
    """The drafter's mask token, never emitted by verification; -1 if the method has none."""

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

    def propose(self, drafter: Any, target: Any, state: Any, anchor_B: jax.Array, lengths_B: jax.Array,
                tokens_BL: jax.Array, total_B: jax.Array, key: jax.Array, sampling: SamplingParams,
                **target_cache: kvc.KVCache) -> tuple[jax.Array, jax.Array | None]:
        """Drafts ``[B, Q-1]`` int32 after ``anchor_B`` (committed tokens: ``lengths_B``; buffer
        ``tokens_BL`` holds ``total_B`` tokens), and their proposal probabilities ``[B, Q-1, V]``,
        or None when the drafts are deterministic. Chain methods only."""
        ...

    def commit(self, drafter: Any, state: Any, hidden: jax.Array | None, lengths_B: jax.Array,
               accepted_B: jax.Array) -> Any:
        """State after a verify step that accepted ``accepted_B`` drafts; ``hidden``: features of the
        verified block (a tree: along the accepted path), ``[n, B, T, D]``."""
        return state
