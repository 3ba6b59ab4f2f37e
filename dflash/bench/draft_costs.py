"""Step costs of three draft methods on one Gemma 4 target, from plans compiled for a TPU slice
(docs/scaling.md, "Gemma 4: MTP assistant vs DFlash step costs").

A speculative step is one verify pass of the target plus the drafting before it:

- prompt lookup (n-gram): a verify pass of ``gamma`` tokens and ~no drafting;
- DFlash (block ``B``): a verify pass of ``B`` tokens and ONE parallel drafter pass (the context
  features of the last step written into the drafter's cache, then ``B`` rows through its layers
  and the target's LM head);
- the Gemma 4 MTP assistant (``k`` drafts): a verify pass of ``k + 1`` tokens and ``k`` SEQUENTIAL
  assistant steps (each one query through the assistant's layers over the target's KV, its head).

Each pass is compiled for the slice (abstract weights: nothing allocated, no checkpoint) to check
it fits; its time is the plans' estimate (``dflash.plan``): the bytes a chip reads (its weight shard
and the cache it attends to) at HBM bandwidth, or its FLOPs (``dflash.flops`` / the layer kinds) at
peak, whichever binds. The target's passes come from ``dflash.plan.decode_plan`` and the per-gamma
rows of ``dflash.bench.moe_ceiling.ceiling`` (uniform routing for a MoE target). With ``AR`` the
target's one-token step, a method's step costs ``step / AR`` AR steps, so it breaks even at
``tau = step / AR`` committed tokens per step and its speedup ceiling is ``tau / (step / AR)``.

Run: ``python -m dflash.bench.draft_costs --target gemma4_31b --topology v5e-8 --json OUT``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

REFERENCE_TAUS = (2.0, 3.0, 4.0, 6.0, 8.0)
ASSISTANT_KS = tuple(range(1, 8))
DFLASH_BLOCKS = (8, 16)
LOOKUP_GAMMAS = (4, 8)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's presets (a source checkout)
PRESET_YAML = {"gemma4_31b": CONFIGS / "gemma4_31b_dflash.yaml",
               "gemma4_26b_a4b": CONFIGS / "gemma4_26b_a4b_dflash.yaml"}
ASSISTANT_LAYERS = 4  # google/gemma-4-31B-it-assistant has 4 layers (public MLX / GGUF copies of it)
# The published assistants' weight bytes in bf16, from public copies (their widths are not known here):
# gemma-4-31B-it-assistant 0.94 GB (MLX bf16 copy), gemma-4-26B-A4B-it-assistant ~0.4 B params (GGUF).
PUBLISHED_ASSISTANT_BYTES = {"gemma4_31b": 0.94e9, "gemma4_26b_a4b": 0.8e9}


# ----------------------------------------------------------------------------- the arithmetic
def step_over_ar(verify_s: float, draft_s: float, ar_s: float) -> float:
    """A speculative step's cost in AR steps: ``(verify + drafting) / AR``; it is also the
    break-even tau (the tokens a step must commit to match plain decoding)."""
    if ar_s <= 0:
        raise ValueError(f"the AR step's time must be positive, got {ar_s}")
    return (verify_s + draft_s) / ar_s


def speedup_ceiling(tau: float, cost: float, max_tau: float) -> float:
    """The speedup at ``tau`` committed tokens per step of ``cost`` AR steps; a step commits at most
    ``max_tau`` tokens (its verify width), so ``tau`` is capped there."""
    return min(tau, max_tau) / cost


def method_rows(verify_s: dict[int, float], ar_s: float, dflash_s: dict[int, float],
                assistant_s: dict[str, float], taus: tuple[float, ...] = REFERENCE_TAUS,
                ks: tuple[int, ...] = ASSISTANT_KS, lookups: tuple[int, ...] = LOOKUP_GAMMAS
                ) -> list[dict[str, Any]]:
    """Per method: verify and drafting time, ``step / AR`` (= break-even tau) and the ceiling at
    ``taus``. ``verify_s``: the target's pass per new tokens; ``dflash_s``: a drafter pass per block;
    ``assistant_s``: one assistant step per assistant variant (its name)."""
    def row(method: str, width: int, draft: float) -> dict[str, Any]:
        cost = step_over_ar(verify_s[width], draft, ar_s)
        return {"method": method, "verify_tokens": width, "verify_s": verify_s[width], "draft_s": draft,
                "step_s": verify_s[width] + draft, "step_over_ar": cost, "break_even_tau": cost,
                "ceiling": {str(t): speedup_ceiling(t, cost, width) for t in taus}}

    return ([row(f"lookup γ={g}", g, 0.0) for g in lookups]
            + [row(f"{name} k={k}", k + 1, k * step) for name, step in assistant_s.items() for k in ks]
            + [row(f"DFlash B={b}", b, dflash_s[b]) for b in sorted(dflash_s)])


# ----------------------------------------------------------------------------- compiled passes
def _pass(name: str, fn: Any, args: tuple, mesh: Any, topo: Any, flops: float,
          read_bytes: float) -> dict[str, Any]:
    """Compiles ``fn(*args)`` for the slice: its memory per chip and fit, XLA's own count of FLOPs and
    bytes per chip (a cross-check: Pallas kernels are invisible to it), and the plans' estimate."""
    from dflash.plan import compile_for_topology, fit_fields, local_bytes, memory, xla_flops

    compiled, seconds = compile_for_topology(fn, args, mesh)
    mem = memory(compiled, local_bytes(args))
    cost = None if not hasattr(compiled, "cost_analysis") else compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out = {"name": name, "flops": flops, "bytes_read_per_chip": round(read_bytes),
           "xla_flops_per_chip": xla_flops(compiled),
           "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)) if cost else 0.0,
           "est_s_compute": flops / (topo.chips * topo.peak_flops), "est_s_memory": read_bytes / topo.hbm_bw,
           "memory_analysis": mem, "compile_s": round(seconds, 1), **fit_fields(mem["total"], topo, compiled)}
    out["est_s"] = max(out["est_s_compute"], out["est_s_memory"])
    return out


