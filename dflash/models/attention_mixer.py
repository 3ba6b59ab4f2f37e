"""The attention mixer kind: grouped-query attention over a KV cache, with its options.

Options (``LayerSpec.mixer_options``; defaults below): ``qk_norm`` (Qwen3's per-head RMSNorm of
queries and keys before RoPE), ``qkv_bias`` / ``o_bias`` (projection biases), ``window`` (a
sliding window of that many positions; 0: full attention), ``sinks`` (one learned logit per query
head that takes softmax mass, gpt-oss), ``output_gate`` (``q_proj`` also emits a per-channel gate;
the output is multiplied by its sigmoid, Qwen3-Next), ``rotary_dim`` (RoPE on the first that many
channels of each head; 0: all). Every form reaches the Pallas kernels (dflash.kernels.dispatch):
the verify kernel (blocks of <= 128 tokens over the cache) and the prefill kernel / its chunked
jnp form (packed rows) take the window and the sinks as options; the gate, the norms and partial
RoPE live outside the attention itself. Packed rows window by row distance inside a document
(positions there are consecutive, dflash.training.packing).

Shape letters: B batch, T new tokens, S keys / cache slots, D width, N query heads, K kv heads,
H head dim, X = N * H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.attention import attend
from dflash.config import LayerSpec, ModelConfig
from dflash.kernels import dispatch
from dflash.models.cache import KVState
from dflash.models.kinds import MixerKind, WeightRow, option, register_mixer
from dflash.models.layers import Context, Linear, apply_rope, model_norm, split_heads
from dflash.sharding import constrain

OPTIONS = {"qk_norm": False, "qkv_bias": False, "o_bias": False, "window": 0, "sinks": False,
           "output_gate": False, "rotary_dim": 0}


def first_non_plain_layer(cfg: ModelConfig) -> str | None:
    """The first layer that is not full attention without sinks, described, or None: the drafters'
    block attention (DFlash's layers, Orthrus's view of the target) serves only that form."""
    for i, spec in enumerate(cfg.layers):
        if spec.mixer != "attention" or option(spec, "window") or option(spec, "sinks"):
            return f"layer {i} is {spec.mixer} {dict(spec.mixer_options)}"
    return None


class AttentionProjections(nnx.Module):
    """The parameters of one attention and the projections built from them.

    ``suffix`` names a second attention beside a layer's own (Orthrus: ``q_proj_diff`` ...), which
    shares every projection's code with it.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 suffix: str = ""):
        opt = lambda name: option(spec, name)  # noqa: E731
        d, x, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.suffix = suffix
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.gated, self.window = bool(opt("output_gate")), int(opt("window"))
        self.rotary_dim = int(opt("rotary_dim")) or cfg.head_dim
        bias = bool(opt("qkv_bias"))
        setattr(self, f"q_proj{suffix}", Linear(d, x * (2 if self.gated else 1), bias=bias, dtype=dtype,
                                                rngs=rngs))
        setattr(self, f"k_proj{suffix}", Linear(d, kv, bias=bias, dtype=dtype, rngs=rngs))
        setattr(self, f"v_proj{suffix}", Linear(d, kv, bias=bias, dtype=dtype, rngs=rngs))
        setattr(self, f"o_proj{suffix}", Linear(x, d, bias=bool(opt("o_bias")), dtype=dtype, rngs=rngs))
        norm = bool(opt("qk_norm"))
        setattr(self, f"q_norm{suffix}", model_norm(cfg, cfg.head_dim, dtype) if norm else None)
        setattr(self, f"k_norm{suffix}", model_norm(cfg, cfg.head_dim, dtype) if norm else None)
        sinks = nnx.Param(jnp.zeros((cfg.num_heads,), dtype)) if opt("sinks") else None
        setattr(self, f"sinks{suffix}", sinks)

    def _part(self, name: str):
        return getattr(self, name + self.suffix)

    def queries(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Normed, rotated queries ``[B, T, N, H]`` and the output gate's logits ``[B, T, X]`` (or None)."""
        b, t, _ = x_BTD.shape
        n, h = self.num_heads, self.head_dim
        if self.gated:  # per head: H query channels, then H gate channels
            y_BTN2H = self._part("q_proj")(x_BTD).reshape(b, t, n, 2 * h)
            q_BTNH, gate = constrain(y_BTN2H[..., :h], "heads"), y_BTN2H[..., h:].reshape(b, t, n * h)
        else:
            q_BTNH, gate = split_heads(self._part("q_proj"), x_BTD, n, h), None
        norm = self._part("q_norm")
        return apply_rope(norm(q_BTNH) if norm is not None else q_BTNH, cos, sin), gate

    def q(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Projected, normed and rotated queries ``[B, T, N, H]``."""
        return self.queries(x_BTD, cos, sin)[0]

    def kv(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projected, normed and rotated keys and values ``[B, T, K, H]``."""
        k_BTKH = split_heads(self._part("k_proj"), x_BTD, self.num_kv_heads, self.head_dim)
        norm = self._part("k_norm")
        return (apply_rope(norm(k_BTKH) if norm is not None else k_BTKH, cos, sin),
                split_heads(self._part("v_proj"), x_BTD, self.num_kv_heads, self.head_dim))

    def output(self, attn_BTX: jax.Array, gate_BTX: jax.Array | None = None) -> jax.Array:
        """``o_proj`` of the attention output (times the sigmoid of the gate, when gated)."""
        if gate_BTX is not None:
            attn_BTX = attn_BTX * jax.nn.sigmoid(gate_BTX)
        return self._part("o_proj")(attn_BTX)

    def sink_logits(self) -> jax.Array | None:
        sinks = self._part("sinks")
        return None if sinks is None else sinks[...]


class Attention(AttentionProjections):
    """A target layer's attention: writes the block's keys and values into its ``KVState``."""

    def __call__(self, x_BTD: jax.Array, *, ctx: Context,
                 state: KVState | None) -> tuple[jax.Array, KVState | None]:
        b, t, _ = x_BTD.shape
        cos, sin = ctx.rope_tables(self.rotary_dim)
        q, gate = self.queries(x_BTD, cos, sin)
        k_new, v_new = self.kv(x_BTD, cos, sin)
        k, v = k_new, v_new
        if state is None and ctx.stack_kv:  # handed back for the caller to stack (Transformer: stack_kv)
            state = KVState(k=k_new, v=v_new)
        elif state is not None:
            state = state.write(k_new, v_new, ctx.slots_BT)
            k, v = state.k, state.v
        sinks_N = self.sink_logits()
        if ctx.segment_ids is not None:  # packed rows: memory O(T * chunk)
            attn_BTX = dispatch.prefill_attention(q, k_new, v_new, ctx.segment_ids, sinks_N,
                                                  window=self.window, impl=ctx.impl).reshape(b, t, -1)
        elif dispatch.use_verify_kernel(ctx.impl, q, k, window=self.window, sinks=sinks_N is not None):
            lengths_B = ctx.lengths_B if state is not None else jnp.zeros((b,), jnp.int32)
            attn_BTX = dispatch.verify_attention(q, k, v, lengths_B, ctx.block_mask, sinks_N,
                                                 ctx.positions_BT, window=self.window).reshape(b, t, -1)
        else:
            attn_BTX = attend(q, k, v, ctx.windowed(self.window) if self.window else ctx.visible(), sinks_N)
        return self.output(attn_BTX, gate), state


def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    rows = [WeightRow(f"{p}_proj.weight", f"{p}_proj.kernel", transpose=True) for p in "qkvo"]
    if option(spec, "qkv_bias"):
        rows += [WeightRow(f"{p}_proj.bias", f"{p}_proj.bias") for p in "qkv"]
    if option(spec, "o_bias"):
        rows.append(WeightRow("o_proj.bias", "o_proj.bias"))
    if option(spec, "qk_norm"):
        rows += [WeightRow(f"{p}_norm.weight", f"{p}_norm.weight") for p in "qk"]
    if option(spec, "sinks"):
        rows.append(WeightRow("sinks", "sinks"))
    return tuple(rows)


def _flops(cfg: ModelConfig, spec: LayerSpec, rows: int, keys: float) -> float:
    """Projections (``2 * m * n * k`` each) plus ``QK^T`` and ``PV`` over the keys in the window."""
    d, x, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    window = option(spec, "window")
    seen = min(keys, window) if window else keys
    weights = d * x * (2 if option(spec, "output_gate") else 1) + 2 * d * kv + x * d
    return 2.0 * rows * weights + 4.0 * rows * seen * x


ATTENTION = register_mixer(MixerKind(
    name="attention", module=Attention, attr="self_attn", options=OPTIONS, weights=_weights,
    sharding=(
        (r"(^|\.)q_proj(_diff)?\.kernel$", ("embed", "heads")),
        (r"(^|\.)[kv]_proj(_diff)?\.kernel$", ("embed", "kv_heads")),
        (r"(^|\.)q_proj(_diff)?\.bias$", ("heads",)),
        (r"(^|\.)[kv]_proj(_diff)?\.bias$", ("kv_heads",)),
        (r"(^|\.)o_proj(_diff)?\.kernel$", ("heads", "embed")),
        (r"(^|\.)o_proj(_diff)?\.bias$", (None,)),
        (r"(^|\.)sinks(_diff)?$", ("heads",)),
    ),
    flops=_flops,
    state=lambda cfg, spec, batch, max_len, dtype: KVState.zeros(
        batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype),
))
