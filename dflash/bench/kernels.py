"""Kernel micro-benchmark: each Pallas kernel vs its reference (and XLA's fused attention).

Verify attention at Qwen3-8B head shapes (N=32, K=8, H=128), prefix 1k/8k/32k, blocks of
T=16 and 64 new tokens; the anchor-block attention at the drafter's drafting shape (one
block over the prefix) and its training shape (many anchor blocks over one context).
Reports the median time and the bandwidth achieved on the bytes the op must read (the
visible K/V plus q and the output), next to the device's measured copy bandwidth, and
writes everything to JSON.

    dflash-bench-kernels --out kernels.json          # on a TPU / GPU
    dflash-bench-kernels --smoke --out smoke.json    # tiny shapes, CPU-friendly (interpret mode)

Attention is memory-bound here, so "fraction of copy bandwidth" is the number to read. On
CPU the Pallas rows time the interpreter and mean nothing; ``--smoke`` only proves the
script runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dflash.attention import causal_mask, visibility
from dflash.kernels.anchor_attention import anchor_block_attention, reference_anchor_block_attention
from dflash.kernels.common import platform
from dflash.kernels.verify_attention import reference_verify_attention, verify_attention

QWEN3_8B_HEADS = dict(num_heads=32, num_kv_heads=8, head_dim=128)
SMOKE_HEADS = dict(num_heads=4, num_kv_heads=2, head_dim=16)


def _time(fn: Callable, args: Sequence, iters: int) -> tuple[float, float]:
    """(compile seconds, median run seconds) of ``jax.jit(fn)(*args)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return compile_s, statistics.median(runs)


def copy_bandwidth_gbs(n_bytes: int, iters: int) -> float:
    """Device copy bandwidth: ``x + 1`` over ``n_bytes`` reads and writes each byte once."""
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    _, sec = _time(lambda x: x + 1, [x], iters)
    return 2 * n_bytes / sec / 1e9


def _row(op, impl, shape: dict, bytes_needed: int, copy_gbs: float, fn, args, iters) -> dict:
    row = dict(op=op, impl=impl, **shape, bytes=bytes_needed)
    try:
        compile_s, sec = _time(fn, args, iters)
    except Exception as e:  # e.g. a fused-attention backend that refuses the mask: record, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    gbs = bytes_needed / sec / 1e9
    row.update(time_ms=sec * 1e3, compile_s=compile_s, gbs=gbs, frac_of_copy=gbs / copy_gbs)
    return row


