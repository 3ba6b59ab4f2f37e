"""Per-chip memory of the memory-bounded pieces vs their dense forms, compiled for one TPU chip.

``python -m dflash.bench.component_memory [--topology v5e-8] [--json OUT]`` compiles, at the
Qwen3-8B DFlash preset's per-chip shapes on 8 chips (4 rows of 3072 tokens, 512 anchors,
blocks of 16, width 4096, 32/8 heads of 128, vocabulary 151,936, bf16), the loss head (value
and gradient), the target's prefill attention and the drafter's anchor attention (value and
gradient), each dense and memory-bounded, and prints the compiler's temporaries per chip. A
form the TPU compiler refuses for memory shows what it asked for. docs/memory.md has a run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

B, S, A, Q, D, V, N, KH, H = 4, 3072, 512, 16, 4096, 151936, 32, 8, 128
BF16 = jnp.bfloat16


def _cases() -> dict[str, tuple[Any, list[tuple[tuple[int, ...], Any]]]]:
    from dflash.drafters import loss_head as lh
    from dflash.drafters import objective as obj
    from dflash.kernels import anchor_attention as aa
    from dflash.kernels import prefill_attention as pa

    k = Q - 1
    idx = lambda *s: (s, jnp.int32)  # noqa: E731
    head_args = [((B, A, k, D), BF16), ((D, V), BF16), idx(B, A, k), ((B, A, k), jnp.bool_), idx(B, A, k)]

    def dense_head(h, w, labels, mask, label_idx):
        def loss(h):
            logits = jnp.einsum("BAkD,DV->BAkV", h, w, preferred_element_type=jnp.float32)
            return obj.score_blocks(logits, labels, mask, label_idx, None, gamma=7.0, ce_weight=1.0,
                                    kl_weight=0.0)[0]
        return jax.value_and_grad(loss)(h)

    def chunked_head(h, w, labels, mask, label_idx):
        return jax.value_and_grad(lambda h: lh.score_hidden(h, w, labels, mask, label_idx, None, gamma=7.0,
                                                            ce_weight=1.0, kl_weight=0.0)[0])(h)

    attn_args = [((B, S, N, H), BF16), ((B, S, KH, H), BF16), ((B, S, KH, H), BF16), idx(B, S)]
    anchor_args = [((B, A, Q, N, H), BF16), ((B, S, KH, H), BF16), ((B, S, KH, H), BF16),
                   ((B, A, Q, KH, H), BF16), ((B, A, Q, KH, H), BF16), ((B, A, S), jnp.bool_)]

    def anchor_grad(fn):
        return lambda *x: jax.grad(lambda q, *rest: fn(q, *rest).astype(jnp.float32).sum())(*x)

    return {
        "loss head, dense logits (value + grad)": (dense_head, head_args),
        "loss head, row chunks of 256 (value + grad)": (chunked_head, head_args),
        "prefill attention, dense [S, S]": (pa.reference_prefill_attention, attn_args),
        "prefill attention, chunked jnp (512 rows)": (pa.chunked_prefill_attention, attn_args),
        "prefill attention, Pallas flash kernel": (lambda *x: pa.prefill_attention(*x), attn_args),
        "anchor attention, dense reference (grad)": (anchor_grad(aa.reference_anchor_block_attention),
                                                     anchor_args),
        "anchor attention, 16-anchor chunks (grad)": (anchor_grad(aa.chunked_anchor_block_attention),
                                                      anchor_args),
    }


def measure(topology: str = "v5e-8") -> dict[str, dict[str, Any]]:
    from dflash import plan

    device = plan.topology_devices(topology)[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    out = {}
    for name, (fn, shapes) in _cases().items():
        args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
        compiled, seconds = plan.compile_for_topology(jax.jit(fn), tuple(args), mesh)
        out[name] = {**plan.memory(compiled, plan.local_bytes(args)), "compile_s": round(seconds, 1)}
        print(f"{name}: temp {out[name]['temp'] / 1e9:.2f} GB"
              + (" (refused by the compiler)" if "compiler_refused" in out[name] else ""), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.bench.component_memory", description=__doc__)
    p.add_argument("--topology", default="v5e-8")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = measure(args.topology)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "components": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
