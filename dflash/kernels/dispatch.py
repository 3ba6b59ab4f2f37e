"""Attention backend dispatch: ``attention_impl`` = ``auto`` | ``pallas`` | ``reference``.

Every model (``Transformer``, ``DFlashDrafter``, ``OrthrusDrafter``) takes ``attention_impl``
as a constructor argument (default ``auto``) and keeps it as a plain static attribute: it is
not architecture config (``ModelConfig`` round-trips to HF ``config.json``), and being static
it is part of the NNX graphdef, so a jitted step never mixes implementations. For a run, pass
it to ``load_target``; ``resolve_method`` builds the drafter with the target's setting.

* ``reference``: the pure-jnp path, bit-for-bit what the models computed before kernels.
* ``pallas``: the Pallas kernels where they apply: the target's attention for blocks of
  ``T <= 128`` new tokens (decode / verify), the DFlash drafter's anchor-block attention
  always, and the flash prefill kernel for packed training rows (``segment_ids``; TPU
  layout). On CPU they run in interpret mode (slow; for
  tests). On a TPU/GPU, shapes the kernel cannot lower (see ``hardware_problem``) raise.
* ``auto``: ``pallas`` on TPU/GPU where the shapes are supported and the kernel passed its
  self-check on this device (``selfcheck.py``: run once per device kind, head layout and
  dtype; a kernel that errors or disagrees with its reference is replaced by it, with one
  line saying so), else ``reference``;
  ``reference`` on CPU, except for the memory-bounded forms: the drafter's anchor attention
  runs the reference in anchor chunks (``chunked_anchor_block_attention``: the same values,
  rematerialised per chunk in the backward). Packed-row prefill (``segment_ids``)
  never falls back to the dense ``[S, S]`` reference under ``auto``: without the kernel it
  runs the chunked jnp form (memory O(S * chunk)).

Both the verify and the prefill kernels take the attention layer's options: a sliding
``window`` and attention ``sinks`` (one logit per query head), so every attention layer form
reaches them (the self-check keys and checks each form it is asked for).

Under differentiation the kernels are their jnp forms (custom VJP): verify the reference,
anchor and prefill the chunked forms, so training gets the same values either way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax

from dflash.errors import ConfigError
from dflash.kernels import selfcheck
from dflash.kernels.anchor_attention import (
    anchor_block_attention,
    chunked_anchor_block_attention,
    reference_anchor_block_attention,
)
from dflash.kernels.common import is_pow2, platform
from dflash.kernels.prefill_attention import (
    chunked_prefill_attention,
    reference_prefill_attention,
)
from dflash.kernels.prefill_attention import prefill_attention as _prefill_kernel
from dflash.kernels.spmd import per_shard
from dflash.kernels.verify_attention import MAX_BLOCK_LEN
from dflash.kernels.verify_attention import verify_attention as _verify_kernel

ATTENTION_IMPLS = ("auto", "pallas", "reference")


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}")
    return impl


def resolve_impl(impl: str) -> str:
    """``pallas`` or ``reference``: what ``impl`` means on the current default backend."""
    if check_impl(impl) == "auto":
        return "pallas" if platform() in ("tpu", "gpu") else "reference"
    return impl


def hardware_problem(head_dim: int, kv_heads: int, group: int, block_rows: int | None = None) -> str | None:
    """Why the compiled (non-interpret) kernels cannot take these shapes here, or None.

    TPU (Mosaic): one kv head's slice of a ``[.., K*H]`` cache row is a lane block, so
    ``H % 128 == 0`` (or a single kv head); the drafter kernel also merges ``G*Q`` rows into
    sublanes (``G*Q % 8 == 0``). GPU (Triton): blocks are powers of two, so ``H`` must be a
    power of two >= 16, and so must ``G`` for the drafter kernel (rows are padded otherwise).
    """
    where = platform()
    if where == "tpu":
        if head_dim % 128 and kv_heads > 1:
            return f"the TPU kernels need head_dim % 128 == 0 (or one kv head), got head_dim={head_dim}"
        if block_rows is not None and (group * block_rows) % 8:
            return f"the TPU drafter kernel needs G*Q % 8 == 0, got G={group}, Q={block_rows}"
    elif where == "gpu":
        if not is_pow2(head_dim) or head_dim < 16:
            return f"the GPU kernels need a power-of-two head_dim >= 16, got {head_dim}"
        if block_rows is not None and not is_pow2(group):
            return f"the GPU drafter kernel needs a power-of-two query/kv head ratio, got {group}"
    return None


def _wants_kernel(impl: str, problem: str | None, op: str, kernel: Any, layout: selfcheck.Layout) -> bool:
    """``pallas``: the kernel (or an error saying why it cannot run); ``auto``: the kernel where
    the shapes allow and it passed its self-check on this device."""
    if resolve_impl(impl) != "pallas":
        return False
    if problem is not None:
        if impl == "pallas":
            raise ConfigError(f"attention_impl='pallas' cannot run here: {problem}")
        return False
    return impl == "pallas" or selfcheck.passes(op, kernel, layout)


def _layout(q: jax.Array, k: jax.Array, head_axis: int, rows: int, window: int = 0,
            sinks: bool = False) -> selfcheck.Layout:
    """The self-check's key of a call: query heads on ``head_axis`` of ``q``, kv heads on axis 2 of ``k``."""
    return selfcheck.Layout(q.shape[head_axis], k.shape[2], q.shape[-1], rows, jax.numpy.dtype(q.dtype).name,
                            jax.numpy.dtype(k.dtype).name, window, sinks)


