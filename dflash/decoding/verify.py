"""Verification rules: which drafts to accept and which token to add, lossless by construction.

All rules see, per row, the target's logits at the ``Q`` block positions (row ``i`` is the
distribution of the token after ``[anchor, d_1 .. d_i]``), the ``Q-1`` drafts, and the drafter's
proposal distributions ``q`` (``None`` for deterministic drafts such as argmax or n-gram).
They return ``accepted`` (``[B]``, leading drafts kept) and ``extra`` (``[B]``, the token emitted
after them: the bonus, or the correction after a rejection). Temperature / top-k / top-p
transform p and q identically.

The mask token: a deterministic draft equal to it is treated as "no proposal" (never accepted
as a draft; the emitted token then comes from p alone). Stochastic drafters must give it zero
proposal mass (DFlash does), since rejecting a sampled draft by fiat would bias the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dflash.decoding.sampling import SamplingParams, probabilities
from dflash.errors import ConfigError

RULES = ("greedy", "token", "block")


def _leading_run(ok_Bk: jax.Array) -> jax.Array:
    return jnp.cumprod(ok_Bk.astype(jnp.int32), axis=1).sum(axis=1)


def _take(x_BQ: jax.Array, idx_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BQ, idx_B[:, None], axis=1)[:, 0]


def _sample_rows(key: jax.Array, probs_BV: jax.Array) -> jax.Array:
    return jax.random.categorical(key, jnp.log(jnp.maximum(probs_BV, 1e-38)), axis=-1).astype(jnp.int32)


def _residual(p_BV: jax.Array, q_BV: jax.Array, scale_B: jax.Array | float = 1.0) -> jax.Array:
    """norm(max(scale * p - q, 0)); falls back to p where that mass is zero."""
    r = jnp.maximum(jnp.asarray(scale_B)[..., None] * p_BV - q_BV, 0.0)
    mass = r.sum(-1, keepdims=True)
    return jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p_BV)


def verify_greedy(logits_BQV, drafts_Bk, mask_id: int):
    greedy = jnp.argmax(logits_BQV, axis=-1).astype(jnp.int32)
    accepted = _leading_run((drafts_Bk == greedy[:, :-1]) & (drafts_Bk != mask_id))
    return accepted, _take(greedy, accepted)


def verify_token(logits_BQV, drafts_Bk, q_BkV, key, sampling: SamplingParams, mask_id: int):
    """Token-wise speculative sampling (Leviathan et al. / Chen et al.)."""
    p = probabilities(logits_BQV, sampling)  # [B, Q, V]
    b, k, v = p.shape
    k_accept, k_sample = jax.random.split(key)
    if q_BkV is None:
        # Deterministic drafts: accept d iff an independent sample x ~ p equals d; on reject x is
        # exactly a sample of p with d removed and renormalised; after all drafts x is the bonus.
        x = _sample_rows(k_sample, p.reshape(b * k, v)).reshape(b, k)
        accepted = _leading_run((x[:, :-1] == drafts_Bk) & (drafts_Bk != mask_id))
        return accepted, _take(x, accepted)
    q = q_BkV
    safe_d = jnp.clip(drafts_Bk, 0, v - 1)
    p_d = jnp.take_along_axis(p[:, :-1], safe_d[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, safe_d[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, drafts_Bk.shape)
    ok = (u * q_d <= p_d) & (drafts_Bk >= 0)
    accepted = _leading_run(ok)
    # Row ``accepted`` of p, and the residual there unless every draft was accepted.
    p_at = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1)
    q_at = jnp.take_along_axis(q_pad, accepted[:, None, None], axis=1)[:, 0]
    dist = jnp.where((accepted == k - 1)[:, None], p_at, _residual(p_at, q_at))
    return accepted, _sample_rows(k_sample, dist)


def block_stop_probs(p_BQV: jax.Array, q_BkV: jax.Array, drafts_Bk: jax.Array):
    """Sun et al.'s ``h_i`` (i = 0..gamma, h_0 unused) and ``p_i``, per row.

    p_0 = 1, p_i = min(p_{i-1} p(X_i)/q(X_i), 1); R_i = sum_x max(p_i p(x|X<=i) - q(x|X<=i), 0);
    h_i = R_i / (R_i + 1 - p_i) for i < gamma (0 when that is 0/0: no residual mass to stop
    into), h_gamma = p_gamma.
    """
    b, k, v = p_BQV.shape
    gamma = k - 1
    safe_d = jnp.clip(drafts_Bk, 0, v - 1)
    p_d = jnp.take_along_axis(p_BQV[:, :-1], safe_d[..., None], axis=-1)[..., 0]  # p(X_i | X<i)
    q_d = jnp.take_along_axis(q_BkV, safe_d[..., None], axis=-1)[..., 0]
    valid = (drafts_Bk >= 0) & (q_d > 0)
    ratio = jnp.where(valid, p_d / jnp.where(q_d > 0, q_d, 1.0), 0.0)
    pi = [jnp.ones((b,), p_BQV.dtype)]
    for i in range(gamma):
        pi.append(jnp.minimum(pi[-1] * ratio[:, i], 1.0))
    p_i = jnp.stack(pi, axis=1)  # [B, Q]: p_0 .. p_gamma
    q_pad = jnp.concatenate([q_BkV, jnp.zeros((b, 1, v), q_BkV.dtype)], axis=1)  # row gamma unused
    resid_mass = jnp.maximum(p_i[..., None] * p_BQV - q_pad, 0.0).sum(-1)  # R_i, [B, Q]
    denom = resid_mass + 1.0 - p_i
    h = jnp.where(denom > 0, resid_mass / jnp.where(denom > 0, denom, 1.0), 0.0)
    return h.at[:, gamma].set(p_i[:, gamma]), p_i, q_pad


def verify_block(logits_BQV, drafts_Bk, q_BkV, key, sampling: SamplingParams, mask_id: int):
    """Block verification (Sun et al.): the longest jointly acceptable prefix, never worse than token-wise."""
    p = probabilities(logits_BQV, sampling)  # [B, Q, V]
    b, k, v = p.shape
    if q_BkV is None:  # deterministic drafts: q is one-hot at each draft; mask / -1 = no proposal
        drafts_Bk = jnp.where(drafts_Bk == mask_id, -1, drafts_Bk)
        q_BkV = jax.nn.one_hot(jnp.clip(drafts_Bk, 0, v - 1), v, dtype=p.dtype) * (drafts_Bk >= 0)[..., None]
    h, p_i, q_pad = block_stop_probs(p, q_BkV, drafts_Bk)
    k_eta, k_sample = jax.random.split(key)
    eta = jax.random.uniform(k_eta, (b, k))
    hit = (eta <= h) & (jnp.arange(k)[None] >= 1)
    accepted = jnp.max(jnp.where(hit, jnp.arange(k)[None], 0), axis=1)  # tau: the largest i with a hit
    p_at = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
    q_at = jnp.take_along_axis(q_pad, accepted[:, None, None], axis=1)[:, 0]
    dist = jnp.where((accepted == k - 1)[:, None], p_at, _residual(p_at, q_at, _take(p_i, accepted)))
    return accepted, _sample_rows(k_sample, dist)


def verify(rule: str, logits_BQV, drafts_Bk, q_BkV, key, sampling: SamplingParams, mask_id: int):
    """Dispatch by rule name. At T = 0 the token and block rules reduce to greedy (tested)."""
    if rule not in RULES:
        raise ConfigError(f"unknown verification rule {rule!r}; choose from {RULES}")
    if rule == "greedy":
        if not sampling.greedy:
            raise ConfigError("the greedy rule needs temperature 0; use 'token' or 'block' to sample")
        return verify_greedy(logits_BQV, drafts_Bk, mask_id)
    if rule == "token":
        return verify_token(logits_BQV, drafts_Bk, q_BkV, key, sampling, mask_id)
    return verify_block(logits_BQV, drafts_Bk, q_BkV, key, sampling, mask_id)
