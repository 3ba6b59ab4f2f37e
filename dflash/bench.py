"""Benchmarks measured side by side in one process (never asserted in tests)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dflash.decoding import SamplingParams, generate
from dflash.models import load_target, resolve
from dflash.models.tokenizer import load_tokenizer


def ar_vs_transformers(target: str, prompts: list[str], *, max_new_tokens: int = 256,
                       repeats: int = 3, torch_threads: int | None = None) -> dict[str, Any]:
    """Greedy batch-1 AR decoding: our on-device loop vs ``transformers.generate`` (PyTorch CPU).

    Both generate exactly ``max_new_tokens`` per prompt (EOS ignored) from the same prompt
    ids; times exclude compilation / warm-up and take the median of ``repeats`` runs.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if torch_threads:
        torch.set_num_threads(torch_threads)
    directory = resolve(target)
    tokenizer = load_tokenizer(directory)
    ours = load_target(directory)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    per_prompt = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ours_times, hf_times = [], []
        ours_tokens = hf_tokens = None
        for rep in range(repeats + 1):  # the first repeat warms up / compiles
            res = generate(ours, [ids], max_new_tokens=max_new_tokens, eos_ids=(),
                           sampling=SamplingParams(), key=jax.random.key(0))
            ours_tokens = res.tokens[0]
            with torch.no_grad():
                t0 = time.perf_counter()
                out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
                hf_elapsed = time.perf_counter() - t0
            hf_tokens = out[0, len(ids):].tolist()
            if rep:
                ours_times.append(res.elapsed_s)
                hf_times.append(hf_elapsed)
        ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
        per_prompt.append({
            "prompt_tokens": len(ids), "new_tokens": max_new_tokens,
            "ours_tokens_per_s": max_new_tokens / ours_s, "hf_tokens_per_s": max_new_tokens / hf_s,
            "ratio": hf_s / ours_s,
            "same_tokens": ours_tokens == hf_tokens,
            "first_divergence": next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens,
                                                                        strict=True)) if a != b), None),
        })
    ours_tps = float(np.mean([p["ours_tokens_per_s"] for p in per_prompt]))
    hf_tps = float(np.mean([p["hf_tokens_per_s"] for p in per_prompt]))
    return {
        "target": str(target), "batch_size": 1, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
        "ours_tokens_per_s": ours_tps, "transformers_tokens_per_s": hf_tps, "ratio": ours_tps / hf_tps,
        "per_prompt": per_prompt,
    }


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def load_prompts(source: str, tokenizer: Any, *, field: str = "prompt", split: str = "train",
                 limit: int = 0) -> list[list[int]]:
    """Prompt ids from a jsonl of ``{"prompt": ...}`` / ``{"messages": [...]}``, a ``datasets`` id, or
    ``tiny-code-heldout`` (function headers from stdlib files the tiny target never saw)."""
    from dflash.training.data import DataConfig, _load_dataset

    if source == "tiny-code-heldout":
        from dflash.training.tiny_corpus import heldout_prompts

        texts = heldout_prompts(limit or 16)
        return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    ds = _load_dataset(DataConfig(source=source, split=split))
    out = []
    for row in ds:
        if row.get(field) is not None:
            text = row[field]
        elif row.get("messages"):
            msgs = list(row["messages"])
            if msgs[-1]["role"] == "assistant":  # the prompt is everything before the answer
                msgs = msgs[:-1]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            from dflash.config import ConfigError

            raise ConfigError(f"prompt source {source!r}: a row has neither {field!r} nor 'messages' "
                              f"(columns: {list(row)})")
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
        if limit and len(out) == limit:
            break
    return out