def use_verify_kernel(impl: str, q_BTNH: jax.Array, k_BSKH: jax.Array, *, window: int = 0,
                      sinks: bool = False) -> bool:
    """Whether the target's attention over this block runs the verify kernel (with that sliding
    window, 0: none, and with or without attention sinks)."""
    if q_BTNH.shape[1] > MAX_BLOCK_LEN:  # prefill: the reference (see docs/kernels.md)
        return False
    kh = k_BSKH.shape[2]
    problem = hardware_problem(q_BTNH.shape[3], kh, q_BTNH.shape[2] // kh)
    layout = _layout(q_BTNH, k_BSKH, 2, 0, window, sinks)  # (its check covers every block length)
    return _wants_kernel(impl, problem, "verify_attention", _verify_kernel, layout)


def _with_options(kernel, args: tuple, layouts: tuple[str, ...], sinks_N, positions_BT, **static):
    """``kernel`` over ``args`` plus the optional ``sinks_N`` (split with the query heads) and
    ``positions_BT`` (with the rows) that are given, ready for ``per_shard``."""
    names = [name for name, x in (("sinks_N", sinks_N), ("positions_BT", positions_BT)) if x is not None]
    extra = tuple(x for x in (sinks_N, positions_BT) if x is not None)
    extra_layouts = tuple({"sinks_N": "h", "positions_BT": "b."}[name] for name in names)
    n = len(args)

    def run(*xs):
        return kernel(*xs[:n], **dict(zip(names, xs[n:], strict=True)), **static)

    return run, args + extra, layouts + extra_layouts


def verify_attention(q_BTNH, k_BSKH, v_BSKH, lengths_B, block_mask, sinks_N=None, positions_BT=None, *,
                     window: int = 0):
    """The verify kernel, compiled for this platform (interpret mode on CPU): ``[B,T,N,H]``."""
    mask_layout = "b.." if block_mask.ndim == 3 else ""
    run, args, layouts = _with_options(_verify_kernel, (q_BTNH, k_BSKH, v_BSKH, lengths_B, block_mask),
                                       ("b.h.", "b.h.", "b.h.", "b", mask_layout), sinks_N, positions_BT,
                                       window=window, interpret=platform() == "cpu")
    return per_shard(run, args, layouts, "b.h.", rows=q_BTNH.shape[0], heads=q_BTNH.shape[2],
                     kv_heads=k_BSKH.shape[2])


def anchor_attention(q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS, *, impl: str,
                     window: int = 0, q_pos_BAQ=None, ctx_pos_BS=None):
    """The drafter's anchor-block attention under ``impl``: ``[B,A,Q,N,H]``.

    A sliding layer (``window`` > 0, masked per row by the positions) runs the jnp forms: the
    kernel's mask is per block. Under ``auto`` / ``pallas`` that is the memory-bounded chunked form.
    """
    kh, q_rows = k_ctx_BSKH.shape[2], q_BAQNH.shape[2]
    args = (q_BAQNH, k_ctx_BSKH, v_ctx_BSKH, k_blk_BAQKH, v_blk_BAQKH, ctx_mask_BAS)
    if window:
        form = reference_anchor_block_attention if impl == "reference" else chunked_anchor_block_attention
        return form(*args, window=window, q_pos_BAQ=q_pos_BAQ, ctx_pos_BS=ctx_pos_BS)
    problem = hardware_problem(q_BAQNH.shape[4], kh, q_BAQNH.shape[3] // kh, q_rows)
    if _wants_kernel(impl, problem, "anchor_block_attention", anchor_block_attention,
                     _layout(q_BAQNH, k_ctx_BSKH, 3, q_rows)):
        interpret = platform() == "cpu"
        return per_shard(lambda *x: anchor_block_attention(*x, interpret=interpret), args,
                         ("b..h.", "b.h.", "b.h.", "b..h.", "b..h.", "b.."), "b..h.", rows=q_BAQNH.shape[0],
                         heads=q_BAQNH.shape[3], kv_heads=kh)
    if impl == "auto":  # the memory-bounded form (equal to the reference when A <= its chunk)
        return chunked_anchor_block_attention(*args)
    return reference_anchor_block_attention(*args)


def prefill_problem(head_dim: int, kv_heads: int) -> str | None:
    """Why the compiled prefill kernel cannot run here, or None (its layout is Mosaic's)."""
    if platform() == "gpu":
        return "the prefill kernel has a TPU (Mosaic) layout only; GPUs run the chunked form"
    return hardware_problem(head_dim, kv_heads, 1)


def prefill_attention(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, sinks_N=None, *, window: int = 0, impl: str):
    """Causal same-document attention of packed rows under ``impl``: ``[B,S,N,H]`` (with a sliding
    window, 0: none, and attention sinks ``[N]``, None: none).

    ``reference``: the dense ``attend`` (``[S, S]`` scores); ``pallas``: the flash kernel;
    ``auto``: the kernel where it compiles, else the chunked jnp form.
    """
    args = (q_BSNH, k_BSKH, v_BSKH, segment_ids_BS)
    if check_impl(impl) == "reference":
        return reference_prefill_attention(*args, sinks_N, window=window)
    problem = prefill_problem(q_BSNH.shape[3], k_BSKH.shape[2])
    if _wants_kernel(impl, problem, "prefill_attention", _prefill_kernel,
                     _layout(q_BSNH, k_BSKH, 2, 0, window, sinks_N is not None)):
        run, args, layouts = _with_options(_prefill_kernel, args, ("b.h.", "b.h.", "b.h.", "b."), sinks_N,
                                           None, window=window, interpret=platform() == "cpu")
        return per_shard(run, args, layouts, "b.h.", rows=q_BSNH.shape[0], heads=q_BSNH.shape[2],
                         kv_heads=k_BSKH.shape[2])
    return chunked_prefill_attention(*args, sinks_N, window=window)



# ----------------------------------------------------------------------------- grouped matmul (MoE experts)
def use_gmm_kernel(impl: str) -> bool:
    """Whether a MoE layer's grouped matmuls run megablox ``gmm`` (a Mosaic kernel: TPU only).

    ``auto`` / ``pallas`` on TPU: the kernel; ``pallas`` on CPU: the kernel in interpret mode (tests);
    otherwise (``reference``, GPUs, ``auto`` on CPU) ``jax.lax.ragged_dot``, which XLA compiles.
    """
    where = platform()
    return check_impl(impl) != "reference" and (where == "tpu" or (impl == "pallas" and where == "cpu"))


def _gmm_tile(size: int) -> int:
    """A tile of a contracting / output dimension: the whole of a small one, else the largest of
    512, 256, 128 that divides it (128 with a masked remainder when none does)."""
    return size if size <= 128 else next((t for t in (512, 256, 128) if size % t == 0), 128)


def grouped_matmul(lhs_MK: jax.Array, rhs_GKN: jax.Array, sizes_G: jax.Array, *, impl: str) -> jax.Array:
    """``[M, N]``: rows ``lhs[offset_g : offset_g + sizes_g]`` times ``rhs[g]`` for each group ``g``
    (rows grouped in order; rows past ``sum(sizes)`` are zero), what ``jax.lax.ragged_dot`` computes.

    The kernel needs ``M`` a multiple of its row tile: rows are padded (and cut off again). It is
    called per shard (``MoE`` wraps it in a ``shard_map`` under a mesh). Its VJP is megablox's
    (``gmm`` for the input, ``tgmm`` for the weights).
    """
    if not use_gmm_kernel(impl):
        return jax.lax.ragged_dot(lhs_MK, rhs_GKN, sizes_G)
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    jnp = jax.numpy
    m, k, n = lhs_MK.shape[0], lhs_MK.shape[1], rhs_GKN.shape[2]
    tm = 128 if m >= 128 else -(-m // 8) * 8
    padded = -(-m // tm) * tm
    lhs = jnp.pad(lhs_MK, ((0, padded - m), (0, 0))) if padded != m else lhs_MK
    # Rows in no group are never written by the kernel, in its VJP either: masked on both sides so
    # neither their values nor their gradients (uninitialised memory) reach anything.
    rows = (jnp.arange(padded) < jnp.sum(sizes_G))[:, None]
    lhs = jnp.where(rows, lhs, 0)
    # bf16 operands: the MXU's products are exact, and Mosaic refuses an fp32 contract precision
    # for them (what jax_default_matmul_precision=highest, as the tests set, would ask for).
    bf16 = lhs_MK.dtype == rhs_GKN.dtype == jnp.bfloat16
    with jax.default_matmul_precision("default") if bf16 else contextlib.nullcontext():
        out = gmm(lhs, rhs_GKN, sizes_G.astype(jnp.int32), lhs_MK.dtype, (tm, _gmm_tile(k), _gmm_tile(n)),
                  None, None, False, platform() == "cpu")
    return jnp.where(rows, out, 0)[:m]  # rows in no group: zero, as ragged_dot's (the kernel skips)
