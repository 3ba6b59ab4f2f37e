"""The engine's method for a DFlash drafter: its own context-only cache, fed by verified features.

Shape letters: B rows, T block rows, n feature layers, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dflash.decoding.method import StepInputs
from dflash.decoding.methods import LogitsDraft, check_block
from dflash.drafters.dflash.model import DFlashDrafter
from dflash.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class DFlashDraft(LogitsDraft):
    """The DFlash drafter: own context-only cache, fed by the target's verified hidden states.

    Drafts are the argmax of each block row (deterministic) unless ``stochastic``, where, when
    sampling, they are drawn from the drafter's processed distribution q and q is returned.
    """

    block_size: int
    hidden_layers: tuple[int, ...]
    stochastic: bool = False
    mask_token_id: int | None = None

    @classmethod
    def of(cls, drafter: DFlashDrafter, stochastic: bool = False,
           block_size: int | None = None) -> DFlashDraft:
        k = check_block(block_size, drafter.cfg.block_size)
        return cls(k, tuple(drafter.cfg.target_layer_ids), stochastic, drafter.cfg.mask_token_id)

    def init(self, drafter: DFlashDrafter, batch: int, max_len: int, dtype) -> Any:
        return drafter.init_context_cache(batch, max_len, dtype)

    @staticmethod
    def _features(hidden_nBTD: jax.Array) -> jax.Array:
        n, b, t, d = hidden_nBTD.shape
        return jnp.transpose(hidden_nBTD, (1, 2, 0, 3)).reshape(b, t, n * d)  # concat on features

    def prefill(self, drafter: DFlashDrafter, state, hidden, prompt_lens_B):
        feats = self._features(hidden)
        positions = jnp.broadcast_to(jnp.arange(feats.shape[1]), feats.shape[:2])
        return drafter.extend_context(state, feats, positions, prompt_lens_B)

    def draft_logits(self, drafter: DFlashDrafter, target: Transformer, state, step: StepInputs) -> jax.Array:
        return drafter.draft_logits(target, state, step.anchor_B, self.block_size)  # [B, Q-1, V]

    def commit(self, drafter: DFlashDrafter, state, hidden, lengths_B, accepted_B):
        # The anchor and the accepted drafts become context; the rest of the block is dropped.
        feats = self._features(hidden)
        positions = lengths_B[:, None] + jnp.arange(feats.shape[1])[None]
        return drafter.extend_context(state, feats, positions, lengths_B + accepted_B + 1)