def bench_methods(target, prompts: list[list[int]], methods: dict[str, tuple[Any, Any]], *,
                  max_new_tokens: int = 256, batch_size: int = 1, sampling=None, rule: str | None = None,
                  eos_ids: tuple[int, ...] = (), mask_token_id: int = -1, seed: int = 0,
                  warmup: bool = True, compact: bool = True, ceiling: bool = False) -> dict[str, Any]:
    """Runs every method on the same prompts in this process; speedups are vs ``methods['ar']``.

    The methods take turns batch by batch (AR, then each drafter, on the same batch), so a drift
    in the machine's speed over the run hits every method alike. Each batch is compiled and run
    once before it is timed (compile time is reported separately), so every method is measured
    in the steady state a server sees. ``ceiling``: also time each method's bare step
    (``pass_costs``) and report the speedup the engine would reach if its loop cost nothing
    (``ceiling = tau * t_ar / t_method``) and the share of it achieved (``efficiency``).
    """
    from dflash.decoding.sampling import SamplingParams
    from dflash.decoding.speculative import speculative_generate

    sampling = sampling or SamplingParams()
    acc: dict[str, dict[str, Any]] = {
        name: {"per_prompt": [], "elapsed": 0.0, "compile_s": 0.0, "generated": 0, "forwards": 0, "acc": [],
               "max_len": 0} for name in methods}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for name, (method, drafter) in methods.items():
            a = acc[name]
            kw = dict(method=method, drafter=drafter, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                      mask_token_id=mask_token_id, sampling=sampling, key=jax.random.key(seed + start),
                      rule=rule, compact=compact)
            if warmup:  # every batch once untimed: first-touch allocations and cold caches stay out
                speculative_generate(target, batch, **kw)
            res = speculative_generate(target, batch, **kw)
            a["elapsed"] += res.elapsed_s
            a["compile_s"] += res.compile_s
            a["generated"] += res.num_generated
            a["forwards"] += sum(res.target_forwards)
            a["max_len"] = max(a["max_len"], res.max_len)
            for i, toks in enumerate(res.tokens):
                row_acc = res.acceptance_lengths[i]
                a["acc"].extend(row_acc)
                a["per_prompt"].append({"prompt_index": start + i, "generated_tokens": len(toks),
                                        "tau": float(np.mean(row_acc)) if row_acc else float("nan"),
                                        "acceptance_lengths": row_acc,
                                        "target_forwards": res.target_forwards[i], "tokens": toks})
    results: dict[str, Any] = {}
    for name, (method, _) in methods.items():
        a = acc[name]
        hist = [0] * method.block_size
        for n in a["acc"]:
            hist[n - 1] += 1
        results[name] = {
            "tau": float(np.mean(a["acc"])) if a["acc"] else float("nan"),
            "tokens_per_s": a["generated"] / max(a["elapsed"], 1e-9),
            "time_per_output_token_ms": 1000 * a["elapsed"] / max(a["generated"], 1),
            "generated_tokens": a["generated"], "elapsed_s": a["elapsed"], "compile_s": a["compile_s"],
            "target_forwards": a["forwards"], "block_size": method.block_size, "max_len": a["max_len"],
            "acceptance_histogram": hist, "per_prompt": a["per_prompt"],
        }
    base = results.get("ar")
    for r in results.values():
        r["speedup"] = (r["tokens_per_s"] / base["tokens_per_s"]) if base else float("nan")
    out = {"methods": results, "num_prompts": len(prompts), "max_new_tokens": max_new_tokens,
           "batch_size": batch_size, "temperature": sampling.temperature, "rule": rule,
           "backend": jax.default_backend()}
    if ceiling and base is not None:
        # The bare steps run mid-generation: the median prompt plus half the new tokens committed.
        context = int(np.median([len(p) for p in prompts])) + max_new_tokens // 2
        costs = pass_costs(target, {n: (*methods[n], results[n]["max_len"]) for n in methods},
                           batch=min(batch_size, len(prompts)), context=context, sampling=sampling, rule=rule,
                           mask_token_id=mask_token_id)
        for name, r in results.items():
            r["pass_ms"] = 1000 * costs[name]
            r["ceiling"] = r["tau"] * costs["ar"] / costs[name]
            r["efficiency"] = r["speedup"] / r["ceiling"]
        out["ceiling_context"] = context
    return out


