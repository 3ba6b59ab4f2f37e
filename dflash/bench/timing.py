"""Timed engine steps and passes, loop overhead left out: what the speedup ceiling is made of."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.decoding.method import StepInputs
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import commit_tokens, draft_and_verify, mask_id_for
from dflash.drafters import method_for
from dflash.models.cache import Cache, check_fits


def pass_costs(target, methods: dict[str, tuple[Any, Any, int]], *, batch: int = 1, context: int = 256,
               sampling=None, rule: str | None = None, mask_token_id: int | None = None, iters: int = 40,
               repeats: int = 5) -> dict[str, float]:
    """Seconds per engine step of each method ``name -> (method, drafter, max_len)``, loop left out.

    Each iteration runs what the engine's step runs for the method, through the same code: the
    draft, the target's pass over the block or tree and verification
    (``speculative.draft_and_verify``), then the method's commit of its drafter state. What is
    left out is the loop's own work: emitting tokens, EOS and budget checks, the logs, the
    while-loop. Caches hold ``context`` committed tokens in ``max_len`` slots (the run's) and are
    rolled back after every pass, so every iteration does the same work. The methods are timed
    in turn, ``repeats`` rounds, and the median is kept. ``tau * t_ar / t_method`` is then the
    speedup the engine reaches if its loop costs nothing (the ceiling of issue 4).
    """
    sampling = sampling or SamplingParams()
    rule = rule or ("greedy" if sampling.greedy else "token")
    tgraph, tparams = nnx.split(target)
    lengths = jnp.full((batch,), context, jnp.int32)
    key = jax.random.key(0)

    def rolled_back(state):
        return jax.tree.map(lambda x: x.at_lengths(lengths) if isinstance(x, Cache) else x, state,
                            is_leaf=lambda x: isinstance(x, Cache))

    def build(method, drafter, max_len: int):
        check_fits(context + method.verify_tokens, max_len, "a timed step")
        dgraph, dparams = nnx.split(drafter) if drafter is not None else (None, None)

        def run(tp, dp):
            model = nnx.merge(tgraph, tp)
            d = nnx.merge(dgraph, dp) if dgraph is not None else None
            cache = model.init_cache(batch, max_len).at_lengths(lengths)
            dstate = rolled_back(method.init(d, batch, max_len, model.dtype))
            tokens_BL = jax.random.randint(key, (batch, max_len + method.block_size), 2, model.cfg.vocab_size)

            def body(i, carry):
                cache, dstate, total = carry
                anchor = jnp.full((batch,), 2 + i % 7, jnp.int32)  # varies, so no pass is hoisted
                k_draft, k_verify = jax.random.split(jax.random.fold_in(key, i))
                step = StepInputs(anchor, lengths, tokens_BL, lengths + 1, cache)
                drafts, accepted, extra, cache_v, hidden = draft_and_verify(
                    method, d, model, dstate, step, mask_id_for(method, mask_token_id), sampling, rule,
                    k_draft, k_verify)
                dstate = method.commit(d, dstate, hidden, lengths, accepted,
                                       **commit_tokens(method, anchor, drafts))
                kept = cache_v.keep(jnp.zeros_like(lengths), method.verify_tokens)  # back to ``context``
                return kept, rolled_back(dstate), total + jnp.sum(accepted + extra)

            return jax.lax.fori_loop(0, iters, body, (cache, dstate, jnp.int32(0)))[2]

        fn = jax.jit(run).lower(tparams, dparams).compile()
        jax.block_until_ready(fn(tparams, dparams))  # first touch of the buffers
        return lambda: fn(tparams, dparams)

    return median_in_turns({name: build(*spec) for name, spec in methods.items()}, repeats, iters)


def median_in_turns(runs: dict[str, Any], repeats: int, per_call: int) -> dict[str, float]:
    """Seconds per unit of work of each ``name -> fn`` (``fn()`` does ``per_call`` units): the
    functions take turns for ``repeats`` rounds, so a drift in machine speed hits all alike, and
    each keeps its median round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - t0) / per_call)
    return {name: statistics.median(t) for name, t in times.items()}


