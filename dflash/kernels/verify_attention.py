"""Verify attention: ``T`` new queries against a KV cache that already holds their block.

Semantics (docs/design.md §3): the block's K/V were written at slots ``[len, len+T)``; query
``t`` of row ``b`` sees every slot ``< len_b`` (the committed prefix) plus the block slots
``len_b + u`` with ``block_mask[b, t, u]`` (causal for AR chains, bidirectional for
diffusion blocks, ancestor masks for trees). ``reference_verify_attention`` *is* the model's
``attend`` under ``cache.visibility``; the Pallas kernel computes the same thing with a
flash-style online softmax over cache tiles and never touches tiles at or beyond
``len_b + T`` (they are skipped, not masked).

Two options, as in the model's attention (dflash.models.attention_mixer): ``window`` (static;
0: none): query ``t`` at position ``positions[b, t]`` sees only keys at positions ``p`` with
``positions[b, t] - p < window`` (prefix slot ``s`` holds position ``s``, block slot ``len + u``
position ``positions[b, u]``: ``dflash.attention.key_positions``); tiles wholly before every
query's window are skipped like those past the block. ``sinks_N``: one logit per query head
added to the softmax's denominator (folded into the final normalisation).

Shape letters: B batch, T block rows, S cache slots, N query heads, K kv heads, G = N / K,
H head dim, R = G*T query rows of one kv head (row ``g*T + t``), J kv tiles, P splits.

Two kernel variants share the math in ``common.py``:

* ``tpu`` (Mosaic): grid ``(B, K, J)`` with the lengths scalar-prefetched into SMEM. A
  tile past the row's visible range maps to the previous block index, so the pipeline
  issues no DMA for it, and ``pl.when`` skips its compute. Fully visible prefix tiles take
  an unmasked fast path; only the (at most two) tiles holding the block build a mask.
* ``gpu`` (Triton): grid ``(B, K, P)``, flash-decoding style: split ``p`` loops over its
  share of the *live* tiles (a dynamic trip count), partial results are merged in jnp.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from dflash.attention import attend, key_positions, visibility, window_mask
from dflash.kernels.common import (
    LANES,
    finalize,
    init_carry,
    is_pow2,
    kernel_backend,
    matmul,
    next_pow2,
    online_update,
    poison_outputs,
    reset_state,
    zero_rows_past,
)

MAX_BLOCK_LEN = 128  # the verify / decode regime; prefill (longer blocks) uses the reference
DEFAULT_TILE = {"tpu": 512, "gpu": 64}


def chain_positions(lengths_B: jax.Array, block_len: int) -> jax.Array:
    """``[B, T]``: the positions of a chain block written at ``[len, len+T)`` (the default)."""
    return lengths_B.astype(jnp.int32)[:, None] + jnp.arange(block_len, dtype=jnp.int32)[None, :]


def reference_verify_attention(q_BTNH, k_cache_BSKH, v_cache_BSKH, lengths_B, block_mask, sinks_N=None,
                               positions_BT=None, *, window: int = 0, kv_tile=None, backend=None,
                               interpret=False, poison=False, num_splits=None):
    """Pure-jnp reference: exactly ``attend(q, k, v, visibility(lengths, S, block_mask), sinks)``,
    the mask narrowed to ``window_mask`` when ``window > 0``.

    ``block_mask``: ``[T, T]`` or ``[B, T, T]`` bool; ``positions_BT``: the block's positions
    (None: ``len + t``; only the window reads them). Returns ``[B, T, N, H]`` in the value
    dtype. The kernel-only keywords are accepted (same signature) and ignored.
    """
    del kv_tile, backend, interpret, poison, num_splits
    b, t, n, h = q_BTNH.shape
    s = k_cache_BSKH.shape[1]
    mask_BTS = visibility(lengths_B, s, block_mask)
    if window:
        pos_BT = chain_positions(lengths_B, t) if positions_BT is None else positions_BT
        mask_BTS = mask_BTS & window_mask(pos_BT, key_positions(lengths_B, s, pos_BT), window)
    return attend(q_BTNH, k_cache_BSKH, v_cache_BSKH, mask_BTS, sinks_N).reshape(b, t, n, h)


class _Config(NamedTuple):
    kv_tile: int | None
    backend: str
    interpret: Any
    poison: bool
    num_splits: int | None
    window: int


def verify_attention(q_BTNH, k_cache_BSKH, v_cache_BSKH, lengths_B, block_mask, sinks_N=None,
                     positions_BT=None, *, window: int = 0, kv_tile=None, backend=None, interpret=False,
                     poison=False, num_splits=None):
    """Pallas verify attention; same contract as ``reference_verify_attention``.

    q ``[B,T,N,H]``, cache layer k/v ``[B,S,K,H]`` with the block already written at
    ``[len, len+T)``, ``lengths_B`` int32, ``block_mask`` ``[T,T]``/``[B,T,T]`` bool, ``T <= 128``;
    ``sinks_N`` float (None: no sinks), ``positions_BT`` int (None: ``len + t``), ``window``
    static (0: none). Returns ``[B,T,N,H]``. Without sinks it differs from the reference only
    on rows with no visible key at all (zeros here, the mean of all values there); the model
    never produces such rows (with sinks both give zeros).

    kv_tile: cache slots per tile (TPU default 512, GPU 64, a power of two >= 16 on GPU).
    backend: ``tpu`` | ``gpu`` kernel variant (default: the platform's; ``tpu`` on CPU).
    interpret: run the kernel in the Pallas interpreter (CPU); ``True`` or ``pltpu.InterpretParams``.
    poison: start every output buffer as NaN (aliased input), so tests can prove each element
    is written. num_splits: GPU only, programs per (row, kv head) along the cache.
    Differentiated, the op is the reference (forward and backward): there is no backward kernel.
    """
    b, t, n, h = q_BTNH.shape
    if k_cache_BSKH.ndim != 4 or k_cache_BSKH.shape[0] != b or k_cache_BSKH.shape[3] != h:
        raise ValueError(f"k/v cache layer must be [B,S,K,H] matching q {q_BTNH.shape}, "
                         f"got {k_cache_BSKH.shape}")
    if v_cache_BSKH.shape != k_cache_BSKH.shape or n % k_cache_BSKH.shape[2]:
        raise ValueError("v must match k, and the query heads must be a multiple of the kv heads")
    if t > MAX_BLOCK_LEN:
        raise ValueError(f"verify_attention handles blocks of <= {MAX_BLOCK_LEN} tokens, got {t}; "
                         "use reference_verify_attention for prefill")
    if sinks_N is not None and sinks_N.shape != (n,):
        raise ValueError(f"sinks must be [N]=[{n}] (one per query head), got {sinks_N.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: none), got {window}")
    bm_BTT = jnp.broadcast_to(block_mask, (b, t, t)).astype(bool)
    lengths_B = lengths_B.astype(jnp.int32)
    pos_BT = chain_positions(lengths_B, t) if positions_BT is None else positions_BT.astype(jnp.int32)
    cfg = _Config(kv_tile, kernel_backend(backend), interpret, poison, num_splits, int(window))
    return _verify_op(q_BTNH, k_cache_BSKH, v_cache_BSKH, sinks_N, lengths_B, bm_BTT, pos_BT, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _verify_op(q, k, v, sinks, lengths, bm, pos, cfg):
    return _forward(q, k, v, sinks, lengths, bm, pos, cfg)


def _verify_op_fwd(q, k, v, sinks, lengths, bm, pos, cfg):
    # Only runs under differentiation: use the reference there (forward and backward), so a
    # differentiated forward costs what it did before the kernel existed.
    return jax.vjp(lambda q, k, v, sinks: reference_verify_attention(q, k, v, lengths, bm, sinks, pos,
                                                                     window=cfg.window), q, k, v, sinks)


def _verify_op_bwd(cfg, vjp, g):
    return (*vjp(g), None, None, None)


_verify_op.defvjp(_verify_op_fwd, _verify_op_bwd)


class _Rows(NamedTuple):
    """Per-row inputs of the kernels, rows of one kv head's query group g-major (row g*T + t)."""

    q_BKRH: jax.Array
    bm_BRT: jax.Array  # float32 block mask (window applied)
    first_BR1: jax.Array | None  # int32: the first prefix slot inside the query's window
    sink_KR1: jax.Array | None  # float32 sink logit of the row's head
    bounds_B: tuple[jax.Array, jax.Array]  # int32: min / max of first over a row's queries (0 without)


def _rows(q_BTNH, sinks_N, lengths_B, bm_BTT, pos_BT, kh: int, window: int) -> _Rows:
    b, t, n, h = q_BTNH.shape
    g = n // kh
    q_BKRH = q_BTNH.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    first_BR1, bounds = None, (jnp.zeros((b,), jnp.int32),) * 2
    if window:  # block slots: the window folds into the block mask; prefix slots: first_BR1
        bm_BTT = bm_BTT & ((pos_BT[:, :, None] - pos_BT[:, None, :]) < window)
        first_BT = pos_BT - (window - 1)
        first_BR1 = jnp.tile(first_BT, (1, g))[..., None]
        # Slots below min(first) are seen by no query; at or past max(first) the window hides
        # nothing. Clipped to the prefix: block slots are the block mask's (lo <= len keeps them).
        bounds = (jnp.clip(first_BT.min(1), 0, lengths_B), jnp.clip(first_BT.max(1), 0, lengths_B))
    bm_BRT = jnp.tile(bm_BTT.astype(jnp.float32), (1, g, 1))  # row g*T + t -> block_mask[t]
    sink_KR1 = None
    if sinks_N is not None:
        sink_KR1 = jnp.repeat(sinks_N.astype(jnp.float32).reshape(kh, g), t, axis=1)[..., None]
    return _Rows(q_BKRH, bm_BRT, first_BR1, sink_KR1, bounds)


def _forward(q_BTNH, k_BSKH, v_BSKH, sinks_N, lengths_B, bm_BTT, pos_BT, cfg: _Config):
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    g = n // kh
    rows = _rows(q_BTNH, sinks_N, lengths_B, bm_BTT, pos_BT, kh, cfg.window)
    run = _forward_tpu if cfg.backend == "tpu" else _forward_gpu
    out_BKRH = run(rows, k_BSKH, v_BSKH, lengths_B, cfg)
    return out_BKRH.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def tile_mask(col0, length, n_slots: int, bm_RT: jax.Array, tile: int,
              first_R1: jax.Array | None = None) -> jax.Array:
    """``[R, C]`` visibility of slots ``col0 .. col0+C-1``: prefix ``< length`` (and, with a
    window, ``>= first_R1``) or allowed block slot.

    The block part is ``block_mask[t, slot - length]``, a gather along lanes; it is done as a
    ``[R,T] @ one_hot[T,C]`` product instead (exact in float32: each column has at most one
    1), which lowers everywhere. Slots ``>= n_slots`` (past the cache) are never visible.
    """
    t = bm_RT.shape[1]
    col_1C = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
    rel_1C = col_1C - length  # slot index relative to the block start
    onehot_TC = (jax.lax.broadcasted_iota(jnp.int32, (t, tile), 0) == rel_1C).astype(jnp.float32)
    in_block_RC = matmul(bm_RT, onehot_TC) > 0.5
    prefix_RC = rel_1C < 0
    if first_R1 is not None:
        prefix_RC = prefix_RC & (col_1C >= first_R1)
    return (prefix_RC | in_block_RC) & (col_1C < n_slots)


# ---------------------------------------------------------------------------------- TPU (Mosaic)
def _tpu_kernel(lens_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, bm_ref, *refs, scale, tile, n_slots,
                block_len, window, sinks):
    first_ref = refs[0] if window else None
    sink_ref = refs[int(bool(window))] if sinks else None
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]  # (a poisoned output's aliased input comes before them)
    b, j = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]
    col0 = j * tile
    visible_end = jnp.minimum(length + block_len, n_slots)
    prefix_end = jnp.minimum(length, n_slots)

    @pl.when(j == 0)
    def _init():
        reset_state(m_ref, l_ref, acc_ref)

    def step(masked: bool):
        # m / l are lane-replicated [R, 128]; max over lanes recovers the [R, 1] column.
        carry = (jnp.max(m_ref[...], axis=1, keepdims=True), jnp.max(l_ref[...], axis=1, keepdims=True),
                 acc_ref[...])
        k, v, mask = k_ref[...], v_ref[...], None
        if masked:
            first = first_ref[...] if window else None
            mask = tile_mask(col0, length, n_slots, bm_ref[...], tile, first)
            v = zero_rows_past(v, col0, n_slots)
        m, l_, acc = online_update(carry, q_ref[...], k, v, mask, scale)
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l_, l_ref.shape)
        acc_ref[...] = acc

    live = (col0 < visible_end) & (col0 + tile > lo_ref[b])  # holds a slot some query sees
    fast = (col0 >= hi_ref[b]) & (col0 + tile <= prefix_end)  # in the prefix and every window
    pl.when(live & fast)(lambda: step(False))
    pl.when(live & jnp.logical_not(fast))(lambda: step(True))
    # Tiles not live: no compute, and (index map) no new DMA.

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        m = jnp.max(m_ref[...], axis=1, keepdims=True) if sinks else None
        o_ref[...] = finalize(jnp.max(l_ref[...], axis=1, keepdims=True), acc_ref[...], o_ref.dtype, m,
                              sink_ref[...] if sinks else None)


