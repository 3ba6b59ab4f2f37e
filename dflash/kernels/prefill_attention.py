"""Prefill attention over packed training rows with memory O(S * chunk), never ``[S, S]``.

Semantics: the target's clean pass over a packed row (dflash.training): query ``t`` sees key
``s`` iff ``s <= t`` and both lie in the same document (``segment_ids[s] == segment_ids[t]``).
``reference_prefill_attention`` *is* the model's dense ``attend`` under that mask (``[B,S,S]``
scores per head: ~4.8 GB per layer at the Qwen3-8B preset). Two memory-bounded forms:

* ``chunked_prefill_attention`` (jnp, any backend): the same ``attend`` on ``chunk`` query rows
  at a time inside a ``lax.map``: scores ``[B, N, chunk, S]``.
* ``prefill_attention`` (Pallas, TPU/Mosaic layout; interpret mode on CPU): flash attention,
  grid ``(B, K, query tiles, kv tiles)``; kv tiles above the causal diagonal map to the last
  needed block index (no DMA) and are skipped with ``pl.when``. GPUs use the chunked form
  (``dispatch.prefill_problem``).

Options, as in the model's attention (dflash.models.attention_mixer): ``window`` (static; 0:
none): query ``t`` sees only keys ``s > t - window`` (documents are packed contiguously with
consecutive positions, dflash.training.packing, so the row distance is the position distance);
kv tiles wholly before a query tile's window are skipped like those past the diagonal.
``sinks_N``: one logit per query head added to the softmax's denominator.

Shape letters: B batch, S positions, N query heads, K kv heads, G = N / K, H head dim,
I query tiles of ``q_tile`` rows, R = G * q_tile query rows of one kv head (row ``g*q_tile + t``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dflash.attention import attend
from dflash.kernels.common import LANES, finalize, online_update, reset_state

DEFAULT_CHUNK = 512  # query rows per step of the chunked jnp form
DEFAULT_TILES = (256, 512)  # (q_tile, kv_tile) of the kernel
# A grid step holds G * q_tile query rows (and their [rows, kv_tile] float32 scores) in VMEM: at
# most this many, so 8 query heads per kv head (Qwen3-30B-A3B: 32 / 4) take 128-row query tiles
# (256 asked for 17.7 MiB of v5e's 16 MiB of scoped VMEM in its train plan). Each row's q, output
# and float32 accumulator grow with the head size: above MAX_GROUP_HEAD_DIM the cap shrinks in
# proportion (Gemma 4's full layers, head size 512, 8 per kv head: 1024 rows asked for 17.6 MiB).
MAX_GROUP_ROWS = 1024
MAX_GROUP_HEAD_DIM = 256


def default_q_tile(group: int, head_dim: int = 128) -> int:
    """The query tile for ``group`` query heads per kv head of ``head_dim``: 256, less for wide groups
    or heads past ``MAX_GROUP_HEAD_DIM`` (a multiple of 8)."""
    rows = MAX_GROUP_ROWS * MAX_GROUP_HEAD_DIM // max(head_dim, MAX_GROUP_HEAD_DIM)
    return max(8, min(DEFAULT_TILES[0], rows // group) // 8 * 8)


def doc_causal_mask(seg_q_BT: jax.Array, seg_k_BS: jax.Array, q0: jax.Array | int = 0,
                    window: int = 0) -> jax.Array:
    """``[B, T, S]``: query ``q0 + t`` sees key ``s <= q0 + t`` of its own document (and, with a
    window, ``s > q0 + t - window``)."""
    t, s = seg_q_BT.shape[1], seg_k_BS.shape[1]
    dist_TS = (q0 + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]
    causal_TS = (dist_TS >= 0) & (dist_TS < window) if window else dist_TS >= 0
    return causal_TS[None] & (seg_q_BT[:, :, None] == seg_k_BS[:, None, :])


def reference_prefill_attention(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, sinks_N=None, *, window: int = 0):
    """Dense reference: ``attend`` under the causal same-document mask. ``[B, S, N, H]``."""
    b, s, n, h = q_BSNH.shape
    mask_BSS = doc_causal_mask(segment_ids_BS, segment_ids_BS, window=window)
    return attend(q_BSNH, k_BSKH, v_BSKH, mask_BSS, sinks_N).reshape(b, s, n, h)


def chunked_prefill_attention(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, sinks_N=None, *, window: int = 0,
                              chunk: int = DEFAULT_CHUNK):
    """``reference_prefill_attention`` ``chunk`` query rows at a time (row-for-row the same ops)."""
    b, s, n, h = q_BSNH.shape
    c = min(chunk, s)
    nc = -(-s // c)
    pad = nc * c - s
    q_CBcNH = jnp.pad(q_BSNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, c, n, h).swapaxes(0, 1)
    seg_CBc = jnp.pad(segment_ids_BS, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nc, c).swapaxes(0, 1)

    def one(args):
        i, q_BcNH, seg_Bc = args
        return attend(q_BcNH, k_BSKH, v_BSKH, doc_causal_mask(seg_Bc, segment_ids_BS, i * c, window), sinks_N)

    out_CBcD = jax.lax.map(one, (jnp.arange(nc), q_CBcNH, seg_CBc))
    return out_CBcD.swapaxes(0, 1).reshape(b, nc * c, n, h)[:, :s]


def prefill_attention(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, sinks_N=None, *, window: int = 0,
                      q_tile: int | None = None, kv_tile: int | None = None, interpret=False):
    """Pallas flash prefill attention; same contract as ``reference_prefill_attention``.

    Rows are never fully masked here (a query always sees itself), so the kernel and the
    reference agree everywhere. Differentiated, the op is the chunked jnp form (no backward
    kernel; the frozen target is never differentiated).
    """
    b, s, n, h = q_BSNH.shape
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[:2] != (b, s) or k_BSKH.shape[3] != h \
            or n % k_BSKH.shape[2]:
        raise ValueError(f"prefill_attention: k/v must be [B,S,K,H] matching q {q_BSNH.shape} with "
                         f"N % K == 0, got {k_BSKH.shape} / {v_BSKH.shape}")
    if segment_ids_BS.shape != (b, s):
        raise ValueError(f"segment_ids must be [B,S]={b, s}, got {segment_ids_BS.shape}")
    if sinks_N is not None and sinks_N.shape != (n,):
        raise ValueError(f"sinks must be [N]=[{n}] (one per query head), got {sinks_N.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: none), got {window}")
    s8 = -(-s // 8) * 8
    tq = min(q_tile or default_q_tile(n // k_BSKH.shape[2], h), s8)
    tk = min(kv_tile or DEFAULT_TILES[1], s8)
    return _prefill_op(q_BSNH, k_BSKH, v_BSKH, sinks_N, segment_ids_BS.astype(jnp.int32),
                       (tq, tk, int(window), interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _prefill_op(q, k, v, sinks, seg, cfg):
    return _forward(q, k, v, sinks, seg, *cfg)


def _prefill_op_fwd(q, k, v, sinks, seg, cfg):
    window = cfg[2]
    return jax.vjp(lambda q, k, v, sinks: chunked_prefill_attention(q, k, v, seg, sinks, window=window),
                   q, k, v, sinks)


def _prefill_op_bwd(cfg, vjp, g):
    return (*vjp(g), None)


_prefill_op.defvjp(_prefill_op_fwd, _prefill_op_bwd)


def first_kv_tile(i, q_tile: int, kv_tile: int, window: int):
    """The first kv tile a query tile ``i`` needs: 0, or with a window the one holding the oldest
    key its first row sees (tiles before it hold keys outside every row's window)."""
    if not window:
        return 0
    return jnp.maximum(i * q_tile - (window - 1), 0) // kv_tile


def _kernel(q_ref, qpos_ref, qseg_ref, k_ref, v_ref, kseg_ref, *refs, scale, q_tile, kv_tile, window):
    sink_ref = refs[0] if len(refs) == 5 else None
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        reset_state(m_ref, l_ref, acc_ref)

    # Tiles wholly above the diagonal, or wholly before the window: skipped.
    @pl.when((j * kv_tile < (i + 1) * q_tile) & (j >= first_kv_tile(i, q_tile, kv_tile, window)))
    def _step():
        kpos_1C = j * kv_tile + jax.lax.broadcasted_iota(jnp.int32, (1, kv_tile), 1)
        mask_RC = (kpos_1C <= qpos_ref[...]) & (kseg_ref[...] == qseg_ref[...])
        if window:
            mask_RC = mask_RC & (qpos_ref[...] - kpos_1C < window)
        # m / l are lane-replicated [R, 128]; max over lanes recovers the [R, 1] column.
        carry = (jnp.max(m_ref[...], axis=1, keepdims=True), jnp.max(l_ref[...], axis=1, keepdims=True),
                 acc_ref[...])
        m, l_, acc = online_update(carry, q_ref[...], k_ref[...], v_ref[...], mask_RC, scale)
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l_, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        m = jnp.max(m_ref[...], axis=1, keepdims=True) if sink_ref is not None else None
        o_ref[...] = finalize(jnp.max(l_ref[...], axis=1, keepdims=True), acc_ref[...], o_ref.dtype, m,
                              None if sink_ref is None else sink_ref[...])


def _forward(q_BSNH, k_BSKH, v_BSKH, sinks_N, seg_BS, tq: int, tk: int, window: int, interpret):
    b, s, n, h = q_BSNH.shape
    kh = k_BSKH.shape[2]
    g = n // kh
    sp = -(-s // math.lcm(tq, tk)) * math.lcm(tq, tk)
    nq, nk, r = sp // tq, sp // tk, g * tq
    pad = sp - s
    # Padded keys get segment -1 (never a real document); padded query rows are dropped.
    seg_p = jnp.pad(seg_BS, ((0, 0), (0, pad)), constant_values=-1)
    q_p = jnp.pad(q_BSNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # [B, K, I, R, H]: the query rows of one kv head's group in one tile, g-major.
    q_BKIRH = q_p.reshape(b, nq, tq, kh, g, h).transpose(0, 3, 1, 4, 2, 5).reshape(b, kh, nq, r, h)
    qpos_IR1 = jnp.tile(jnp.arange(sp, dtype=jnp.int32).reshape(nq, 1, tq), (1, g, 1)).reshape(nq, r, 1)
    qseg_BIR1 = jnp.tile(seg_p.reshape(b, nq, 1, tq), (1, 1, g, 1)).reshape(b, nq, r, 1)
    kseg_B1S = seg_p[:, None, :]
    # [B, S, K*H]: a free reshape; a (kv_tile, H) block at lane-block index hi is kv head hi.
    k_flat = jnp.pad(k_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, sp, kh * h)
    v_flat = jnp.pad(v_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, sp, kh * h)

    def needed(i, j):  # outside the needed tiles: repeat the nearest needed block (no new DMA)
        return jnp.clip(j, first_kv_tile(i, tq, tk, window), ((i + 1) * tq - 1) // tk)

    def kv_map(bi, hi, i, j):
        return bi, needed(i, j), hi

    def kseg_map(bi, hi, i, j):
        return bi, 0, needed(i, j)

    q_spec = pl.BlockSpec((None, None, None, r, h), lambda bi, hi, i, j: (bi, hi, i, 0, 0))
    in_specs = [q_spec,
                pl.BlockSpec((None, r, 1), lambda bi, hi, i, j: (i, 0, 0)),
                pl.BlockSpec((None, None, r, 1), lambda bi, hi, i, j: (bi, i, 0, 0)),
                pl.BlockSpec((None, tk, h), kv_map), pl.BlockSpec((None, tk, h), kv_map),
                pl.BlockSpec((None, 1, tk), kseg_map)]
    args = [q_BKIRH, qpos_IR1, qseg_BIR1, k_flat, v_flat, kseg_B1S]
    if sinks_N is not None:  # [K, R, 1]: row g*q_tile + t is query head k*G + g
        in_specs.append(pl.BlockSpec((None, r, 1), lambda bi, hi, i, j: (hi, 0, 0)))
        args.append(jnp.repeat(sinks_N.astype(jnp.float32).reshape(kh, g), tq, axis=1)[..., None])
    kernel = functools.partial(_kernel, scale=h ** -0.5, q_tile=tq, kv_tile=tk, window=window)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, kh, nq, r, h), v_BSKH.dtype),
        grid=(b, kh, nq, nk),
        in_specs=in_specs,
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((r, LANES), jnp.float32), pltpu.VMEM((r, LANES), jnp.float32),
                        pltpu.VMEM((r, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="prefill_attention_tpu",
    )(*args)
    out_BSNH = out.reshape(b, kh, nq, g, tq, h).transpose(0, 2, 4, 1, 3, 5).reshape(b, sp, n, h)
    return out_BSNH[:, :s]
