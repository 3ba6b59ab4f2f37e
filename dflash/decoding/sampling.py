"""Logit processing and sampling, shared by AR decoding and speculative verification.

Temperature, top-k and top-p transform the target distribution p (and a drafter's q)
identically; ``temperature == 0`` means greedy (argmax).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dflash.checks import COUNT_OR_ZERO, NON_NEGATIVE, PROBABILITY, check


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: one compilation per setting)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        check("temperature", self.temperature, NON_NEGATIVE)
        check("top_k", self.top_k, COUNT_OR_ZERO)
        check("top_p", self.top_p, PROBABILITY)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits_BV: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, then top-k, then top-p (HF order); removed tokens get -inf."""
    x = logits_BV.astype(jnp.float32)
    if params.greedy:
        return x
    x = x / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if params.top_p < 1.0:
        sorted_desc = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < params.top_p  # always keeps the top token
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def probabilities(logits_BV: jax.Array, params: SamplingParams) -> jax.Array:
    """The distribution actually sampled from (one-hot at the argmax when greedy)."""
    if params.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(process_logits(logits_BV, params), axis=-1)


def sample(logits_BV: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """One token per row ``[B]`` (int32)."""
    if params.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits_BV, params), axis=-1).astype(jnp.int32)
