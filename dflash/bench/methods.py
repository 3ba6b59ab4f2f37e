"""Decoding methods side by side in one process: τ, speed, speedup vs AR and the speedup ceiling."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dflash.bench.timing import pass_costs
from dflash.decoding.autoregressive import check_context
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate


def bench_methods(target, prompts: list[list[int]], methods: dict[str, tuple[Any, Any]], *,
                  max_new_tokens: int = 256, batch_size: int = 1, sampling=None, rule: str | None = None,
                  eos_ids: tuple[int, ...] = (), mask_token_id: int | None = None, seed: int = 0,
                  warmup: bool = True, compact: bool = True, ceiling: bool = False,
                  allow_longer_than_context: bool = False, mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs every method on the same prompts in this process; speedups are vs ``methods['ar']``.

    The methods take turns batch by batch (AR, then each drafter, on the same batch), so a drift
    in the machine's speed over the run hits every method alike. Each batch is compiled and run
    once before it is timed (compile time is reported separately), so every method is measured
    in the steady state a server sees. ``ceiling``: also time each method's bare step
    (``pass_costs``) and report the speedup the engine would reach if its loop cost nothing
    (``ceiling = tau * t_ar / t_method``) and the share of it achieved (``efficiency``). Every
    prompt is checked against the target's context before anything runs. ``mesh``: decode
    there (target and drafters on it already).
    """
    check_context([len(p) for p in prompts], [max_new_tokens] * len(prompts),
                  target.cfg.max_position_embeddings, allow_longer_than_context)
    sampling = sampling or SamplingParams()
    acc: dict[str, dict[str, Any]] = {
        name: {"per_prompt": [], "elapsed": 0.0, "compile_s": 0.0, "generated": 0, "forwards": 0, "acc": [],
               "step_tokens": 0,
               "max_len": 0} for name in methods}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for name, (method, drafter) in methods.items():
            a = acc[name]
            kw = dict(method=method, drafter=drafter, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                      mask_token_id=mask_token_id, sampling=sampling, key=jax.random.key(seed + start),
                      rule=rule, compact=compact, allow_longer_than_context=allow_longer_than_context,
                      mesh=mesh)
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
                step_tokens = len(toks) - 1 if row_acc else 0  # the first token is the prefill's
                a["step_tokens"] += step_tokens
                a["per_prompt"].append({"prompt_index": start + i, "generated_tokens": len(toks),
                                        "tau": step_tokens / len(row_acc) if row_acc else float("nan"),
                                        "mean_acceptance_length": float(np.mean(row_acc)) if row_acc
                                        else float("nan"),
                                        "acceptance_lengths": row_acc,
                                        "target_forwards": res.target_forwards[i], "tokens": toks})
    results: dict[str, Any] = {}
    for name, (method, _) in methods.items():
        a = acc[name]
        hist = [0] * method.block_size
        for n in a["acc"]:
            hist[n - 1] += 1
        results[name] = {
            # tau: tokens emitted by verify steps / steps; mean_acceptance_length: the mean of the
            # per-step list (the PyTorch reference's number), higher where EOS or the budget cut a step.
            "tau": a["step_tokens"] / len(a["acc"]) if a["acc"] else float("nan"),
            "mean_acceptance_length": float(np.mean(a["acc"])) if a["acc"] else float("nan"),
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