def step_costs(target, drafter=None, *, block_size: int = 16, context: int = 256, batch: int = 1,
               iters: int = 50) -> dict[str, float]:
    """Seconds per target pass over 1 token (AR step) and over a ``block_size`` block, and per
    drafter pass, each measured inside one jitted ``fori_loop`` over a cache holding ``context``
    committed tokens (so dispatch overhead is amortised as in the real loop).

    Measured alone, each pass finds its own weights hot in the CPU caches; in the speculative loop
    the drafter and the target alternate and evict each other's. ``draft_verify_s`` is therefore
    also measured: a drafter pass and the target's verification of the drafted block per iteration
    (the loop without acceptance and commit), the honest denominator of the speedup ceiling.
    """
    tgraph, tparams = nnx.split(target)
    max_len = context + block_size + 16

    def timed(fn, *args) -> float:
        compiled = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return (time.perf_counter() - t0) / iters

    def target_loop(params, t):
        model = nnx.merge(tgraph, params)
        cache = model.init_cache(batch, max_len).at_lengths(jnp.full((batch,), context, jnp.int32))
        tokens = jnp.ones((batch, t), jnp.int32)
        positions = context + jnp.broadcast_to(jnp.arange(t), (batch, t))

        def body(i, carry):
            cache, acc = carry
            out = model(tokens + i % 7, positions, cache)
            return out.cache.keep(jnp.zeros_like(cache.lengths), t), acc + out.logits[0, -1, 0]

        return jax.lax.fori_loop(0, iters, body, (cache, 0.0))[1]

    out = {"ar_step_s": timed(lambda p: target_loop(p, 1), tparams),
           "verify_s": timed(lambda p: target_loop(p, block_size), tparams)}
    if drafter is not None:
        dgraph, dparams = nnx.split(drafter)
        method = method_for(drafter, block_size=block_size)
        lengths = jnp.full((batch,), context, jnp.int32)

        def start(dp, tp):  # the drafter's state and the target's cache, each holding ``context`` tokens
            d, model = nnx.merge(dgraph, dp), nnx.merge(tgraph, tp)
            dstate = method.init(d, batch, max_len, model.dtype)
            dstate = jax.tree.map(lambda x: x.at_lengths(lengths) if isinstance(x, Cache) else x, dstate,
                                  is_leaf=lambda x: isinstance(x, Cache))
            return d, model, dstate, model.init_cache(batch, max_len).at_lengths(lengths)

        def draft(d, model, dstate, tcache, i):  # the anchor depends on i so XLA cannot hoist the pass
            anchor = jnp.full((batch,), i % 7, jnp.int32)
            step = StepInputs(anchor, lengths, jnp.zeros((batch, max_len), jnp.int32), lengths + 1, tcache)
            return anchor, method.propose(d, model, dstate, step, jax.random.key(0), SamplingParams())[0]

        def draft_loop(dp, tp):
            d, model, dstate, tcache = start(dp, tp)
            return jax.lax.fori_loop(0, iters, lambda i, acc: acc + draft(d, model, dstate, tcache, i)[1][0,
                                                                                                          -1],
                                     jnp.int32(0))

        def draft_verify_loop(dp, tp):  # a draft pass, then the target's pass over its block
            d, model, dstate, tcache = start(dp, tp)
            positions = context + jnp.broadcast_to(jnp.arange(block_size), (batch, block_size))

            def body(i, carry):
                tcache, acc = carry
                anchor, drafts = draft(d, model, dstate, tcache, i)  # [B], [B, Q-1]
                block = jnp.concatenate([anchor[:, None], jnp.maximum(drafts, 0)], axis=1)  # [B, Q]
                out = model(block, positions, tcache)
                return out.cache.keep(jnp.zeros_like(lengths), block_size), acc + out.logits[0, -1, 0]

            return jax.lax.fori_loop(0, iters, body, (tcache, 0.0))[1]

        out["draft_s"] = timed(draft_loop, dparams, tparams)
        out["draft_verify_s"] = timed(draft_verify_loop, dparams, tparams)
    out["verify_over_ar"] = out["verify_s"] / out["ar_step_s"]
    return out
