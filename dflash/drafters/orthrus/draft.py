"""The engine's method for an Orthrus drafter: it drafts from the target's own KV cache."""

from __future__ import annotations

import dataclasses

import jax

from dflash.decoding.method import StepInputs
from dflash.decoding.methods import LogitsDraft, check_block
from dflash.drafters.orthrus.model import OrthrusDrafter
from dflash.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class OrthrusDraft(LogitsDraft):
    """Orthrus: the diffusion view drafts from the target's own KV cache; no state of its own.

    Each step drafts ``[anchor, MASK x (Q-1)]`` at positions ``len .. len+Q-1`` through the
    frozen target with the diffusion attentions swapped in; row j is the draft for ``len+j+1``.
    The cache is only read (prefix slots ``< len``), so verification sees it unchanged.
    Drafts are argmax unless ``stochastic`` (then drawn from q when sampling, as for DFlash).
    """

    block_size: int
    stochastic: bool = False
    mask_token_id: int | None = None

    @classmethod
    def of(cls, drafter: OrthrusDrafter, stochastic: bool = False,
           block_size: int | None = None) -> OrthrusDraft:
        return cls(check_block(block_size, drafter.cfg.block_size), stochastic, drafter.cfg.mask_token_id)

    def draft_logits(self, drafter: OrthrusDrafter, target: Transformer, state,
                     step: StepInputs) -> jax.Array:
        return drafter.draft_logits(target, step.target_cache, step.anchor_B, self.block_size)  # [B, Q-1, V]
