"""Building blocks every layer kind uses: ``Linear``, ``RMSNorm``, RoPE, and the per-pass ``Context``.

Shape letters: B batch, T new tokens, S cache slots, D width, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.attention import block_slots, key_positions, visibility, window_mask
from dflash.config import FAMILIES, ModelConfig, RopeConfig, llama3_inv_freq_scale
from dflash.sharding import constrain


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``, kernel stored ``[in, out]`` (HF stores ``[out, in]``)."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = normal(rngs, (din, dout), dtype)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back before the weight (as HF does). ``zero_centred``
    (Qwen3-Next, Qwen3.5): scaled by ``1 + w`` in float32, then cast, ``w`` starting at 0 (so a
    new norm is the identity scale either way). ``scale_f32`` (Gemma 4): scaled by ``w`` in float32,
    then cast. ``with_scale=False``: no weight at all (Gemma 4's value norm)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, zero_centred: bool = False,
                 scale_f32: bool = False, with_scale: bool = True):
        init = jnp.zeros if zero_centred else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype)) if with_scale else None
        self.eps, self.zero_centred, self.scale_f32 = eps, zero_centred, scale_f32

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight is None:
            return x32.astype(x.dtype)
        if self.zero_centred:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        if self.scale_f32:
            return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)


def model_norm(cfg: ModelConfig, dim: int, dtype: jnp.dtype, with_scale: bool = True) -> RMSNorm:
    """An RMSNorm of ``cfg``'s kind (zero-centred or not; Gemma's float32 scale) over ``dim`` channels."""
    return RMSNorm(dim, cfg.rms_norm_eps, dtype, zero_centred=bool(cfg.zero_centred_norm),
                   scale_f32=FAMILIES[cfg.model_type].gemma, with_scale=with_scale)


def inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    """Inverse frequencies ``[dim/2]`` of a rotary embedding over ``dim`` channels (float32,
    llama3 or YaRN scaling applied when configured)."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    pos_freqs = np.float32(rope.theta) ** exponent
    inv = (1.0 / pos_freqs).astype(np.float32)
    if rope.rope_type == "llama3":
        inv = llama3_inv_freq_scale(rope, inv).astype(np.float32)
    elif rope.rope_type == "yarn":
        inv = _yarn_inv_freq(rope, dim, pos_freqs)
    elif rope.rope_type == "proportional":  # frequency 0 (no rotation) past the rotated pairs
        rotated = int(rope.proportion * dim // 2)
        inv = (np.where(np.arange(dim // 2) < rotated, inv, 0.0) / np.float32(rope.factor)).astype(np.float32)
    return inv


def _yarn_inv_freq(rope: RopeConfig, dim: int, pos_freqs: np.ndarray) -> np.ndarray:
    """YaRN: interpolated (``/ factor``) low frequencies, the original high ones, a linear ramp
    between the correction dims of ``beta_slow`` / ``beta_fast`` rotations (transformers' float32
    arithmetic, its scalars in float64 as Python computes them)."""
    base, original = rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singular ramp
    f32 = np.float32
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation = f32(1) - ramp
    inv_extrapolation = (f32(1) / pos_freqs).astype(f32)
    inv_interpolation = (f32(1) / (f32(rope.factor) * pos_freqs)).astype(f32)
    return (inv_interpolation * (f32(1) - extrapolation) + inv_extrapolation * extrapolation).astype(f32)


def rope_tables(rope: RopeConfig, dim: int, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, dim]`` in float32 (HF "rotate_half" layout: halves repeated), times YaRN's
    attention factor when configured (transformers scales both tables, so logits scale by its square)."""
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(rope, dim))
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    scale = rope.attention_scale
    if scale == 1.0:
        return jnp.cos(emb_BTH), jnp.sin(emb_BTH)
    return jnp.cos(emb_BTH) * scale, jnp.sin(emb_BTH) * scale


def rope_cos_sin(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The full-head rotary tables of ``cfg`` (``rope_tables`` over ``head_dim`` channels)."""
    return rope_tables(cfg.rope, cfg.head_dim, positions_BT)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotates the first ``R`` channels of every head (all of them unless RoPE is partial)."""
    r = cos_BTR.shape[-1]
    if r < x_BTNH.shape[-1]:
        return jnp.concatenate([apply_rope(x_BTNH[..., :r], cos_BTR, sin_BTR), x_BTNH[..., r:]], axis=-1)
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return (x_BTNH * cos.astype(x_BTNH.dtype) + rotated * sin.astype(x_BTNH.dtype))


def split_heads(proj: Linear, x_BTD: jax.Array, heads: int, head_dim: int) -> jax.Array:
    """``proj(x)`` as ``[B, T, heads, head_dim]``."""
    b, t, _ = x_BTD.shape
    return constrain(proj(x_BTD).reshape(b, t, heads, head_dim), "heads")


@dataclasses.dataclass
class Context:
    """What every mixer of one forward pass may read; derived tensors are computed once, when
    first asked for (the visibility mask, RoPE tables per rotary width, window masks).

    ``lengths_B`` / ``max_len``: the cache's committed lengths and slots (None: no cache, the
    block attends to itself under ``block_mask``). ``segment_ids``: packed training rows (causal
    within each document, no cache or an empty one of T slots). ``valid_B``: real tokens per row
    of a right-padded block (prefill), after which the caller keeps exactly ``valid_B``.
    """

    positions_BT: jax.Array
    block_mask: jax.Array  # [T, T] or [B, T, T] over the new tokens
    rope: RopeConfig
    impl: str  # attention_impl (dflash.kernels.dispatch)
    lengths_B: jax.Array | None = None
    max_len: int | None = None
    segment_ids: jax.Array | None = None
    stack_kv: bool = False  # no cache: attention layers hand back their block's K/V as their state
    # [B]: how many of the block's tokens are real per row (right padding past them); None: all T.
    # A recurrent state holds still past them, so a prefill of padded prompts needs no per-position
    # trail (docs/design.md §3); slot-per-token states ignore it (keep hides the padding).
    valid_B: jax.Array | None = None
    # Keys and values an attention layer hands to later layers of this pass under a name
    # (``kv_store`` / ``kv_reuse``, Gemma 4's KV sharing): ``(k, v, k_new, v_new, cached)``.
    shared_kv: dict[str, Any] = dataclasses.field(default_factory=dict)
    _memo: dict[Any, jax.Array] = dataclasses.field(default_factory=dict)

    def _once(self, key: Any, make: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def batch(self) -> int:
        return self.positions_BT.shape[0]

    @property
    def slots_BT(self) -> jax.Array:
        """Cache slots of the new tokens."""
        return self._once("slots", lambda: block_slots(self.lengths_B, self.positions_BT.shape[1]))

    def rope_tables(self, dim: int, rope: RopeConfig | None = None) -> tuple[jax.Array, jax.Array]:
        """RoPE tables over ``dim`` channels: the model's RoPE, or a layer's own ``rope``."""
        rope = self.rope if rope is None else rope
        return self._once(("rope", dim, rope), lambda: rope_tables(rope, dim, self.positions_BT))

    def visible(self) -> jax.Array:
        """``[B, T, S]`` (``S = T`` without a cache): which keys each new token sees."""
        def make():
            if self.lengths_B is None:
                t = self.positions_BT.shape[1]
                return jnp.broadcast_to(self.block_mask, (self.batch, t, t))
            return visibility(self.lengths_B, self.max_len, self.block_mask)
        return self._once("visible", make)

    def key_positions(self) -> jax.Array:
        """``[B, S]``: the position of every key the new tokens may see."""
        def make():
            if self.lengths_B is None:
                return self.positions_BT
            return key_positions(self.lengths_B, self.max_len, self.positions_BT)
        return self._once("key_positions", make)

    def windowed(self, window: int) -> jax.Array:
        """``visible()`` limited to keys inside a sliding window of ``window`` positions."""
        return self._once(("window", window), lambda: self.visible() & window_mask(
            self.positions_BT, self.key_positions(), window))
