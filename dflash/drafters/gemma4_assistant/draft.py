"""The engine's method for a Gemma 4 assistant: k chained steps per verify pass, all at the anchor's
position, reading the target's cache as committed (docs/design.md, "Gemma 4 assistant").

The assistant keeps no cache: its only state is ``h_{L-1}``, the target's final-normed hidden state at
the last committed position (``L`` tokens committed, the anchor at ``L``), the one whose LM head chose
the anchor. Step 1 reads (anchor, ``h_{L-1}``); step j reads (draft j-1, step j-1's projected output).
Every step's queries sit at position ``L`` and see the target's committed slots ``0 .. L-1`` (the
engine's rollback of the target cache therefore covers the drafter too). Tree nodes are independent
steps of the same kind (each from its parent's output), so a dynamic tree needs no scratch cache.
Shape letters: B rows, Q block, k = Q-1 drafts, D target width, V vocabulary, K tree nodes per depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs, StepwiseDraft
from dflash.decoding.methods import check_block, drafts_from_logits
from dflash.decoding.sampling import SamplingParams
from dflash.drafters.gemma4_assistant.model import Gemma4Assistant
from dflash.models.transformer import FINAL_NORMED, Transformer


class AssistantState(NamedTuple):
    pending_BD: jax.Array  # the target's final-normed hidden state at the last committed position


class TreeCarry(NamedTuple):
    kv: dict[str, tuple[jax.Array, jax.Array]]  # the target's committed keys and values per layer type
    lengths_B: jax.Array
    last_BKD: jax.Array  # the assistant's projected outputs at the nodes of the last depth fed


@dataclasses.dataclass(frozen=True)
class AssistantDraft(StepwiseDraft):
    """k = ``block_size - 1`` chained assistant steps; argmax drafts unless ``stochastic`` (then, when
    sampling, each draft is drawn from the assistant's processed distribution, which is returned)."""

    block_size: int
    stochastic: bool = False
    hidden_layers: tuple[int, ...] = (FINAL_NORMED,)
    mask_token_id: int | None = None

    @classmethod
    def of(
        cls, head: Gemma4Assistant, stochastic: bool = False, block_size: int | None = None
    ) -> AssistantDraft:
        return cls(check_block(block_size, max(head.cfg.block_size, block_size or 0)), stochastic)

    def init(self, head: Gemma4Assistant, batch: int, max_len: int, dtype: Any) -> AssistantState:
        return AssistantState(jnp.zeros((batch, head.cfg.backbone_hidden_size), dtype))

    @staticmethod
    def _at(hidden: jax.Array, index_B: jax.Array, state: AssistantState) -> AssistantState:
        last = jnp.take_along_axis(hidden[0], index_B[:, None, None], axis=1)[:, 0]
        return AssistantState(last.astype(state.pending_BD.dtype))

    def prefill(self, head, state: AssistantState, hidden, prompt_lens_B):
        return self._at(hidden, prompt_lens_B - 1, state)

    def commit(self, head, state: AssistantState, hidden, lengths_B, accepted_B):
        return self._at(hidden, accepted_B, state)  # block row i sits at lengths_B + i

    def _step(self, head: Gemma4Assistant, target: Transformer, kv, lengths_B, tokens_BT, hidden_BTD):
        """One step per (token, hidden) pair, all at the anchor's position: (logits, next hidden)."""
        positions = jnp.broadcast_to(lengths_B[:, None], tokens_BT.shape)
        y, h = head(target.embed(tokens_BT), hidden_BTD, positions, kv, lengths_B)
        return head.logits(y), h

    def propose(
        self,
        head: Gemma4Assistant,
        target: Transformer,
        state: AssistantState,
        step: StepInputs,
        key: jax.Array,
        sampling: SamplingParams,
    ) -> tuple[jax.Array, jax.Array | None]:
        kv, lengths = head.target_kv(target.cfg, step.target_cache), step.target_cache.lengths
        token_B, h_B1D = step.anchor_B, state.pending_BD[:, None]
        drafts, qs = [], []
        for j in range(self.block_size - 1):
            logits, h_B1D = self._step(head, target, kv, lengths, token_B[:, None], h_B1D)
            token_B, q = drafts_from_logits(
                logits[:, 0], None, self.stochastic, jax.random.fold_in(key, j), sampling
            )
            drafts.append(token_B)
            qs.append(q)
        return jnp.stack(drafts, axis=1), None if qs[0] is None else jnp.stack(qs, axis=1)

    # ------------------------------------------------------------------ dynamic tree
    def tree_start(
        self, head: Gemma4Assistant, target: Transformer, state: AssistantState, step: StepInputs
    ) -> tuple[jax.Array, TreeCarry]:
        kv, lengths = head.target_kv(target.cfg, step.target_cache), step.target_cache.lengths
        logits, h = self._step(head, target, kv, lengths, step.anchor_B[:, None], state.pending_BD[:, None])
        return jax.nn.log_softmax(logits[:, 0], axis=-1), TreeCarry(kv, lengths, h)

    def tree_expand(
        self,
        head: Gemma4Assistant,
        target: Transformer,
        carry: TreeCarry,
        tokens_BK: jax.Array,
        parents_BK: jax.Array,
        depth: int,
    ) -> tuple[jax.Array, TreeCarry]:
        parent_h = jnp.take_along_axis(carry.last_BKD, parents_BK[..., None], axis=1)
        logits, h = self._step(head, target, carry.kv, carry.lengths_B, jnp.maximum(tokens_BK, 0), parent_h)
        return jax.nn.log_softmax(logits, axis=-1), TreeCarry(carry.kv, carry.lengths_B, h)
