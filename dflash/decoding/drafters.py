"""The chain draft methods: AR (``NoDraft``), prompt lookup, DFlash and Orthrus.

Each implements ``DraftMethod`` (``method.py``, where every member is documented); the tree
method is ``tree.DFlashTreeDraft``. ``method_for`` / ``resolve_method`` give the method that
runs a loaded (or named) drafter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dflash.decoding.method import DraftMethod
from dflash.decoding.sampling import probabilities
from dflash.drafters.dflash import DFlashDrafter
from dflash.drafters.orthrus import OrthrusDrafter
from dflash.errors import ConfigError
from dflash.export.dflash_hf import load_drafter
from dflash.export.orthrus_hf import find_orthrus, load_orthrus
from dflash.models.transformer import Transformer


class _Stateless(DraftMethod):
    """Methods that keep no state of their own and need no target features (the protocol's
    ``init`` / ``prefill`` / ``commit`` defaults)."""

    hidden_layers: ClassVar[tuple[int, ...]] = ()


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


def drafts_from_logits(logits_BkV: jax.Array, mask_token_id: int, stochastic: bool, key, sampling):
    """Argmax drafts, or (``stochastic`` and sampling) drafts drawn from q, returned with q."""
    # The mask token is never proposed: it gets no proposal mass (keeps sampling lossless).
    logits_BkV = logits_BkV.at[..., mask_token_id].set(-jnp.inf)
    if stochastic and not sampling.greedy:
        q = probabilities(logits_BkV, sampling)
        drafts = jax.random.categorical(key, jnp.log(jnp.maximum(q, 1e-38)), axis=-1)
        return drafts.astype(jnp.int32), q
    return jnp.argmax(logits_BkV, axis=-1).astype(jnp.int32), None


def _check_block(block_size: int | None, trained: int) -> int:
    k = block_size or trained
    if not 2 <= k <= trained:
        raise ConfigError(f"block size {k} must be in 2..{trained} (the trained block size)")
    return k


@dataclasses.dataclass(frozen=True)
class DFlashDraft(DraftMethod):
    """The DFlash drafter: own context-only cache, fed by the target's verified hidden states.

    Drafts are the argmax of each block row (deterministic) unless ``stochastic``, where, when
    sampling, they are drawn from the drafter's processed distribution q and q is returned.
    """

    block_size: int
    hidden_layers: tuple[int, ...]
    stochastic: bool = False
    mask_token_id: int = -1

    @classmethod
    def of(cls, drafter: DFlashDrafter, stochastic: bool = False,
           block_size: int | None = None) -> DFlashDraft:
        k = _check_block(block_size, drafter.cfg.block_size)
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

    def propose(self, drafter: DFlashDrafter, target: Transformer, state, anchor_B, lengths_B,
                tokens_BL, total_B, key, sampling):
        logits = drafter.draft_logits(target, state, anchor_B, self.block_size)  # [B, Q-1, V]
        return drafts_from_logits(logits, drafter.cfg.mask_token_id, self.stochastic, key, sampling)

    def commit(self, drafter: DFlashDrafter, state, hidden, lengths_B, accepted_B):
        # The anchor and the accepted drafts become context; the rest of the block is dropped.
        feats = self._features(hidden)
        positions = lengths_B[:, None] + jnp.arange(feats.shape[1])[None]
        return drafter.extend_context(state, feats, positions, lengths_B + accepted_B + 1)


@dataclasses.dataclass(frozen=True)
class OrthrusDraft(_Stateless):
    """Orthrus: the diffusion view drafts from the target's own KV cache; no state of its own.

    Each step drafts ``[anchor, MASK x (Q-1)]`` at positions ``len .. len+Q-1`` through the
    frozen target with the diffusion attentions swapped in; row j is the draft for ``len+j+1``.
    The cache is only read (prefix slots ``< len``), so verification sees it unchanged.
    Drafts are argmax unless ``stochastic`` (then drawn from q when sampling, as for DFlash).
    """

    block_size: int
    stochastic: bool = False
    mask_token_id: int = -1
    reads_target_cache: ClassVar[bool] = True

    @classmethod
    def of(cls, drafter: OrthrusDrafter, stochastic: bool = False,
           block_size: int | None = None) -> OrthrusDraft:
        return cls(_check_block(block_size, drafter.cfg.block_size), stochastic, drafter.cfg.mask_token_id)

    def propose(self, drafter: OrthrusDrafter, target: Transformer, state, anchor_B, lengths_B,
                tokens_BL, total_B, key, sampling, *, target_cache):
        logits = drafter.draft_logits(target, target_cache, anchor_B, self.block_size)  # [B, Q-1, V]
        return drafts_from_logits(logits, drafter.cfg.mask_token_id, self.stochastic, key, sampling)


def method_for(drafter: Any, *, stochastic: bool = False, block_size: int | None = None) -> Any:
    """The engine method that runs a loaded drafter module (DFlash or Orthrus)."""
    if isinstance(drafter, OrthrusDrafter):
        return OrthrusDraft.of(drafter, stochastic=stochastic, block_size=block_size)
    if isinstance(drafter, DFlashDrafter):
        return DFlashDraft.of(drafter, stochastic=stochastic, block_size=block_size)
    raise TypeError(f"no draft method for {type(drafter).__name__}")


def resolve_method(spec: str | None, target: Transformer, *, block_size: int | None = None,
                   stochastic: bool = False, attention_impl: str | None = None,
                   mesh: Mesh | None = None) -> tuple[Any, Any]:
    """``None``/``"ar"`` -> AR, ``"ngram"`` -> prompt lookup, else an exported drafter.

    An exported drafter is a DFlash directory or an Orthrus one (full or delta export, e.g. the
    shipped ``tiny-code-orthrus``), given as a directory, shipped name or hub id; an Orthrus
    drafter is checked against ``target`` (architecture and weights). Returns
    ``(method, drafter_module_or_None)`` for ``speculative_generate``. The drafter is built with
    ``attention_impl`` (default: the target's ``attention_impl``), so one setting covers a run,
    and read into its shards on ``mesh`` (decoding on a mesh: the target is on it too).
    """
    impl = target.attention_impl if attention_impl is None else attention_impl
    if spec in (None, "", "ar", "none"):
        return NoDraft(), None
    if spec == "ngram":
        return NgramDraft(block_size=block_size or 16), None
    if find_orthrus(spec) is not None:
        drafter = load_orthrus(spec, target, dtype=target.dtype, attention_impl=impl, mesh=mesh)
    else:
        drafter = load_drafter(spec, target.cfg, dtype=target.dtype, attention_impl=impl, mesh=mesh)
    return method_for(drafter, stochastic=stochastic, block_size=block_size), drafter
