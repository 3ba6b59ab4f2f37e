"""Autoregressive decoding: prefill + a ``lax.while_loop`` decode loop, all on device.

This is the baseline every speculative method is measured against: no host round trip per
token, the cache is donated, and shapes are static (prompt length and cache size are
bucketed so repeated calls reuse one compilation).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dflash.decoding.compiled import compiled
from dflash.decoding.mesh import check_on_mesh, on_mesh, pad_request, place, to_host
from dflash.decoding.sampling import SamplingParams, sample
from dflash.errors import ConfigError, ContextLengthError  # noqa: F401  (raised here; importable from here too)
from dflash.models.cache import Cache, check_fits
from dflash.models.transformer import Transformer


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row (EOS included when emitted)
    prompt_lengths: list[int]
    elapsed_s: float  # device time of the compiled run (prefill + decode), compile excluded
    compile_s: float

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated / max(self.elapsed_s, 1e-9)


def bucket(n: int, multiple: int = 64) -> int:
    """Rounds up so nearby lengths share one compiled program."""
    return max(multiple, -(-n // multiple) * multiple)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
    """Right-padded ``[B, length]`` int32 (padding slots are never visible: lengths mask them)."""
    out = np.full((len(prompts), length), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


def prepare_batch(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], extra_slots: int,
                  max_len: int | None, pad_id: int) -> tuple[list[int], list[int], int, np.ndarray]:
    """Validates a request; returns budgets, prompt lengths, the cache size, padded prompts.

    ``extra_slots``: cache slots a step may write past the last committed token (a verify block).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    batch = len(prompts)
    budgets = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != batch or min(budgets) < 1:
        raise ConfigError("max_new_tokens must be >= 1 for every prompt")
    prompt_lens = [len(p) for p in prompts]
    longest = max(p + b for p, b in zip(prompt_lens, budgets, strict=True)) + extra_slots
    max_len = bucket(longest) if max_len is None else max_len
    for i, (p, b) in enumerate(zip(prompt_lens, budgets, strict=True)):
        block = f" + block {extra_slots}" if extra_slots else ""
        what = f"prompt {i} ({p} tokens) + {b} new tokens{block}"
        check_fits(p + b + extra_slots, max_len, what)
    padded = pad_prompts(prompts, min(bucket(max(prompt_lens), 16), max_len), pad_id)
    return budgets, prompt_lens, max_len, padded


def check_context(prompt_lens: Sequence[int], budgets: Sequence[int], context: int,
                  allow: bool = False) -> None:
    """Refuses prompt + new tokens longer than the model's context: past it RoPE positions were
    never trained and the output is silently wrong. ``allow`` is the explicit opt-in."""
    if allow:
        return
    for i, (p, b) in enumerate(zip(prompt_lens, budgets, strict=True)):
        if p + b > context:
            raise ContextLengthError(
                f"prompt {i} ({p} tokens) + {b} new tokens = {p + b} positions, past the target's context "
                f"of {context} (max_position_embeddings): the output would be wrong. Shorten the prompt "
                "or the new tokens, or opt in with --allow-longer-than-context "
                "(allow_longer_than_context=True)")