def dflash_config(target: str, yaml: str | None, block: int) -> Any:
    """The preset's DFlash drafter, built by the DFlash kind's fresh-config path from its yaml."""
    from dflash.configio import load_yaml
    from dflash.plan import model_config
    from dflash.training.config import ExperimentConfig

    path = yaml or PRESET_YAML.get(target)
    if path is None:
        raise ValueError(f"no DFlash preset yaml for {target!r}; pass --dflash-config")
    cfg = load_yaml(ExperimentConfig, path)
    tcfg = model_config(target)
    mask = cfg.drafter.mask_token_id
    return cfg.kind.config(cfg.drafter, tcfg, mask_token_id=tcfg.vocab_size - 1 if mask is None else mask,
                           block_size=block)


def drafter_passes(target: str, topology: str, *, blocks: tuple[int, ...], yaml: str | None, batch: int,
                   context: int, assistant_layers: int) -> dict[str, Any]:
    """One DFlash pass per block (write the last step's ``B`` context features, then draft) and one
    assistant step (``AssistantConfig.for_target``: ``assistant_layers`` layers of the target's spec),
    each next to the target's abstract weights (embedding, LM head, KV cache), compiled for the slice."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dflash import sharding
    from dflash.drafters.dflash.kind import DFLASH
    from dflash.drafters.gemma4_assistant.kind import GEMMA4_ASSISTANT
    from dflash.drafters.gemma4_assistant.model import AssistantConfig, producers
    from dflash.models import kinds
    from dflash.plan import (
        abstract_target,
        abstract_with,
        get_topology,
        local_bytes,
        make_mesh,
        model_config,
        topology_devices,
    )

    topo = get_topology(topology)
    m = make_mesh((1, 1, topo.chips), topology_devices(topology))
    tcfg, dtype = model_config(target), jnp.bfloat16
    tgraph, tstate = abstract_target(tcfg, dtype, m)
    replicated = NamedSharding(m, P())
    d, v = tcfg.hidden_size, tcfg.vocab_size
    table = tstate["embed_tokens"]  # the tied embedding = the LM head, read whole by a head
    head_bytes = local_bytes(table)

    def abstract(kind: Any, dcfg: Any) -> tuple[Any, Any]:
        graph, state = nnx.split(nnx.eval_shape(lambda: kind.construct(dcfg, dtype=dtype)))
        return graph, abstract_with(state, sharding.tree_shardings(state, m))

    def ints(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=replicated)

    out: dict[str, Any] = {"dflash": {}}
    for b in blocks:
        dcfg = dflash_config(target, yaml, b)
        dgraph, dstate = abstract(DFLASH, dcfg)
        shapes = jax.eval_shape(lambda lc=dcfg.layers, b=b: kinds.init_cache(lc, batch, context + b, dtype))
        cache = abstract_with(shapes, sharding.state_shardings(shapes, m))
        feats = jax.ShapeDtypeStruct((batch, b, len(dcfg.target_layer_ids) * d), dtype, sharding=replicated)

        @functools.partial(jax.jit, donate_argnums=2)
        def dflash_step(dstate, tstate, cache, feats, anchor, dgraph=dgraph, b=b):
            drafter, tgt = nnx.merge(dgraph, dstate), nnx.merge(tgraph, tstate)
            positions = cache.lengths[:, None] + jnp.arange(b, dtype=jnp.int32)[None]
            cache = drafter.extend_context(cache, feats, positions, cache.lengths + b)
            return drafter.draft_logits(tgt, cache, anchor, b), cache

        lc = dcfg.layers
        kv = lc.num_kv_heads * lc.head_dim
        rows = batch * b
        flops = (sum(kinds.layer_flops(lc, i, rows, context + b) for i in range(lc.num_layers))
                 + lc.num_layers * 2.0 * rows * 2 * d * kv  # the new context's K/V projection
                 + 2.0 * rows * len(dcfg.target_layer_ids) * d * d  # fc over the new features
                 + 2.0 * batch * (b - 1) * d * v)  # the target's LM head at the drafted rows
        read = local_bytes(dstate) + head_bytes + local_bytes(cache)
        args = (dstate, tstate, cache, feats, ints(batch))
        out["dflash"][b] = _pass(f"DFlash pass B={b}", dflash_step, args, m, topo, flops, read)
        out["dflash"][b]["drafter_params"] = sum(x.size for x in jax.tree.leaves(dstate))

    acfg = AssistantConfig.for_target(tcfg, num_layers=assistant_layers, block_size=2)
    agraph, astate = abstract(GEMMA4_ASSISTANT, acfg)
    shapes = jax.eval_shape(lambda: kinds.init_cache(tcfg, batch, context + 16, dtype))
    tcache = abstract_with(shapes, sharding.state_shardings(shapes, m))
    hidden = jax.ShapeDtypeStruct((batch, 1, d), dtype, sharding=replicated)

    @jax.jit
    def assistant_step(astate, tstate, cache, token, hidden):
        head, tgt = nnx.merge(agraph, astate), nnx.merge(tgraph, tstate)
        kv = head.target_kv(tgt.cfg, cache)
        positions = jnp.broadcast_to(cache.lengths[:, None], token.shape)
        y, h = head(tgt.embed(token), hidden, positions, kv, cache.lengths)
        return head.logits(y), h

    lc, da = acfg.layers, acfg.hidden_size
    flops = (sum(kinds.layer_flops(lc, i, batch, context) for i in range(lc.num_layers))
             + 2.0 * batch * 3 * d * da + 2.0 * batch * da * v)  # pre / post projections, LM head
    kv_read = sum(local_bytes(tcache.layers[i]) for i in set(producers(tcfg).values()))
    read = local_bytes(astate) + kv_read
    out["assistant"] = _pass(f"assistant step ({assistant_layers} layers)", assistant_step,
                             (astate, tstate, tcache, ints(batch, 1), hidden), m, topo, flops, read)
    out["assistant"]["drafter_params"] = sum(x.size for x in jax.tree.leaves(astate))
    out["assistant"]["kv_read_bytes"] = kv_read
    return out


def draft_costs(target: str, topology: str, *, batch: int = 1, context: int = 2048,
                verify_compiled: tuple[int, ...] = DFLASH_BLOCKS, blocks: tuple[int, ...] = DFLASH_BLOCKS,
                yaml: str | None = None, assistant_layers: int = ASSISTANT_LAYERS,
                taus: tuple[float, ...] = REFERENCE_TAUS) -> dict[str, Any]:
    """The target's AR step and verify passes, the drafters' passes, and per method the step cost
    and ceiling (module docstring)."""
    from dflash.bench.moe_ceiling import ceiling
    from dflash.errors import ConfigError
    from dflash.plan import decode_plan, get_topology, model_config

    if model_config(target).model_type != "gemma4":  # before minutes of compiling
        raise ConfigError(f"--target {target!r} is not a Gemma 4 target: the assistant drafts for "
                          "gemma4 only")
    drafters = drafter_passes(target, topology, blocks=blocks, yaml=yaml, batch=batch, context=context,
                              assistant_layers=assistant_layers)
    plans = {g: decode_plan(target, topology, batch=batch, block_size=g, context=context)
             for g in verify_compiled}
    plan = plans[max(verify_compiled)]
    widths = sorted({1, *range(2, max(ASSISTANT_KS) + 2), *blocks, *LOOKUP_GAMMAS})
    verify = {r["gamma"]: r["est_s"] for r in ceiling(plan, gammas=tuple(widths))["rows"]}
    ar = verify[1]
    steps = {f"assistant ({assistant_layers} layers, target width)": drafters["assistant"]["est_s"]}
    published = PUBLISHED_ASSISTANT_BYTES.get(target)
    if published:  # the same estimate at the published assistant's bytes (sharded alike) + the KV it reads
        topo = get_topology(topology)
        read = published / topo.chips + drafters["assistant"]["kv_read_bytes"]
        flops = batch * published  # 2 FLOPs per bf16 parameter (2 bytes) and row
        est = max(read / topo.hbm_bw, flops / (topo.chips * topo.peak_flops))
        drafters["published_assistant"] = {"weight_bytes": published, "bytes_read_per_chip": round(read),
                                           "est_s": est}
        steps["assistant (published size)"] = drafters["published_assistant"]["est_s"]
    rows = method_rows(verify, ar, {b: p["est_s"] for b, p in drafters["dflash"].items()}, steps, taus)
    return {"target": target, "topology": topology, "batch": batch, "context": context,
            "mesh": plan["mesh"], "ar_s": ar, "verify_s": verify,
            "compiled_target_passes": {g: p["passes"] for g, p in plans.items()},
            "target_fits": all(p["all_fit"] for p in plans.values()),
            "dflash_passes": drafters["dflash"], "assistant_step": drafters["assistant"],
            "published_assistant_step": drafters.get("published_assistant"),
            "assistant_layers": assistant_layers, "reference_taus": list(taus), "methods": rows}


def table(result: dict[str, Any]) -> str:
    taus = result["reference_taus"]
    head = ("| method | verify tokens | verify (µs) | drafting (µs) | step / AR = break-even τ | "
            + " | ".join(f"ceiling τ={t:g}" for t in taus) + " |\n|---|---|---|---|---|"
            + "---|" * len(taus))
    lines = [head]
    for r in result["methods"]:
        lines.append(f"| {r['method']} | {r['verify_tokens']} | {r['verify_s'] * 1e6:.0f} | "
                     f"{r['draft_s'] * 1e6:.0f} | {r['step_over_ar']:.3f} | "
                     + " | ".join(f"{r['ceiling'][str(t)]:.2f}x" for t in taus) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.bench.draft_costs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="gemma4_31b", help="a gemma4 preset name (dflash.config presets)")
    p.add_argument("--topology", default="v5e-8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--verify-compiled", default="8,16",
                   help="verify widths compiled for the slice (others: the same estimate, uncompiled)")
    p.add_argument("--dflash-config", help="the DFlash drafter's yaml (default: the target's preset)")
    p.add_argument("--assistant-layers", type=int, default=ASSISTANT_LAYERS)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    result = draft_costs(args.target, args.topology, batch=args.batch, context=args.context,
                         verify_compiled=tuple(int(g) for g in args.verify_compiled.split(",")),
                         yaml=args.dflash_config, assistant_layers=args.assistant_layers)
    a = result["assistant_step"]
    print(f"{result['target']} on {result['topology']} (mesh {result['mesh']}, batch {result['batch']}, "
          f"context {result['context']}; target passes fit: {result['target_fits']}): AR step "
          f"{result['ar_s'] * 1e6:.0f} µs")
    for name, pas in [*((f"DFlash B={b}", q) for b, q in result["dflash_passes"].items()), ("assistant", a)]:
        print(f"  {name}: {pas['drafter_params'] / 1e6:.0f}M params, {pas['est_s'] * 1e6:.0f} µs "
              f"(memory {pas['est_s_memory'] * 1e6:.0f}, compute {pas['est_s_compute'] * 1e6:.0f}), "
              f"fits {pas['fits']}, compiled in {pas['compile_s']} s")
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