def bench_verify(batch, prefix, block, slack, heads, dtype, interpret, copy_gbs, iters, rng) -> list[dict]:
    n, kh, h = heads["num_heads"], heads["num_kv_heads"], heads["head_dim"]
    s = prefix + block + slack  # cache slots: the live prefix, the block, room still to generate
    q = jnp.asarray(rng.standard_normal((batch, block, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, s, kh, h)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, s, kh, h)), dtype)
    lengths = jnp.full((batch,), prefix, jnp.int32)
    bm = causal_mask(block)
    item = jnp.dtype(dtype).itemsize
    needed = 2 * batch * (prefix + block) * kh * h * item + 2 * q.size * item  # visible K/V, q, out
    shape = dict(batch=batch, prefix=prefix, block=block, slots=s, dtype=jnp.dtype(dtype).name)
    mask_B1TS = visibility(lengths, s, bm)[:, None]

    def dpa(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    return [
        _row("verify_attention", "pallas", shape, needed, copy_gbs,
             lambda *x: verify_attention(*x, interpret=interpret), (q, k, v, lengths, bm), iters),
        _row("verify_attention", "reference", shape, needed, copy_gbs, reference_verify_attention,
             (q, k, v, lengths, bm), iters),
        _row("verify_attention", "dot_product_attention", shape, needed, copy_gbs, dpa,
             (q, k, v, mask_B1TS), iters),
    ]


def bench_anchor(batch, anchors, rows, context, visible, heads, dtype, interpret, copy_gbs, iters,
                 rng) -> list[dict]:
    """``visible``: per-anchor context lengths (drafting: the prefix; training: spread anchors)."""
    n, kh, h = heads["num_heads"], heads["num_kv_heads"], heads["head_dim"]
    q = jnp.asarray(rng.standard_normal((batch, anchors, rows, n, h)), dtype)
    kc = jnp.asarray(rng.standard_normal((batch, context, kh, h)), dtype)
    vc = jnp.asarray(rng.standard_normal((batch, context, kh, h)), dtype)
    kb = jnp.asarray(rng.standard_normal((batch, anchors, rows, kh, h)), dtype)
    vb = jnp.asarray(rng.standard_normal((batch, anchors, rows, kh, h)), dtype)
    mask = jnp.arange(context)[None, None] < jnp.asarray(visible, jnp.int32)[..., None]  # [B, A, S]
    item = jnp.dtype(dtype).itemsize
    furthest = int(np.max(visible))  # each kv head's context is read at least up to here
    needed = (2 * batch * furthest * kh * h + 2 * kb.size + 2 * q.size) * item
    shape = dict(batch=batch, anchors=anchors, block=rows, slots=context, prefix=furthest,
                 dtype=jnp.dtype(dtype).name)
    args = (q, kc, vc, kb, vb, mask)
    return [
        _row("anchor_block_attention", "pallas", shape, needed, copy_gbs,
             lambda *x: anchor_block_attention(*x, interpret=interpret), args, iters),
        _row("anchor_block_attention", "reference", shape, needed, copy_gbs,
             reference_anchor_block_attention, args, iters),
    ]


def run(smoke: bool, batch: int, prefixes: Sequence[int], blocks: Sequence[int], slack: int, dtype,
        iters: int, anchors: int, train_context: int) -> dict:
    interpret = platform() == "cpu"
    heads = SMOKE_HEADS if smoke else QWEN3_8B_HEADS
    rng = np.random.default_rng(0)
    copy_gbs = copy_bandwidth_gbs(8 << 20 if smoke else 1 << 30, iters)
    results = []
    for prefix in prefixes:
        for block in blocks:
            results += bench_verify(batch, prefix, block, slack, heads, dtype, interpret, copy_gbs, iters,
                                    rng)
        # Drafting: one block of the largest size over the prefix (the drafter's own context cache).
        results += bench_anchor(batch, 1, max(blocks), prefix + slack, np.full((batch, 1), prefix), heads,
                                dtype, interpret, copy_gbs, iters, rng)
    # Training: many anchor blocks over one context, anchors spread uniformly over it.
    visible = np.sort(rng.integers(0, train_context, (batch, anchors)), axis=1)
    results += bench_anchor(batch, anchors, max(blocks), train_context, visible, heads, dtype, interpret,
                            copy_gbs, iters, rng)
    return dict(device=str(jax.devices()[0]), platform=platform(), jax=jax.__version__, smoke=smoke,
                interpret=interpret, heads=heads, copy_bandwidth_gbs=copy_gbs, results=results)


def _print(report: dict) -> None:
    print(f"{report['device']}  copy bandwidth {report['copy_bandwidth_gbs']:.1f} GB/s"
          + ("  (interpret mode: Pallas timings are meaningless)" if report["interpret"] else ""))
    for r in report["results"]:
        what = f"{r['op']:<24}{r['impl']:<23}B={r['batch']} P={r['prefix']:<6} T={r['block']:<3}"
        if "anchors" in r:
            what += f" A={r['anchors']}"
        if "error" in r:
            print(f"{what}  error: {r['error']}")
        else:
            frac = 100 * r["frac_of_copy"]
            print(f"{what}  {r['time_ms']:9.3f} ms  {r['gbs']:8.1f} GB/s  {frac:5.1f}% of copy")
