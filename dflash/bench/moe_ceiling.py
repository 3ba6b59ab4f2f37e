"""The speculation ceiling of a mixture-of-experts target: what a verify pass of ``gamma`` tokens
costs next to an AR step, from the target's compiled decode plan (docs/scaling.md, "MoE ceiling").

A dense target's verify pass reads the same weights as an AR step, so at batch 1 it costs about one
AR step. A MoE target's AR step reads only its token's ``k`` experts per layer; a block of ``gamma``
tokens reads the union of their experts, so the verify pass reads more weight bytes and the
speculative speedup ``tau / (verify / AR)`` shrinks. Per ``gamma`` this prints:

- the expected distinct experts per MoE layer under uniform routing, ``E (1 - (1 - k/E)^gamma)``;
- the weight bytes a chip reads (``dflash.flops.params_read``) plus its KV cache, and the pass's
  time at HBM bandwidth or at peak FLOP/s, whichever binds, on the plan's mesh;
- ``verify / AR`` and the speedup ceiling ``tau(gamma) / (verify / AR)`` (no drafter cost), with
  ``tau(gamma)`` from a constant per-position acceptance ``alpha`` fitted to a reference ``tau`` at
  a reference block: ``tau(g) = (1 - alpha^g) / (1 - alpha)`` (a verify pass of ``g`` tokens
  commits at most ``g``).

The plan (per-chip weight and cache bytes, memory fit) comes from ``dflash-bench --compile-only
--json`` (``--plan FILE``) or is compiled here. Run:
``python -m dflash.bench.moe_ceiling --target qwen3_30b_a3b --topology v5e-8 --json OUT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GAMMAS = (1, 2, 4, 8, 16)
REFERENCE_TAU = 6.49  # DFlash paper: Qwen3-8B, temperature 0, block 16 (no MoE target's tau is published)
REFERENCE_BLOCK = 16


def expected_tau(alpha: float, gamma: int) -> float:
    """Tokens committed per verify pass of ``gamma`` tokens at per-position acceptance ``alpha``."""
    return float(gamma) if alpha >= 1.0 else (1.0 - alpha ** gamma) / (1.0 - alpha)


def fit_alpha(tau: float, block: int) -> float:
    """The per-position acceptance that gives ``tau`` at ``block`` (bisection; ``tau`` in [1, block])."""
    if not 1.0 <= tau <= block:
        raise ValueError(f"tau {tau} must lie in [1, {block}]")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tau(mid, block) < tau else (lo, mid)
    return (lo + hi) / 2


def ceiling(plan: dict[str, Any], gammas: tuple[int, ...] = GAMMAS, tau: float = REFERENCE_TAU,
            block: int = REFERENCE_BLOCK) -> dict[str, Any]:
    """Per ``gamma``: distinct experts, bytes read per chip, the pass's time and the ceiling."""
    from dflash.flops import decode_flops, params_read
    from dflash.models.kinds import mlp_kind, mlp_option
    from dflash.models.moe_mlp import expected_experts
    from dflash.plan import get_topology, model_config

    cfg, topo = model_config(plan["target"]), get_topology(plan["topology"])
    weights, cache = plan["per_device_bytes"]["target"], plan["per_device_bytes"]["cache"]
    batch, context = plan["batch"], plan["context"]
    moe = [s for s in cfg.layers if mlp_kind(s).name == "moe"]
    experts, top_k = (mlp_option(moe[0], "experts"), mlp_option(moe[0], "top_k")) if moe else (0, 0)
    alpha = fit_alpha(tau, block)
    rows = []
    for g in gammas:
        read = weights * params_read(cfg, batch * g) / cfg.num_params() + cache
        s_memory = read / topo.hbm_bw
        s_compute = decode_flops(cfg, batch, g, context) / (topo.chips * topo.peak_flops)
        rows.append({"gamma": g, "experts_per_layer": round(expected_experts(experts, top_k, batch * g), 2)
                     if moe else None, "bytes_read_per_chip": round(read), "est_s_memory": s_memory,
                     "est_s_compute": s_compute, "est_s": max(s_memory, s_compute)})
    ar = rows[0]["est_s"] if gammas[0] == 1 else None
    for row in rows:
        row["verify_over_ar"] = row["est_s"] / ar if ar else None
        row["tau"] = expected_tau(alpha, row["gamma"])
        row["speedup_ceiling"] = row["tau"] / row["verify_over_ar"] if ar else None
    best = max(rows, key=lambda r: r["speedup_ceiling"] or 0.0)
    return {"target": plan["target"], "topology": plan["topology"], "mesh": plan["mesh"], "batch": batch,
            "context": context, "experts": experts, "top_k": top_k, "moe_layers": len(moe),
            "plan_fits": plan.get("all_fit"), "reference_tau": tau, "reference_block": block,
            "alpha": alpha, "rows": rows, "best_gamma": best["gamma"]}


def table(result: dict[str, Any]) -> str:
    head = ("| γ | experts/layer (uniform) | read/chip GB | t (µs) | bound | verify/AR | τ(γ) | ceiling |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        bound = "HBM" if r["est_s_memory"] >= r["est_s_compute"] else "FLOPs"
        experts = "—" if r["experts_per_layer"] is None else f"{r['experts_per_layer']:.2f}"
        lines.append(f"| {r['gamma']} | {experts} | {r['bytes_read_per_chip'] / 1e9:.2f} | "
                     f"{r['est_s'] * 1e6:.0f} | {bound} | {r['verify_over_ar']:.2f} | {r['tau']:.2f} | "
                     f"{r['speedup_ceiling']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.bench.moe_ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="qwen3_30b_a3b", help="a preset name (dflash.config presets)")
    p.add_argument("--topology", default="v5e-8")
    p.add_argument("--plan", type=Path, help="a decode plan JSON (dflash-bench --compile-only --json); "
                   "default: compile it here (minutes for a 30B target)")
    p.add_argument("--tau", type=float, default=REFERENCE_TAU, help="reference tau (default: the DFlash "
                   "paper's Qwen3-8B, temperature 0)")
    p.add_argument("--block", type=int, default=REFERENCE_BLOCK, help="the reference tau's block size")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    if args.plan is not None:
        plan = json.loads(args.plan.read_text())
    else:
        from dflash.plan import decode_plan

        plan = decode_plan(args.target, args.topology)
    result = ceiling(plan, tau=args.tau, block=args.block)
    print(f"{result['target']} on {result['topology']} (mesh {result['mesh']}, batch {result['batch']}, "
          f"context {result['context']}; plan fits: {result['plan_fits']}): "
          f"{result['moe_layers']} MoE layers, top-{result['top_k']} of {result['experts']}; "
          f"alpha {result['alpha']:.3f} from tau "
          f"{result['reference_tau']} at block {result['reference_block']}")
    print(table(result))
    print(f"best block: {result['best_gamma']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
