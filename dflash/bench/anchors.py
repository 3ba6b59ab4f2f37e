"""Per-anchor acceptance of a drafter and of prompt lookup along the target's own output."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dflash.decoding import generate
from dflash.decoding.methods import NgramDraft
from dflash.drafters import kind_of


def _leading_matches(drafts_AK: np.ndarray, truth_AK: np.ndarray) -> np.ndarray:
    """``[A]``: how many leading drafts of each row equal the truth (greedy acceptance)."""
    return np.cumprod(drafts_AK == truth_AK, axis=1).sum(axis=1)


def _walk(accepted_A: np.ndarray, max_new: int, eos_at: int) -> list[int]:
    """The engine's verify steps over one trajectory, given the acceptance at every anchor.

    Anchor ``i`` is the ``i``-th generated token (the prefill emits the first); a step there logs
    ``accepted + 1`` and emits that many tokens, cut at the budget and at EOS (as the engine does).
    """
    steps, n_gen = [], 1
    while n_gen < max_new and n_gen <= eos_at:
        a = int(accepted_A[n_gen - 1])
        steps.append(a + 1)
        n_gen += a + 1
    return steps


def anchor_profile(target, drafter, prompts: list[list[int]], *, max_new_tokens: int = 128,
                   eos_ids: tuple[int, ...] = (), block_size: int | None = None) -> dict[str, Any]:
    """Greedy acceptance of a drafter (any kind with a per-anchor path: DFlash, Orthrus) and of prompt
    lookup at *every* anchor of the target's
    own greedy continuations, and the verify steps the engine takes with each.

    Per row, the target's greedy continuation (``max_new_tokens`` plus a block, so acceptance
    near the budget is counted as the engine counts it) is computed once; the drafter drafts a
    block at every generated position through its training path (the same math as its cache
    path, ``test_drafter_cache_path_equals_training_path``), and prompt lookup proposes at every
    position through ``NgramDraft.propose``. Walking the anchors as the engine would gives each
    method's verify steps, and ``best`` (the longer of the two per anchor: what the tree with a
    lookup branch verifies) the steps of an oracle choosing per step. Anchors where one method
    wins are where the other fails: the per-anchor arrays say which, with the target's top-1
    probability (how sure the target itself was of the token after the anchor).
    """
    kind = kind_of(drafter)
    k = block_size or drafter.cfg.block_size
    ar = generate(target, prompts, max_new_tokens=max_new_tokens + k, eos_ids=())
    ngram = NgramDraft(block_size=k)
    rows: list[dict[str, Any]] = []
    for prompt, gen in zip(prompts, ar.tokens, strict=True):
        seq = np.asarray(list(prompt) + list(gen), np.int32)
        s, first = len(seq), len(prompt)
        anchors = np.arange(first, first + max_new_tokens)  # [A] positions of the generated tokens
        ids = jnp.asarray(seq)[None]
        out = target(ids, jnp.arange(s)[None])  # causal, whole trajectory
        top1 = np.asarray(jnp.max(jax.nn.softmax(out.logits[0], axis=-1), axis=-1))  # [S]
        logits = kind.anchor_logits(drafter, target, ids, jnp.asarray(anchors), k)  # [A, Q-1, V]
        d_drafts = np.asarray(jnp.argmax(logits.at[..., drafter.cfg.mask_token_id].set(-jnp.inf), axis=-1))
        n_drafts = ngram.lookup(jnp.broadcast_to(jnp.asarray(seq), (len(anchors), s)),
                                jnp.asarray(anchors + 1))
        truth = seq[anchors[:, None] + 1 + np.arange(k - 1)[None]]  # [A, Q-1]
        acc_d = _leading_matches(d_drafts, truth)
        acc_n = _leading_matches(np.asarray(n_drafts), truth)
        eos = [i for i, t in enumerate(gen[:max_new_tokens]) if t in eos_ids]
        eos_at = eos[0] if eos else max_new_tokens
        rows.append({"drafter": acc_d.tolist(), "ngram": acc_n.tolist(),
                     "target_top1": top1[anchors].tolist(),
                     "step_tokens": min(max_new_tokens, eos_at + 1) - 1,  # all but the prefill's token
                     "steps": {name: _walk(acc, max_new_tokens, eos_at) for name, acc in
                               (("drafter", acc_d), ("ngram", acc_n), ("best", np.maximum(acc_d, acc_n)))}})
    summary: dict[str, Any] = {}
    step_tokens = sum(r["step_tokens"] for r in rows)  # the same for every method: greedy is lossless
    for name in ("drafter", "ngram", "best"):
        steps = [t for r in rows for t in r["steps"][name]]
        # The engine's τ (tokens emitted by verify steps / verify steps, design §7), and the mean of
        # the walked per-step list, its ``mean_acceptance_length``.
        summary[f"tau_{name}"] = step_tokens / len(steps) if steps else float("nan")
        summary[f"mean_acceptance_length_{name}"] = float(np.mean(steps)) if steps else float("nan")
    acc_d = np.concatenate([r["drafter"] for r in rows])
    acc_n = np.concatenate([r["ngram"] for r in rows])
    full = k - 1
    summary["anchors"] = int(acc_d.size)
    summary["ngram_full_blocks"] = int((acc_n == full).sum())
    summary["drafter_full_blocks"] = int((acc_d == full).sum())
    summary["drafter_accepted_where_ngram_full"] = np.bincount(acc_d[acc_n == full], minlength=k).tolist()
    summary["ngram_accepted_where_drafter_full"] = np.bincount(acc_n[acc_d == full], minlength=k).tolist()
    return {"summary": summary, "rows": rows, "block_size": k, "max_new_tokens": max_new_tokens}