def prefill(model: Transformer, tokens_BP: jax.Array, prompt_lens_B: jax.Array,
            cache: Cache, hidden_layers: tuple[int, ...] = ()):
    """Runs right-padded prompts; returns last-position logits ``[B,V]``, hidden, cache at prompt length.

    Only the last position of each row goes through the LM head: ``[B, P, V]`` float32 logits
    would be the largest temporary of a long prefill (1.9 GB per chip for Qwen3-8B at 4 rows x
    2048 tokens x half the vocabulary, docs/scaling.md)."""
    positions = jnp.broadcast_to(jnp.arange(tokens_BP.shape[1]), tokens_BP.shape)
    out = model(tokens_BP, positions, cache, hidden_layers=hidden_layers, compute_logits=False,
                final_hidden=True, valid_B=prompt_lens_B)
    last_B1D = jnp.take_along_axis(out.final, (prompt_lens_B - 1)[:, None, None], axis=1)
    return model.unembed(last_B1D)[:, 0], out.hidden, out.cache.keep(prompt_lens_B, tokens_BP.shape[1])


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "max_new", "max_len", "sampling", "eos_ids"))
def _generate(params, tokens_BP, prompt_lens_B, max_new_B, key, *, graphdef, max_new: int, max_len: int,
              sampling: SamplingParams, eos_ids: tuple[int, ...]):
    """Prefill + decode loop. The cache is made here, inside the program, so under a mesh it is
    born in its shards (never whole on one device first) and needs no donation."""
    model = nnx.merge(graphdef, params)
    batch = tokens_BP.shape[0]
    rows = jnp.arange(batch)
    cache = model.init_cache(batch, max_len)
    logits, _, cache = prefill(model, tokens_BP, prompt_lens_B, cache)
    key, sub = jax.random.split(key)
    tok = sample(logits, sampling, sub)
    out = jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(tok)
    n = jnp.ones((batch,), jnp.int32)
    done = is_eos(tok, eos_ids) | (n >= max_new_B)

    def cond(state):
        _, _, _, _, done, _ = state
        return ~jnp.all(done)

    def body(state):
        cache, tok, out, n, done, key = state
        step = model(tok[:, None], cache.lengths[:, None], cache)
        # Finished rows do not advance: their slot is rewritten harmlessly next step.
        cache = step.cache.keep(jnp.where(done, 0, 1), 1)
        key, sub = jax.random.split(key)
        new = sample(step.logits[:, -1], sampling, sub)
        out = out.at[rows, jnp.where(done, max_new, n)].set(new, mode="drop")
        n = n + (~done).astype(jnp.int32)
        done = done | is_eos(new, eos_ids) | (n >= max_new_B)
        return cache, new, out, n, done, key

    _, _, out, n, _, _ = jax.lax.while_loop(cond, body, (cache, tok, out, n, done, key))
    return out, n


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 128,
    sampling: SamplingParams = SamplingParams(),
    key: jax.Array | None = None,
    eos_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    pad_id: int = 0,
    allow_longer_than_context: bool = False,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Batched AR generation; rows may have different prompt lengths and token budgets.

    Raises ``CacheOverflowError`` when a prompt plus its budget exceeds ``max_len``, and
    ``ContextLengthError`` when it exceeds the model's context (unless allowed).
    ``mesh``: decode on it (batch over ``data × fsdp × expert``, the model's own split over ``tensor``);
    the model must already be on it (``load_target(..., mesh=)`` or ``sharding.shard_model``).
    The batch is padded to a multiple of the batch split with dummy rows, dropped from the result.
    """
    batch = len(prompts)
    rows, budgets = pad_request(prompts, max_new_tokens, mesh)  # dummy rows: budget 1, dropped below
    budgets, prompt_lens, max_len, padded = prepare_batch(rows, budgets, 0, max_len, pad_id)
    check_context(prompt_lens, budgets, model.cfg.max_position_embeddings, allow_longer_than_context)
    eos = tuple(model.cfg.eos_token_id if eos_ids is None else eos_ids)
    key = jax.random.key(0) if key is None else key
    graphdef, params = nnx.split(model)
    check_on_mesh(params, mesh, "target")
    max_new = max(budgets)
    with on_mesh(mesh):
        args = (params, place(padded, mesh), place(np.asarray(prompt_lens, np.int32), mesh),
                place(np.asarray(budgets, np.int32), mesh), place(key, mesh))
        static = dict(graphdef=graphdef, max_new=max_new, max_len=max_len, sampling=sampling, eos_ids=eos)
        program, compile_s = compiled(_generate, args, static)
        t0 = time.perf_counter()
        out, n = jax.block_until_ready(program(*args))
        elapsed = time.perf_counter() - t0
    out, n = to_host(out), to_host(n)
    tokens = [out[i, : n[i]].tolist() for i in range(batch)]
    return GenerationResult(tokens, prompt_lens[:batch], elapsed, compile_s)
