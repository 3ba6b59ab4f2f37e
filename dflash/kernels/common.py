"""Pieces shared by the attention kernels: the flash-attention update, platform checks.

Everything here operates on *values* (already loaded from refs), so the same code runs in
the Mosaic TPU, Triton GPU and interpret lowerings. Shape letters: R query rows of one
program, C keys of one kv tile, H head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from dflash.attention import NEG_INF  # finite masking, as ``attend`` does

LANES = 128  # TPU lane width: m / l scratch rows are lane-replicated (the Mosaic convention)

Carry = tuple[jax.Array, jax.Array, jax.Array]  # m [R,1], l [R,1], acc [R,H], all float32


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _precision(a: jax.Array) -> jax.lax.Precision | None:
    """bf16 operands: the native MXU pass (exact products, fp32 accumulation). A global
    ``jax_default_matmul_precision=highest`` would otherwise ask Mosaic for an fp32 contraction
    of bf16 vectors, which it refuses ("Bad lhs type")."""
    return jax.lax.Precision.DEFAULT if a.dtype == jnp.bfloat16 else None


def matmul_t(a_MK: jax.Array, b_NK: jax.Array) -> jax.Array:
    """``a @ b.T`` accumulated in float32 (the QK^T product)."""
    return jax.lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), precision=_precision(a_MK),
                               preferred_element_type=jnp.float32)


def matmul(a_MK: jax.Array, b_KN: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in float32."""
    return jax.lax.dot_general(a_MK, b_KN, (((1,), (0,)), ((), ())), precision=_precision(a_MK),
                               preferred_element_type=jnp.float32)


def init_carry(rows: int, head_dim: int) -> Carry:
    return (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def online_update(carry: Carry, q_RH: jax.Array, k_CH: jax.Array, v_CH: jax.Array,
                  mask_RC: jax.Array | None, scale: float) -> Carry:
    """One online-softmax step over a tile of ``C`` keys (``mask_RC=None``: all visible).

    Scores are ``(q . k) * scale`` in float32, masked to ``NEG_INF`` like ``attend``. Masked
    probabilities are forced to exactly 0, so a row that has seen nothing visible keeps
    ``l = 0`` (and ends as a zero row instead of ``attend``'s uniform average, see docs).
    Probabilities are cast to the value dtype before the PV product, as ``attend`` does.
    """
    m_prev, l_prev, acc_prev = carry
    s_RC = matmul_t(q_RH, k_CH) * scale
    if mask_RC is not None:
        s_RC = jnp.where(mask_RC, s_RC, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(s_RC, axis=1, keepdims=True))  # finite after one step
    p_RC = jnp.exp(s_RC - m_new)
    if mask_RC is not None:
        p_RC = jnp.where(mask_RC, p_RC, 0.0)
    alpha = jnp.exp(m_prev - m_new)  # 0 on the first step (m_prev = -inf)
    l_new = alpha * l_prev + jnp.sum(p_RC, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + matmul(p_RC.astype(v_CH.dtype), v_CH)
    return m_new, l_new, acc_new


def reset_state(m_ref, l_ref, acc_ref) -> None:
    """Empties a kernel's running (max, sum, accumulator) scratch before its first kv tile."""
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def finalize(l_R1: jax.Array, acc_RH: jax.Array, dtype: jnp.dtype, m_R1: jax.Array | None = None,
             sink_R1: jax.Array | None = None) -> jax.Array:
    """``acc / l``; rows that saw no visible key (``l = 0``) become exact zeros, never NaN.

    With ``sink_R1`` (attention sinks: one extra logit per row, a softmax column dropped after
    the softmax) the denominator gains ``exp(sink - m)``; both sides are rescaled to the max of
    ``m`` and the sink first, so a large sink cannot overflow (a row that saw nothing is 0).
    """
    if sink_R1 is None:
        return (acc_RH / jnp.where(l_R1 > 0, l_R1, 1.0)).astype(dtype)
    m_all = jnp.maximum(m_R1, sink_R1)
    alpha = jnp.exp(m_R1 - m_all)  # 0 where no key was seen (m = -inf or NEG_INF)
    return (acc_RH * alpha / (l_R1 * alpha + jnp.exp(sink_R1 - m_all))).astype(dtype)


def zero_rows_past(x_CH: jax.Array, first_row: jax.Array, n_rows: int) -> jax.Array:
    """Zeroes tile rows at absolute index ``>= n_rows`` (out-of-bounds part of a last tile).

    Out-of-bounds tile rows hold garbage on hardware (NaN in interpret mode); a masked score
    gives probability 0, but ``0 * NaN`` in the PV product would still poison the row.
    """
    rows_C1 = first_row + jax.lax.broadcasted_iota(jnp.int32, (x_CH.shape[0], 1), 0)
    return jnp.where(rows_C1 < n_rows, x_CH, jnp.zeros_like(x_CH))


def poison_outputs(poison: bool, in_specs: list, args: list, out_shapes, out_specs) -> dict[int, int]:
    """With ``poison``, appends a NaN-filled input aliased to each output and returns the aliases.

    The kernel then writes into buffers that start as NaN, so a test can prove every output
    element was written (an unwritten one stays NaN).
    """
    aliases: dict[int, int] = {}
    if poison:
        for i, (shape, spec) in enumerate(zip(out_shapes, out_specs, strict=True)):
            in_specs.append(spec)
            args.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            aliases[len(args) - 1] = i
    return aliases


_COMPILING_FOR: list[str] = []  # innermost ``compiling_for`` platform, if any


@contextlib.contextmanager
def compiling_for(where: str) -> Iterator[None]:
    """Traces inside it pick kernels for ``where`` (``tpu``/``gpu``) whatever the default backend:
    ahead-of-time plans (dflash.plan) compile the real Mosaic kernels on a CPU-only host."""
    if where not in ("tpu", "gpu", "cpu"):
        raise ValueError(f"compiling_for: platform must be tpu, gpu or cpu, got {where!r}")
    _COMPILING_FOR.append(where)
    try:
        yield
    finally:
        _COMPILING_FOR.pop()


def platform() -> str:
    """``tpu``, ``gpu`` or ``cpu`` (the default backend, where kernels would run, unless a
    ``compiling_for`` block says otherwise)."""
    if _COMPILING_FOR:
        return _COMPILING_FOR[-1]
    backend = jax.default_backend()
    return backend if backend in ("tpu", "gpu") else "cpu"


def kernel_backend(backend: str | None) -> str:
    """Which kernel variant to build: ``tpu`` (Mosaic) or ``gpu`` (Triton).

    On CPU (interpret mode only) the TPU variant is the default: it is the one that skips
    tiles through its grid, so interpret-mode tests exercise the skipping logic.
    """
    if backend is None:
        return "gpu" if platform() == "gpu" else "tpu"
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"kernel backend must be 'tpu' or 'gpu', got {backend!r}")
    return backend