def pass_costs(target, methods: dict[str, tuple[Any, Any, int]], *, batch: int = 1, context: int = 256,
               sampling=None, rule: str | None = None, mask_token_id: int = -1, iters: int = 40,
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
    from flax import nnx

    from dflash import cache as kvc
    from dflash.decoding.sampling import SamplingParams
    from dflash.decoding.speculative import draft_and_verify

    sampling = sampling or SamplingParams()
    rule = rule or ("greedy" if sampling.greedy else "token")
    tgraph, tparams = nnx.split(target)
    lengths = jnp.full((batch,), context, jnp.int32)
    key = jax.random.key(0)

    def rolled_back(state):
        return jax.tree.map(lambda x: x.with_lengths(lengths) if isinstance(x, kvc.KVCache) else x, state,
                            is_leaf=lambda x: isinstance(x, kvc.KVCache))

    def build(method, drafter, max_len: int):
        kvc.check_fits(context + getattr(method, "verify_tokens", method.block_size), max_len, "a timed step")
        dgraph, dparams = nnx.split(drafter) if drafter is not None else (None, None)

        def run(tp, dp):
            model = nnx.merge(tgraph, tp)
            d = nnx.merge(dgraph, dp) if dgraph is not None else None
            cache = kvc.init_cache(model.cfg, batch, max_len, model.dtype).with_lengths(lengths)
            dstate = rolled_back(method.init(d, batch, max_len, model.dtype))
            tokens_BL = jax.random.randint(key, (batch, max_len + method.block_size), 2, model.cfg.vocab_size)

            def body(i, carry):
                cache, dstate, total = carry
                anchor = jnp.full((batch,), 2 + i % 7, jnp.int32)  # varies, so no pass is hoisted
                k_draft, k_verify = jax.random.split(jax.random.fold_in(key, i))
                _, accepted, extra, cache_v, hidden = draft_and_verify(
                    method, d, model, cache, dstate, anchor, lengths, tokens_BL, lengths + 1, mask_token_id,
                    sampling, rule, k_draft, k_verify)
                dstate = method.commit(d, dstate, hidden, lengths, accepted)
                return cache_v.with_lengths(lengths), rolled_back(dstate), total + jnp.sum(accepted + extra)

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
    from flax import nnx

    from dflash import cache as kvc

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
        cache = kvc.init_cache(model.cfg, batch, max_len, model.dtype).with_lengths(
            jnp.full((batch,), context, jnp.int32))
        tokens = jnp.ones((batch, t), jnp.int32)
        positions = context + jnp.broadcast_to(jnp.arange(t), (batch, t))

        def body(i, carry):
            cache, acc = carry
            out = model(tokens + i % 7, positions, cache)
            return out.cache.with_lengths(cache.lengths), acc + out.logits[0, -1, 0]

        return jax.lax.fori_loop(0, iters, body, (cache, 0.0))[1]

    out = {"ar_step_s": timed(lambda p: target_loop(p, 1), tparams),
           "verify_s": timed(lambda p: target_loop(p, block_size), tparams)}
    if drafter is not None:
        from dflash.drafters.orthrus import OrthrusDrafter

        dgraph, dparams = nnx.split(drafter)

        def draft_loop(dp, tp):
            d, model = nnx.merge(dgraph, dp), nnx.merge(tgraph, tp)
            if isinstance(d, OrthrusDrafter):  # Orthrus drafts from the target's own cache
                cache = kvc.init_cache(model.cfg, batch, max_len, model.dtype)
            else:
                cache = d.init_context_cache(batch, max_len, model.dtype)
            cache = cache.with_lengths(jnp.full((batch,), context, jnp.int32))

            def body(i, acc):  # the anchor depends on i so XLA cannot hoist the pass out of the loop
                anchor = jnp.full((batch,), i % 7, jnp.int32)
                return acc + d.draft_logits(model, cache, anchor, block_size)[0, -1, 0]

            return jax.lax.fori_loop(0, iters, body, 0.0)

        def draft_verify_loop(dp, tp):  # a DFlash draft pass, then the target's pass over its block
            d, model = nnx.merge(dgraph, dp), nnx.merge(tgraph, tp)
            lengths = jnp.full((batch,), context, jnp.int32)
            dcache = d.init_context_cache(batch, max_len, model.dtype).with_lengths(lengths)
            tcache = kvc.init_cache(model.cfg, batch, max_len, model.dtype).with_lengths(lengths)
            positions = context + jnp.broadcast_to(jnp.arange(block_size), (batch, block_size))

            def body(i, carry):
                tcache, acc = carry
                anchor = jnp.full((batch,), i % 7, jnp.int32)
                drafts = jnp.argmax(d.draft_logits(model, dcache, anchor, block_size), axis=-1)  # [B, K-1]
                out = model(jnp.concatenate([anchor[:, None], drafts], axis=1), positions, tcache)
                return out.cache.with_lengths(lengths), acc + out.logits[0, -1, 0]

            return jax.lax.fori_loop(0, iters, body, (tcache, 0.0))[1]

        out["draft_s"] = timed(draft_loop, dparams, tparams)
        if not isinstance(drafter, OrthrusDrafter):
            out["draft_verify_s"] = timed(draft_verify_loop, dparams, tparams)
    out["verify_over_ar"] = out["verify_s"] / out["ar_step_s"]
    return out


def loss_head_costs(*, batch: int = 8, anchors: int = 64, block_size: int = 16, hidden: int = 256,
                    vocab: int = 4096, repeats: int = 5, iters: int = 5, seed: int = 0) -> dict[str, Any]:
    """Seconds per forward + backward of the drafter's loss head at a training step's shape.

    The head is ``lm_head`` over every block row (``[batch, anchors, block_size - 1, hidden]``)
    and the decayed loss, differentiated with respect to the rows. It is timed with the fused
    loss (``objective.decayed_loss``) and with its autodiff-only reference, CE alone and CE + KL,
    in turn for ``repeats`` rounds (median). Both give the same value and gradient (tests).
    """
    from dflash.training import objective as obj

    rng = np.random.default_rng(seed)
    k = block_size - 1
    h = jnp.asarray(rng.normal(size=(batch, anchors, k, hidden)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden), jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(batch, anchors, k, vocab)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, anchors, k)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, anchors, k)) < 0.9)
    weights = obj.loss_weights(block_size, 7.0)

    args = (h, w_DV, t_logits, labels, mask, weights)  # arguments, not constants XLA would fold

    def make(loss_fn, kl_weight: float):
        def head(h_BAkD, w_DV, t_logits, labels, mask, weights):
            logits = jnp.einsum("BAkD,DV->BAkV", h_BAkD, w_DV)
            out = loss_fn(logits, labels, mask, weights, t_logits, 1.0, kl_weight)
            return out[0] if isinstance(out, tuple) else out

        fn = jax.jit(jax.value_and_grad(head)).lower(*args).compile()
        jax.block_until_ready(fn(*args))

        def run():
            for _ in range(iters):
                out = fn(*args)
            return out

        return run

    impls = (("fused", obj.decayed_loss), ("reference", obj.reference_decayed_loss))
    losses = (("ce", 0.0), ("ce_kl", 1.0))
    runs = {f"{impl}_{loss}": make(fn, kl) for impl, fn in impls for loss, kl in losses}
    out: dict[str, Any] = {f"{name}_s": t for name, t in median_in_turns(runs, repeats, iters).items()}
    for loss in ("ce", "ce_kl"):
        out[f"speedup_{loss}"] = out[f"reference_{loss}_s"] / out[f"fused_{loss}_s"]
    out["shape"] = [batch, anchors, k, vocab]
    return out


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
    """Greedy acceptance of a DFlash drafter and of prompt lookup at *every* anchor of the target's
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
    from dflash.decoding.drafters import NgramDraft
    from dflash.drafters.dflash import DFlashDrafter
    from dflash.training import objective as obj

    if not isinstance(drafter, DFlashDrafter):
        raise TypeError(f"anchor_profile profiles DFlash drafters, not {type(drafter).__name__}")
    k = block_size or drafter.cfg.block_size
    ar = generate(target, prompts, max_new_tokens=max_new_tokens + k, eos_ids=())
    ngram = NgramDraft(block_size=k)
    rows: list[dict[str, Any]] = []
    for prompt, gen in zip(prompts, ar.tokens, strict=True):
        seq = np.asarray(list(prompt) + list(gen), np.int32)
        s, first = len(seq), len(prompt)
        anchors = np.arange(first, first + max_new_tokens)  # [A] positions of the generated tokens
        ids, pos = jnp.asarray(seq)[None], jnp.arange(s)[None]
        out = target(ids, pos, hidden_layers=drafter.cfg.target_layer_ids)  # causal, whole trajectory
        top1 = np.asarray(jnp.max(jax.nn.softmax(out.logits[0], axis=-1), axis=-1))  # [S]
        feats = jnp.transpose(out.hidden, (1, 2, 0, 3)).reshape(1, s, -1)  # [1, S, n*D]
        a = len(anchors)
        block = np.concatenate([seq[anchors][:, None], np.full((a, k - 1), drafter.cfg.mask_token_id)], 1)
        x = target.embed(jnp.asarray(block).reshape(1, a * k)).reshape(1, a, k, -1)
        q_pos = jnp.asarray(anchors)[None, :, None] + jnp.arange(k)  # [1, A, K]
        ctx_mask = obj.anchor_context_mask(jnp.asarray(anchors)[None], jnp.ones((1, a), bool),
                                           jnp.ones((1, s), jnp.int32))
        h = drafter(x, q_pos, drafter.project_context(feats), pos, ctx_mask)  # [1, A, K, D]
        logits = target.unembed(h[0, :, 1:]).at[..., drafter.cfg.mask_token_id].set(-jnp.inf)
        d_drafts = np.asarray(jnp.argmax(logits, axis=-1))  # [A, K-1]
        n_drafts, _ = ngram.propose(None, None, (), jnp.asarray(seq[anchors]), None,
                                    jnp.broadcast_to(jnp.asarray(seq), (a, s)), jnp.asarray(anchors + 1),
                                    None, None)
        truth = seq[anchors[:, None] + 1 + np.arange(k - 1)[None]]  # [A, K-1]
        acc_d = _leading_matches(d_drafts, truth)
        acc_n = _leading_matches(np.asarray(n_drafts), truth)
        eos = [i for i, t in enumerate(gen[:max_new_tokens]) if t in eos_ids]
        eos_at = eos[0] if eos else max_new_tokens
        rows.append({"drafter": acc_d.tolist(), "ngram": acc_n.tolist(),
                     "target_top1": top1[anchors].tolist(),
                     "steps": {name: _walk(acc, max_new_tokens, eos_at) for name, acc in
                               (("drafter", acc_d), ("ngram", acc_n), ("best", np.maximum(acc_d, acc_n)))}})
    summary: dict[str, Any] = {}
    for name in ("drafter", "ngram", "best"):
        steps = [t for r in rows for t in r["steps"][name]]
        summary[f"tau_{name}"] = float(np.mean(steps)) if steps else float("nan")
    acc_d = np.concatenate([r["drafter"] for r in rows])
    acc_n = np.concatenate([r["ngram"] for r in rows])
    full = k - 1
    summary["anchors"] = int(acc_d.size)
    summary["ngram_full_blocks"] = int((acc_n == full).sum())
    summary["drafter_full_blocks"] = int((acc_d == full).sum())
    summary["drafter_accepted_where_ngram_full"] = np.bincount(acc_d[acc_n == full], minlength=k).tolist()
    summary["ngram_accepted_where_drafter_full"] = np.bincount(acc_n[acc_d == full], minlength=k).tolist()
    return {"summary": summary, "rows": rows, "block_size": k, "max_new_tokens": max_new_tokens}


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def drafter_memory(target, method, drafter=None, *, batch: int = 1, max_len: int = 512) -> dict[str, Any]:
    """Bytes of persistent decoding state, summed over the arrays actually allocated.

    ``drafter_state_bytes`` is what ``method.init`` creates for ``batch`` rows of ``max_len``
    slots (DFlash: its context K/V cache; Orthrus and n-gram: nothing), ``drafter_params_bytes``
    the drafter module's parameters (DFlash: its layers; Orthrus: the diffusion attentions).
    Their sum is the memory a method adds beyond the target's parameters and KV cache.
    """
    from flax import nnx

    from dflash import cache as kvc

    state = method.init(drafter, batch, max_len, target.dtype)
    params = _nbytes(nnx.state(drafter, nnx.Param)) if drafter is not None else 0
    kv = kvc.init_cache(target.cfg, batch, max_len, target.dtype)
    out = {"batch": batch, "max_len": max_len, "drafter_params_bytes": params,
           "drafter_state_bytes": _nbytes(state),
           "target_params_bytes": _nbytes(nnx.state(target, nnx.Param)), "target_kv_cache_bytes": _nbytes(kv)}
    out["extra_bytes"] = out["drafter_params_bytes"] + out["drafter_state_bytes"]
    return out
