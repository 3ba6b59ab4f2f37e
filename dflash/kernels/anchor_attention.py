"""Anchor-block attention: the DFlash drafter's KV-injection attention (docs/design.md §5).

``A`` blocks of ``Q`` query rows per sequence; block ``a`` sees the context positions its
``ctx_mask[b, a]`` allows (training: ``s < anchor_a`` inside its document; inference:
``s < len``) plus all of its own block (bidirectional), never another block. The reference
is the drafter's original blockwise einsum; the Pallas kernel runs a flash-style online
softmax over context tiles and skips, per group of anchors, every tile outside the range of
tiles its mask touches (block-sparse: for ``s < anchor`` masks that is exactly the tiles
holding visible keys), then folds in the block's own keys. A sliding drafter layer (``window``)
masks each row by position instead (``window_masks``); only the jnp forms take it.

Shape letters: B batch, A blocks (anchors), Q rows per block, S context positions, N query
heads, K kv heads, G = N / K, H head dim; a program handles ``a_p`` anchors of one kv head,
``R = a_p*G*Q`` query rows (row ``(anchor*G + g)*Q + q``) against ``a_p*Q`` block keys.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from dflash.attention import NEG_INF
from dflash.kernels.common import (
    LANES,
    finalize,
    init_carry,
    is_pow2,
    kernel_backend,
    next_pow2,
    online_update,
    poison_outputs,
    reset_state,
    zero_rows_past,
)

DEFAULT_TILE = {"tpu": 512, "gpu": 64}
TARGET_ROWS = {"tpu": 256, "gpu": 64}  # query rows per program the default anchor grouping aims at


def window_masks(ctx_mask_BAS, window: int, q_pos_BAQ, ctx_pos_BS):
    """A sliding drafter layer's masks (docs/design.md §5): context ``[B,A,Q,S]`` and block ``[B,A,Q,Q]``.

    Block row ``i`` (position ``p+i``) sees what ``ctx_mask`` lets its block see at positions
    ``> p+i-window``, and the block rows ``j <= i`` with ``i-j < window``: causal sliding-window
    attention over context-then-block, as the reference trainer and vLLM run such layers.
    """
    ctx_BAQS = ctx_mask_BAS[:, :, None, :] & (q_pos_BAQ[..., None] - ctx_pos_BS[:, None, None, :] < window)
    d_BAQP = q_pos_BAQ[..., :, None] - q_pos_BAQ[..., None, :]
    return ctx_BAQS, (d_BAQP >= 0) & (d_BAQP < window)


def reference_anchor_block_attention(q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS,
                                     *, window: int = 0, q_pos_BAQ=None, ctx_pos_BS=None, ctx_tile=None,
                                     anchors_per_program=None, backend=None, interpret=False, poison=False):
    """Pure-jnp reference (the drafter's blockwise attention): O(A*Q*(S+Q)), not O((A*Q)^2).

    q ``[B,A,Q,N,H]``; context k/v ``[B,S,K,H]`` (cast to the block's dtype); block k/v
    ``[B,A,Q,K,H]``; ``ctx_mask_BAS`` bool. ``window`` > 0: a sliding layer, masked per row by
    ``window_masks`` from the rows' positions ``q_pos_BAQ`` and the context's ``ctx_pos_BS``.
    Returns ``[B,A,Q,N,H]`` in the value dtype. The kernel-only keywords are accepted (same
    signature) and ignored.
    """
    del ctx_tile, anchors_per_program, backend, interpret, poison
    b, a, k, n, hd = q_BAQNH.shape
    kh = k_blk_BAQKH.shape[3]
    q_BAKkgH = q_BAQNH.reshape(b, a, k, kh, n // kh, hd)
    k_blk, v_blk = k_blk_BAQKH, v_blk_BAQKH
    k_ctx, v_ctx = k_ctx_BSKH.astype(k_blk.dtype), v_ctx_BSKH.astype(v_blk.dtype)
    scale = hd ** -0.5
    s_ctx = jnp.einsum("BAQkgH,BSkH->BkgAQS", q_BAKkgH, k_ctx, preferred_element_type=jnp.float32)
    s_blk = jnp.einsum("BAQkgH,BAPkH->BkgAQP", q_BAKkgH, k_blk, preferred_element_type=jnp.float32)
    if window:
        ctx_BAQS, blk_BAQP = window_masks(ctx_mask_BAS, window, q_pos_BAQ, ctx_pos_BS)
        s_ctx = jnp.where(ctx_BAQS[:, None, None], s_ctx * scale, NEG_INF)
        s_blk = jnp.where(blk_BAQP[:, None, None], s_blk * scale, NEG_INF)
    else:
        s_ctx = jnp.where(ctx_mask_BAS[:, None, None, :, None, :], s_ctx * scale, NEG_INF)
        s_blk = s_blk * scale
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_blk], axis=-1), axis=-1)
    p_ctx, p_blk = probs[..., : k_ctx.shape[1]], probs[..., k_ctx.shape[1]:]
    out = (jnp.einsum("BkgAQS,BSkH->BAQkgH", p_ctx.astype(v_ctx.dtype), v_ctx)
           + jnp.einsum("BkgAQP,BAPkH->BAQkgH", p_blk.astype(v_blk.dtype), v_blk))
    return out.reshape(b, a, k, n, hd)


ANCHOR_CHUNK = 16  # anchors per step of the chunked (training) form


def chunked_anchor_block_attention(q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS,
                                   *, chunk: int = ANCHOR_CHUNK, window: int = 0, q_pos_BAQ=None,
                                   ctx_pos_BS=None):
    """The reference on ``chunk`` anchors at a time, rematerialised: the drafter's training form.

    The reference holds ``[B, N, A, Q, S]`` scores (and autodiff keeps their probabilities
    for the backward): ~13 GB per layer and device at the Qwen3-8B preset. Here a ``lax.scan``
    over anchor chunks with a ``jax.checkpoint``-ed body keeps only the chunk's inputs, and
    the backward recomputes one chunk's scores at a time: ``[B, N, chunk, Q, S]``. Same ops
    per anchor as the reference (blocks never see each other), so the same values.
    """
    c = min(chunk, q_BAQNH.shape[1])

    q_pos = jnp.zeros(q_BAQNH.shape[:3], jnp.int32) if q_pos_BAQ is None else q_pos_BAQ  # read by windows

    @jax.checkpoint
    def one(carry, xs):
        q, kb, vb, mask, pos = xs
        return carry, reference_anchor_block_attention(q, k_ctx_BSKH, v_ctx_BSKH, kb, vb, mask, window=window,
                                                       q_pos_BAQ=pos, ctx_pos_BS=ctx_pos_BS)

    xs = tuple(split_anchor_chunks(x, c) for x in (q_BAQNH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS, q_pos))
    _, out = jax.lax.scan(one, None, xs)
    return merge_anchor_chunks(out, q_BAQNH.shape[1])


def split_anchor_chunks(x_BA: jax.Array, chunk: int) -> jax.Array:
    """``[B, A, ...]`` -> ``[n, B, chunk, ...]``, A zero-padded up to ``n * chunk``.

    Blocks never see each other, so a padded anchor (zero inputs, empty context mask) sees
    only its own zero block and changes no real anchor's value or gradient.
    """
    b, a = x_BA.shape[:2]
    n = -(-a // chunk)
    x_BA = jnp.pad(x_BA, [(0, 0), (0, n * chunk - a)] + [(0, 0)] * (x_BA.ndim - 2))
    return jnp.swapaxes(x_BA.reshape(b, n, chunk, *x_BA.shape[2:]), 0, 1)


def merge_anchor_chunks(x_nBc: jax.Array, anchors: int) -> jax.Array:
    """Inverse of ``split_anchor_chunks``: ``[n, B, chunk, ...]`` -> ``[B, anchors, ...]``."""
    n, b, c = x_nBc.shape[:3]
    return jnp.swapaxes(x_nBc, 0, 1).reshape(b, n * c, *x_nBc.shape[3:])[:, :anchors]


class _Config(NamedTuple):
    ctx_tile: int | None
    anchors_per_program: int | None
    backend: str
    interpret: Any
    poison: bool


def anchor_block_attention(q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS, *,
                           ctx_tile=None, anchors_per_program=None, backend=None, interpret=False,
                           poison=False):
    """Pallas anchor-block attention; same contract as ``reference_anchor_block_attention``.

    ctx_tile: context positions per tile (TPU default 512, GPU 64). anchors_per_program:
    anchors sharing one program (and one pass over the context tiles their masks touch);
    default aims at 256 (TPU) / 64 (GPU) query rows. backend / interpret / poison: as in
    ``verify_attention``. Differentiated (training), the op is the reference, forward and
    backward: there is no backward kernel.
    """
    b, a, qn, n, h = q_BAQNH.shape
    if k_blk_BAQKH.shape[:3] != (b, a, qn) or k_blk_BAQKH.shape[4] != h or n % k_blk_BAQKH.shape[3]:
        raise ValueError(f"block k/v must be [B,A,Q,K,H] matching q {q_BAQNH.shape}, got {k_blk_BAQKH.shape}")
    if k_ctx_BSKH.shape[0] != b or k_ctx_BSKH.shape[2:] != k_blk_BAQKH.shape[3:]:
        raise ValueError(f"context k/v must be [B,S,K,H], got {k_ctx_BSKH.shape}")
    if ctx_mask_BAS.shape != (b, a, k_ctx_BSKH.shape[1]):
        raise ValueError(f"ctx_mask must be [B,A,S] = {(b, a, k_ctx_BSKH.shape[1])}, "
                         f"got {ctx_mask_BAS.shape}")
    cfg = _Config(ctx_tile, anchors_per_program, kernel_backend(backend), interpret, poison)
    mask_BAS = ctx_mask_BAS.astype(bool)
    return _anchor_op(q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, mask_BAS, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _anchor_op(q, kc, vc, kb, vb, mask, cfg):
    return _forward(q, kc, vc, kb, vb, mask, cfg)


def _anchor_op_fwd(q, kc, vc, kb, vb, mask, cfg):
    # Only runs under differentiation (drafter training): the chunked reference, forward and
    # backward (memory of one anchor chunk's scores, not all of them).
    return jax.vjp(lambda *x: chunked_anchor_block_attention(*x, mask), q, kc, vc, kb, vb)


def _anchor_op_bwd(cfg, vjp, g):
    return (*vjp(g), None)


_anchor_op.defvjp(_anchor_op_fwd, _anchor_op_bwd)


class _Layout(NamedTuple):
    tile: int
    n_tiles: int
    anchors: int  # a_p, anchors per program
    groups: int  # anchor groups (A padded to a multiple of a_p, divided by it)
    q_pad: int  # rows per block after padding (GPU: a power of two)


def _layout(cfg: _Config, a: int, qn: int, g: int, s: int) -> _Layout:
    gpu = cfg.backend == "gpu"
    tile = cfg.ctx_tile or DEFAULT_TILE[cfg.backend]
    if gpu and (not is_pow2(tile) or tile < 16):
        raise ValueError(f"GPU ctx_tile must be a power of two >= 16, got {tile}")
    tile = tile if gpu else min(tile, s)
    q_pad = next_pow2(qn) if gpu else qn
    ap = cfg.anchors_per_program or max(1, min(a, TARGET_ROWS[cfg.backend] // (g * q_pad)))
    if gpu:
        ap = next_pow2(ap)
        if not is_pow2(g * q_pad * ap) or g * q_pad * ap < 16:
            raise ValueError("the GPU kernel needs a power-of-two, >= 16, row count per program "
                             f"(G={g}, padded Q={q_pad}, anchors per program={ap})")
    return _Layout(tile, pl.cdiv(s, tile), ap, pl.cdiv(a, ap), q_pad)


def _forward(q_BAQNH, kc_BSKH, vc_BSKH, kb_BAQKH, vb_BAQKH, mask_BAS, cfg: _Config):
    b, a, qn, n, h = q_BAQNH.shape
    s, kh = kc_BSKH.shape[1], kc_BSKH.shape[2]
    g = n // kh
    lay = _layout(cfg, a, qn, g, s)
    ap, groups, qp = lay.anchors, lay.groups, lay.q_pad
    pad_a = groups * ap - a
    # Padded anchors see no context and zero keys; padded block rows are masked as keys and
    # dropped as queries.
    q = jnp.pad(q_BAQNH, ((0, 0), (0, pad_a), (0, qp - qn), (0, 0), (0, 0)))
    q = q.reshape(b, groups * ap, qp, kh, g, h)
    q_BKGRH = q.transpose(0, 3, 1, 4, 2, 5).reshape(b, kh, groups, ap * g * qp, h)

    def blocks(x_BAQKH):
        x = jnp.pad(x_BAQKH, ((0, 0), (0, pad_a), (0, qp - qn), (0, 0), (0, 0)))
        return x.transpose(0, 3, 1, 2, 4).reshape(b, kh, groups, ap * qp, h)

    kb, vb = blocks(kb_BAQKH), blocks(vb_BAQKH)
    mask_BGaS = jnp.pad(mask_BAS, ((0, 0), (0, pad_a), (0, 0))).reshape(b, groups, ap, s)
    # The live tile range of each anchor group: first and one-past-last tile it sees anything in.
    padded = jnp.pad(mask_BGaS, ((0, 0), (0, 0), (0, 0), (0, lay.n_tiles * lay.tile - s)))
    any_BGJ = padded.reshape(b, groups, ap, lay.n_tiles, lay.tile).any(axis=(2, 4))
    seen = any_BGJ.any(axis=-1)
    lo_BG = jnp.where(seen, jnp.argmax(any_BGJ, axis=-1), 0).astype(jnp.int32)
    hi_BG = jnp.where(seen, lay.n_tiles - jnp.argmax(any_BGJ[..., ::-1], axis=-1), 0).astype(jnp.int32)
    run = _forward_tpu if cfg.backend == "tpu" else _forward_gpu
    out = run(q_BKGRH, kc_BSKH, vc_BSKH, kb, vb, mask_BGaS.astype(jnp.int32), lo_BG, hi_BG, cfg, lay,
              qn)  # [B, K, groups, R, H]
    out = out.reshape(b, kh, groups * ap, g, qp, h)[:, :, :a, :, :qn]
    return out.transpose(0, 2, 4, 1, 3, 5).reshape(b, a, qn, n, h)


def _expand_mask(mask_aC: jax.Array, rows_per_anchor: int) -> jax.Array:
    """``[a_p, C]`` per-anchor context mask -> ``[R, C]`` per query row (anchor-major rows)."""
    ap, c = mask_aC.shape
    wide = jnp.broadcast_to(mask_aC[:, None, :], (ap, rows_per_anchor, c))
    return wide.reshape(ap * rows_per_anchor, c) != 0


def _block_mask(rows: int, rows_per_anchor: int, q_pad: int, q_real: int) -> jax.Array:
    """``[R, a_p*Q]``: a query row sees the (real) keys of its own block only."""
    shape = (rows, rows // rows_per_anchor * q_pad)
    r_anchor = jax.lax.broadcasted_iota(jnp.int32, shape, 0) // rows_per_anchor
    col = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = r_anchor == col // q_pad
    return mask if q_pad == q_real else mask & (col % q_pad < q_real)


def _block_step(carry, q, kb_ref, vb_ref, rows_per_anchor, q_pad, q_real, scale):
    mask = _block_mask(q.shape[0], rows_per_anchor, q_pad, q_real)
    return online_update(carry, q, kb_ref[...], vb_ref[...], mask, scale)


# ---------------------------------------------------------------------------------- TPU (Mosaic)
def _tpu_kernel(lo_ref, hi_ref, q_ref, kc_ref, vc_ref, mask_ref, kb_ref, vb_ref, *refs, scale, tile, n_slots,
                groups, rows_per_anchor, q_pad, q_real):
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]
    b, grp, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = b * groups + grp
    lo, hi = lo_ref[i], hi_ref[i]

    def load():
        return (jnp.max(m_ref[...], axis=1, keepdims=True), jnp.max(l_ref[...], axis=1, keepdims=True),
                acc_ref[...])

    def store(carry):
        m_ref[...] = jnp.broadcast_to(carry[0], m_ref.shape)
        l_ref[...] = jnp.broadcast_to(carry[1], l_ref.shape)
        acc_ref[...] = carry[2]

    @pl.when(j == 0)
    def _init():
        reset_state(m_ref, l_ref, acc_ref)

    @pl.when((j >= lo) & (j < hi))  # outside [lo, hi): no compute, and (index map) no DMA
    def _context():
        col0 = j * tile
        cols_ok = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1) < n_slots
        mask = _expand_mask(mask_ref[...], rows_per_anchor) & cols_ok
        k = kc_ref[...].astype(kb_ref.dtype)
        v = zero_rows_past(vc_ref[...].astype(vb_ref.dtype), col0, n_slots)
        store(online_update(load(), q_ref[...], k, v, mask, scale))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        _, l_, acc = _block_step(load(), q_ref[...], kb_ref, vb_ref, rows_per_anchor, q_pad, q_real, scale)
        o_ref[...] = finalize(l_, acc, o_ref.dtype)


def _forward_tpu(q, kc_BSKH, vc_BSKH, kb, vb, mask_BGaS, lo_BG, hi_BG, cfg: _Config, lay: _Layout, qn: int):
    b, kh, groups, r, h = q.shape
    s = kc_BSKH.shape[1]
    tile, ap = lay.tile, lay.anchors
    kc, vc = kc_BSKH.reshape(b, s, kh * h), vc_BSKH.reshape(b, s, kh * h)

    def ctx_j(bi, gi, j, lo, hi):
        i = bi * groups + gi
        return jnp.clip(j, lo[i], jnp.maximum(hi[i] - 1, lo[i]))

    def ctx_map(bi, hk, gi, j, lo, hi):
        return bi, ctx_j(bi, gi, j, lo, hi), hk

    def mask_map(bi, hk, gi, j, lo, hi):
        return bi, gi, 0, ctx_j(bi, gi, j, lo, hi)

    def group_map(bi, hk, gi, j, lo, hi):
        return bi, hk, gi, 0, 0

    q_spec = pl.BlockSpec((None, None, None, r, h), group_map)
    blk_spec = pl.BlockSpec((None, None, None, ap * lay.q_pad, h), group_map)
    in_specs = [q_spec, pl.BlockSpec((None, tile, h), ctx_map), pl.BlockSpec((None, tile, h), ctx_map),
                pl.BlockSpec((None, None, ap, tile), mask_map), blk_spec, blk_spec]
    args = [lo_BG.reshape(-1), hi_BG.reshape(-1), q, kc, vc, mask_BGaS, kb, vb]
    out_shape = jax.ShapeDtypeStruct(q.shape, vb.dtype)
    aliases = poison_outputs(cfg.poison, in_specs, args, [out_shape], [q_spec])
    kernel = functools.partial(_tpu_kernel, scale=h ** -0.5, tile=tile, n_slots=s, groups=groups,
                               rows_per_anchor=r // ap, q_pad=lay.q_pad, q_real=qn)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kh, groups, lay.n_tiles), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((r, LANES), jnp.float32), pltpu.VMEM((r, LANES), jnp.float32),
                            pltpu.VMEM((r, h), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        input_output_aliases=aliases,
        interpret=cfg.interpret,
        name="anchor_block_attention_tpu",
    )(*args)


# ---------------------------------------------------------------------------------- GPU (Triton)
def _gpu_kernel(lo_ref, hi_ref, q_ref, kc_ref, vc_ref, mask_ref, kb_ref, vb_ref, *refs, scale, tile, n_slots,
                rows_per_anchor, q_pad, q_real):
    o_ref = refs[-1]
    q = q_ref[...]

    def context_tile(j, carry):
        col0 = j * tile
        cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        rows_ok = (col0 + jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0)) < n_slots
        k = pltriton.load(kc_ref.at[pl.ds(col0, tile), :], mask=rows_ok, other=0.0).astype(kb_ref.dtype)
        v = pltriton.load(vc_ref.at[pl.ds(col0, tile), :], mask=rows_ok, other=0.0).astype(vb_ref.dtype)
        m_aC = pltriton.load(mask_ref.at[:, pl.ds(col0, tile)], mask=cols < n_slots, other=0)
        mask = _expand_mask(m_aC, rows_per_anchor) & (cols < n_slots)
        return online_update(carry, q, k, v, mask, scale)

    carry = jax.lax.fori_loop(lo_ref[...], hi_ref[...], context_tile, init_carry(q.shape[0], q.shape[1]))
    _, l_, acc = _block_step(carry, q, kb_ref, vb_ref, rows_per_anchor, q_pad, q_real, scale)
    o_ref[...] = finalize(l_, acc, o_ref.dtype)


def _forward_gpu(q, kc_BSKH, vc_BSKH, kb, vb, mask_BGaS, lo_BG, hi_BG, cfg: _Config, lay: _Layout, qn: int):
    b, kh, groups, r, h = q.shape
    tile, ap = lay.tile, lay.anchors
    span = lay.n_tiles * tile  # whole context row per program, rounded up to whole tiles

    def group_map(bi, hk, gi):
        return bi, hk, gi, 0, 0

    q_spec = pl.BlockSpec((None, None, None, r, h), group_map)
    blk_spec = pl.BlockSpec((None, None, None, ap * lay.q_pad, h), group_map)
    ctx_spec = pl.BlockSpec((None, span, None, h), lambda bi, hk, gi: (bi, 0, hk, 0))
    scalar = pl.BlockSpec((None, None), lambda bi, hk, gi: (bi, gi))
    in_specs = [scalar, scalar, q_spec, ctx_spec, ctx_spec,
                pl.BlockSpec((None, None, ap, span), lambda bi, hk, gi: (bi, gi, 0, 0)), blk_spec, blk_spec]
    args = [lo_BG, hi_BG, q, kc_BSKH, vc_BSKH, mask_BGaS, kb, vb]
    out_shape = jax.ShapeDtypeStruct(q.shape, vb.dtype)
    aliases = poison_outputs(cfg.poison, in_specs, args, [out_shape], [q_spec])
    kernel = functools.partial(_gpu_kernel, scale=h ** -0.5, tile=tile, n_slots=kc_BSKH.shape[1],
                               rows_per_anchor=r // ap, q_pad=lay.q_pad, q_real=qn)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, kh, groups), in_specs=in_specs, out_specs=q_spec,
        input_output_aliases=aliases, interpret=cfg.interpret, name="anchor_block_attention_gpu",
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
    )(*args)
