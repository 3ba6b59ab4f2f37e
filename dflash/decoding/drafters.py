"""Draft methods behind one interface, so every method runs in the same engine loop.

A method is a small frozen (hashable, static under jit) object; the drafter's parameters, if
any, are passed separately as an nnx module. State is a pytree the engine carries through
its ``lax.while_loop``.

    init(drafter, batch, max_len, dtype)             -> state
    prefill(drafter, state, hidden, prompt_lens)     -> state   (hidden of the prompt, [n,B,P,D])
    propose(drafter, target, state, anchor, lengths, tokens, total, key, sampling)
        -> (drafts [B, K-1] int32, q [B, K-1, V] proposal probabilities or None if deterministic)
    commit(drafter, state, hidden, lengths, accepted) -> state  (hidden of the verified block)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dflash.decoding.sampling import probabilities
from dflash.drafters.dflash import DFlashDrafter
from dflash.models.transformer import Transformer


class _Stateless:
    """Methods that keep no state of their own and need no target features."""

    hidden_layers: tuple[int, ...] = ()

    def init(self, drafter, batch: int, max_len: int, dtype) -> Any:
        return ()

    def prefill(self, drafter, state, hidden, prompt_lens):
        return state

    def commit(self, drafter, state, hidden, lengths_B, accepted_B):
        return state


@dataclasses.dataclass(frozen=True)
class NoDraft(_Stateless):
    """Block of one token: the engine degenerates to plain AR decoding."""

    block_size: int = 1

    def propose(self, drafter, target, state, anchor_B, lengths_B, tokens_BL, total_B, key, sampling):
        return jnp.zeros((anchor_B.shape[0], 0), jnp.int32), None


@dataclasses.dataclass(frozen=True)
class NgramDraft(_Stateless):
    """Prompt lookup: copy what followed the most recent earlier occurrence of the last n tokens.

    Tries n = ``max_ngram`` down to ``min_ngram``; proposals past the known text are -1 (never
    accepted).
    """

    block_size: int = 16
    max_ngram: int = 3
    min_ngram: int = 1

    def propose(self, drafter, target, state, anchor_B, lengths_B, tokens_BL, total_B, key, sampling):
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
        return jnp.where(known, drafts, -1).astype(jnp.int32), None


@dataclasses.dataclass(frozen=True)
class DFlashDraft:
    """The DFlash drafter: own context-only cache, fed by the target's verified hidden states.

    Drafts are the argmax of each block row (deterministic) unless ``stochastic``, where, when
    sampling, they are drawn from the drafter's processed distribution q and q is returned.
    """

    block_size: int
    hidden_layers: tuple[int, ...]
    stochastic: bool = False

    @classmethod
    def of(cls, drafter: DFlashDrafter, stochastic: bool = False,
           block_size: int | None = None) -> DFlashDraft:
        k, trained = block_size or drafter.cfg.block_size, drafter.cfg.block_size
        if not 2 <= k <= trained:
            raise ValueError(f"block size {k} must be in 2..{trained} (the trained block size)")
        return cls(k, tuple(drafter.cfg.target_layer_ids), stochastic)

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

    def propose(self, drafter: DFlashDrafter, target: Transformer, state, anchor_B, lengths_B,
                tokens_BL, total_B, key, sampling):
        logits = drafter.draft_logits(target, state, anchor_B, self.block_size)  # [B, K-1, V]
        # The mask token is never proposed: it gets no proposal mass (keeps sampling lossless).
        logits = logits.at[..., drafter.cfg.mask_token_id].set(-jnp.inf)
        if self.stochastic and not sampling.greedy:
            q = probabilities(logits, sampling)
            drafts = jax.random.categorical(key, jnp.log(jnp.maximum(q, 1e-38)), axis=-1)
            return drafts.astype(jnp.int32), q
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None

    def commit(self, drafter: DFlashDrafter, state, hidden, lengths_B, accepted_B):
        # The anchor and the accepted drafts become context; the rest of the block is dropped.
        feats = self._features(hidden)
        positions = lengths_B[:, None] + jnp.arange(feats.shape[1])[None]
        return drafter.extend_context(state, feats, positions, lengths_B + accepted_B + 1)


def resolve_method(spec: str | None, target: Transformer, *, block_size: int | None = None,
                   stochastic: bool = False) -> tuple[Any, Any]:
    """``None``/``"ar"`` -> AR, ``"ngram"`` -> prompt lookup, else an exported DFlash drafter.

    Returns ``(method, drafter_module_or_None)`` for ``speculative_generate``.
    """
    if spec in (None, "", "ar", "none"):
        return NoDraft(), None
    if spec == "ngram":
        return NgramDraft(block_size=block_size or 16), None
    from dflash.export import load_drafter

    drafter = load_drafter(spec, target.cfg, dtype=target.dtype)
    return DFlashDraft.of(drafter, stochastic=stochastic, block_size=block_size), drafter
