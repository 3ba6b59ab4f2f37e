"""The draft methods that need no drafter module, AR (``NoDraft``) and prompt lookup (``NgramDraft``),
and the base of drafters whose drafts come from per-position logits (``LogitsDraft``).

Each implements ``ChainDraft`` (``method.py``, where every member is documented). The drafters'
own methods live with their kinds (``dflash.drafters``); ``dflash.drafters.resolve_method`` gives
the method for a drafter named on a command line.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dflash.decoding.method import ChainDraft, StepInputs
from dflash.decoding.sampling import SamplingParams, probabilities
from dflash.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NoDraft(ChainDraft):
    """Block of one token: the engine degenerates to plain AR decoding."""

    block_size: int = 1

    def propose(self, drafter, target, state, step: StepInputs, key, sampling):
        return jnp.zeros((step.anchor_B.shape[0], 0), jnp.int32), None


@dataclasses.dataclass(frozen=True)
class NgramDraft(ChainDraft):
    """Prompt lookup: copy what followed the most recent earlier occurrence of the last n tokens.

    Tries n = ``max_ngram`` down to ``min_ngram``; proposals past the known text are -1 (never
    accepted).
    """

    block_size: int = 16
    max_ngram: int = 3
    min_ngram: int = 1

    def propose(self, drafter, target, state, step: StepInputs, key, sampling):
        return self.lookup(step.tokens_BL, step.total_B), None

    def lookup(self, tokens_BL: jax.Array, total_B: jax.Array) -> jax.Array:
        """``[B, Q-1]`` drafts after the ``total_B`` known tokens of each row (-1: none)."""
        b, length = tokens_BL.shape
        pos_L = jnp.arange(length)
        best_j = jnp.full((b,), -1, jnp.int32)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            # match_BL[j]: tokens[j-n+1 .. j] == the last n tokens, with j < total-1 (j+1 is known).
            suffix_idx = total_B[:, None] - n + jnp.arange(n)[None, :]  # [B, n]
            suffix = jnp.take_along_axis(tokens_BL, jnp.maximum(suffix_idx, 0), axis=1)
            match = jnp.ones((b, length), bool)
            for i in range(n):
                shifted = jnp.roll(tokens_BL, n - 1 - i, axis=1)  # shifted[j] = tokens[j-(n-1-i)]
                match &= shifted == suffix[:, i:i + 1]
            ok = (pos_L[None] >= n - 1) & (pos_L[None] < total_B[:, None] - 1) & (total_B[:, None] >= n)
            j = jnp.max(jnp.where(match & ok, pos_L[None], -1), axis=1)
            best_j = jnp.where(best_j >= 0, best_j, j)
        idx = best_j[:, None] + 1 + jnp.arange(self.block_size - 1)[None]
        drafts = jnp.take_along_axis(tokens_BL, jnp.clip(idx, 0, length - 1), axis=1)
        known = (best_j[:, None] >= 0) & (idx < total_B[:, None])
        return jnp.where(known, drafts, -1).astype(jnp.int32)


def drafts_from_logits(logits_BkV: jax.Array, mask_token_id: int | None, stochastic: bool, key, sampling):
    """Argmax drafts, or (``stochastic`` and sampling) drafts drawn from q, returned with q."""
    # The mask token is never proposed: it gets no proposal mass (keeps sampling lossless).
    if mask_token_id is not None:
        logits_BkV = logits_BkV.at[..., mask_token_id].set(-jnp.inf)
    if stochastic and not sampling.greedy:
        q = probabilities(logits_BkV, sampling)
        drafts = jax.random.categorical(key, jnp.log(jnp.maximum(q, 1e-38)), axis=-1)
        return drafts.astype(jnp.int32), q
    return jnp.argmax(logits_BkV, axis=-1).astype(jnp.int32), None


class LogitsDraft(ChainDraft):
    """A chain method whose drafts come from per-position distributions of one drafter pass: its
    ``draft_logits`` is what tree drafting (``tree.BeamTreeDraft``) builds a beam tree from.
    ``stochastic``: drafts drawn from those distributions when sampling (else their argmax)."""

    stochastic: bool = False

    @abc.abstractmethod
    def draft_logits(self, drafter: Any, target: Any, state: Any, step: StepInputs) -> jax.Array:
        """Logits ``[B, Q-1, V]`` for the positions after the anchor."""

    def propose(self, drafter: Any, target: Any, state: Any, step: StepInputs, key: jax.Array,
                sampling: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
        logits = self.draft_logits(drafter, target, state, step)
        return drafts_from_logits(logits, self.mask_token_id, self.stochastic, key, sampling)


def check_block(block_size: int | None, trained: int) -> int:
    """The block size a drafter decodes with: ``block_size`` (2..trained) or the trained one."""
    k = block_size or trained
    if not 2 <= k <= trained:
        raise ConfigError(f"block size {k} must be in 2..{trained} (the trained block size)")
    return k