def _forward_tpu(rows: _Rows, k_BSKH, v_BSKH, lengths_B, cfg: _Config):
    b, kh, r, h = rows.q_BKRH.shape
    s, t = k_BSKH.shape[1], rows.bm_BRT.shape[2]
    tile = min(cfg.kv_tile or DEFAULT_TILE["tpu"], s)
    n_tiles = pl.cdiv(s, tile)
    # [B, S, K*H]: a free reshape; a (tile, H) block at lane-block index h is kv head h.
    k_flat, v_flat = k_BSKH.reshape(b, s, kh * h), v_BSKH.reshape(b, s, kh * h)

    def kv_map(bi, hi, j, lens, lo, _):
        last = (jnp.minimum(lens[bi] + t, s) - 1) // tile  # last tile holding a visible slot
        # Tiles outside [lo // tile, last] repeat a live block index: no DMA for skipped tiles.
        return bi, jnp.minimum(jnp.maximum(j, lo[bi] // tile), last), hi

    q_spec = pl.BlockSpec((None, None, r, h), lambda bi, hi, j, *_: (bi, hi, 0, 0))
    in_specs = [q_spec, pl.BlockSpec((None, tile, h), kv_map), pl.BlockSpec((None, tile, h), kv_map),
                pl.BlockSpec((None, r, t), lambda bi, hi, j, *_: (bi, 0, 0))]
    args = [lengths_B, *rows.bounds_B, rows.q_BKRH, k_flat, v_flat, rows.bm_BRT]
    if rows.first_BR1 is not None:
        in_specs.append(pl.BlockSpec((None, r, 1), lambda bi, hi, j, *_: (bi, 0, 0)))
        args.append(rows.first_BR1)
    if rows.sink_KR1 is not None:
        in_specs.append(pl.BlockSpec((None, r, 1), lambda bi, hi, j, *_: (hi, 0, 0)))
        args.append(rows.sink_KR1)
    out_shape = jax.ShapeDtypeStruct((b, kh, r, h), v_BSKH.dtype)
    aliases = poison_outputs(cfg.poison, in_specs, args, [out_shape], [q_spec])
    kernel = functools.partial(_tpu_kernel, scale=h ** -0.5, tile=tile, n_slots=s, block_len=t,
                               window=cfg.window, sinks=rows.sink_KR1 is not None)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, kh, n_tiles), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((r, LANES), jnp.float32), pltpu.VMEM((r, LANES), jnp.float32),
                            pltpu.VMEM((r, h), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        input_output_aliases=aliases,
        interpret=cfg.interpret,
        name="verify_attention_tpu",
    )(*args)


# ---------------------------------------------------------------------------------- GPU (Triton)
def _gpu_kernel(lens_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, bm_ref, *refs, scale, tile, n_slots,
                block_len, splits, window):
    first = refs[0][...] if window else None
    acc_ref, m_ref, l_ref = refs[-3:]
    length = lens_ref[...]
    visible_end = jnp.minimum(length + block_len, n_slots)
    n_first = lo_ref[...] // tile  # tiles before this hold no slot any query sees
    n_live = (visible_end + tile - 1) // tile  # tiles past this are never visited
    n_open = jnp.minimum((hi_ref[...] + tile - 1) // tile, n_live)  # from here no window mask
    n_prefix = jnp.minimum(length, n_slots) // tile  # whole tiles inside the prefix
    per_split = (n_live - n_first + splits - 1) // splits  # live tiles shared among the splits
    lo = n_first + pl.program_id(2) * per_split
    hi = jnp.maximum(jnp.minimum(lo + per_split, n_live), lo)
    open_ = jnp.clip(n_open, lo, hi)
    mid = jnp.clip(n_prefix, open_, hi)
    q, bm = q_ref[...], bm_ref[...]

    def prefix_tile(j, carry):
        rows = pl.ds(j * tile, tile)
        return online_update(carry, q, k_ref[rows, :], v_ref[rows, :], None, scale)

    def edge_tile(j, carry):
        col0 = j * tile
        rows_ok = (col0 + jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0)) < n_slots
        k = pltriton.load(k_ref.at[pl.ds(col0, tile), :], mask=rows_ok, other=0.0)
        v = pltriton.load(v_ref.at[pl.ds(col0, tile), :], mask=rows_ok, other=0.0)
        return online_update(carry, q, k, v, tile_mask(col0, length, n_slots, bm, tile, first), scale)

    carry = jax.lax.fori_loop(lo, open_, edge_tile, init_carry(q.shape[0], q.shape[1]))  # window edge
    carry = jax.lax.fori_loop(open_, mid, prefix_tile, carry)
    m, l_, acc = jax.lax.fori_loop(mid, hi, edge_tile, carry)  # the block's tiles
    acc_ref[...] = acc
    m_ref[...] = m.reshape(m_ref.shape)
    l_ref[...] = l_.reshape(l_ref.shape)


def _forward_gpu(rows: _Rows, k_BSKH, v_BSKH, lengths_B, cfg: _Config):
    b, kh, r, h = rows.q_BKRH.shape
    s, t = k_BSKH.shape[1], rows.bm_BRT.shape[2]
    tile = cfg.kv_tile or DEFAULT_TILE["gpu"]
    if not is_pow2(tile) or tile < 16:
        raise ValueError(f"GPU kv_tile must be a power of two >= 16, got {tile}")
    n_tiles = pl.cdiv(s, tile)
    splits = cfg.num_splits or max(1, min(n_tiles, 128 // (b * kh)))  # ~one program per SM
    # Triton blocks are powers of two and dots need >= 16 rows/cols: pad q rows and block
    # columns (padded rows are fully masked and dropped; padded columns are never visible).
    rp, tp = next_pow2(max(r, 16)), next_pow2(max(t, 16))
    q_p = jnp.pad(rows.q_BKRH, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    bm_p = jnp.pad(rows.bm_BRT, ((0, 0), (0, rp - r), (0, tp - t)))
    # The whole cache row per program, rounded up to whole tiles: rows past S are only ever
    # touched by the masked loads of the last tile.
    kv_spec = pl.BlockSpec((None, n_tiles * tile, None, h), lambda bi, hi, p: (bi, 0, hi, 0))
    row_spec = pl.BlockSpec((None,), lambda bi, hi, p: (bi,))
    in_specs = [
        row_spec, row_spec, row_spec,
        pl.BlockSpec((None, None, rp, h), lambda bi, hi, p: (bi, hi, 0, 0)),
        kv_spec,
        kv_spec,
        pl.BlockSpec((None, rp, tp), lambda bi, hi, p: (bi, 0, 0)),
    ]
    args = [lengths_B, *rows.bounds_B, q_p, k_BSKH, v_BSKH, bm_p]
    if rows.first_BR1 is not None:
        in_specs.append(pl.BlockSpec((None, rp, 1), lambda bi, hi, p: (bi, 0, 0)))
        args.append(jnp.pad(rows.first_BR1, ((0, 0), (0, rp - r), (0, 0))))
    out_shape = [jax.ShapeDtypeStruct((b, kh, splits, rp, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, splits, rp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, splits, rp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, rp, h), lambda bi, hi, p: (bi, hi, p, 0, 0)),
                 pl.BlockSpec((None, None, None, rp), lambda bi, hi, p: (bi, hi, p, 0)),
                 pl.BlockSpec((None, None, None, rp), lambda bi, hi, p: (bi, hi, p, 0))]
    aliases = poison_outputs(cfg.poison, in_specs, args, out_shape, out_specs)
    kernel = functools.partial(_gpu_kernel, scale=h ** -0.5, tile=tile, n_slots=s, block_len=t,
                               splits=splits, window=cfg.window)
    acc_P, m_P, l_P = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, kh, splits), in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases, interpret=cfg.interpret, name="verify_attention_gpu",
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
    )(*args)
    sink_1KR1 = None if rows.sink_KR1 is None else rows.sink_KR1[None]
    return merge_splits(acc_P[:, :, :, :r], m_P[..., :r], l_P[..., :r], v_BSKH.dtype, sink_1KR1)


def merge_splits(acc_BKPRH, m_BKPR, l_BKPR, dtype, sink_BKR1=None):
    """Combines per-split flash partials (unnormalised acc, running max, sum) along axis 2
    (then the sinks, when given, as ``finalize`` folds them)."""
    m_max = jnp.max(m_BKPR, axis=2, keepdims=True)
    # An empty split has m = -inf: weight 0 (also when every split is empty).
    w = jnp.where(m_BKPR == -jnp.inf, 0.0, jnp.exp(m_BKPR - jnp.where(m_max == -jnp.inf, 0.0, m_max)))
    l_BKR1 = jnp.sum(w * l_BKPR, axis=2)[..., None]
    acc_BKRH = jnp.sum(w[..., None] * acc_BKPRH, axis=2)
    return finalize(l_BKR1, acc_BKRH, dtype, m_max[:, :, 0, :, None], sink_BKR1)
