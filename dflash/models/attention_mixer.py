"""The attention mixer kind: grouped-query attention over a KV cache, with its options.

Options (``LayerSpec.mixer_options``; defaults below): ``qk_norm`` (Qwen3's per-head RMSNorm of
queries and keys before RoPE), ``qkv_bias`` / ``o_bias`` (projection biases), ``window`` (a
sliding window of that many positions; 0: full attention), ``sinks`` (one learned logit per query
head that takes softmax mass, gpt-oss), ``output_gate`` (``q_proj`` also emits a per-channel gate;
the output is multiplied by its sigmoid, Qwen3-Next), ``rotary_dim`` (RoPE on the first that many
channels of each head; 0: all). Gemma 4: ``v_norm`` (an RMSNorm without weight on the values),
``scale`` (the softmax scale; 0: ``1/sqrt(H)``), ``head_dim`` / ``kv_heads`` (this layer's head
shape; 0: the config's), ``k_eq_v`` (no ``v_proj``: the values are the keys' projection, before
the key norm and RoPE), ``rope_theta`` / ``rope_proportion`` (this layer's own RoPE: that theta,
and proportional over the whole head when the proportion is set; 0: the model's RoPE),
``kv_store`` / ``kv_reuse`` (KV sharing: a layer with ``kv_store=NAME`` hands the keys and values it
attends over to the later layers of the pass with ``kv_reuse=NAME``, which have no key or value
projections and keep no cache state: they read the storing layer's).
Every form reaches the Pallas kernels (dflash.kernels.dispatch):
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
from dflash.config import LayerSpec, ModelConfig, RopeConfig
from dflash.kernels import dispatch
from dflash.models.cache import KVState
from dflash.models.kinds import MixerKind, WeightRow, option, register_mixer
from dflash.models.layers import Context, Linear, apply_rope, model_norm, split_heads
from dflash.sharding import constrain

OPTIONS = {"qk_norm": False, "qkv_bias": False, "o_bias": False, "window": 0, "sinks": False,
           "output_gate": False, "rotary_dim": 0, "v_norm": False, "scale": 0.0, "head_dim": 0, "kv_heads": 0,
           "k_eq_v": False, "rope_theta": 0.0, "rope_proportion": 0.0, "kv_store": "", "kv_reuse": ""}
PLAIN = ("v_norm", "scale", "head_dim", "kv_heads", "k_eq_v", "rope_theta", "rope_proportion", "kv_store",
         "kv_reuse")  # options the drafters' block attention does not serve


def head_shape(cfg: ModelConfig, spec: LayerSpec) -> tuple[int, int]:
    """This layer's kv heads and head dim (its options, else the config's)."""
    return option(spec, "kv_heads") or cfg.num_kv_heads, option(spec, "head_dim") or cfg.head_dim


def layer_rope(cfg: ModelConfig, spec: LayerSpec) -> RopeConfig | None:
    """The layer's own RoPE (``rope_theta`` / ``rope_proportion``), or None: the model's."""
    theta, proportion = option(spec, "rope_theta"), option(spec, "rope_proportion")
    if not theta and not proportion:
        return None
    if proportion:
        return RopeConfig(theta=theta or cfg.rope.theta, rope_type="proportional", proportion=proportion)
    return RopeConfig(theta=theta)


def first_non_plain_layer(cfg: ModelConfig) -> str | None:
    """The first layer that is not full attention without sinks, described, or None: the drafters'
    block attention (DFlash's layers, Orthrus's view of the target) serves only that form."""
    for i, spec in enumerate(cfg.layers):
        if (spec.mixer != "attention" or option(spec, "window") or option(spec, "sinks")
                or any(option(spec, name) for name in PLAIN)):
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
        kv_heads, head_dim = head_shape(cfg, spec)
        d, x, kv = cfg.hidden_size, cfg.num_heads * head_dim, kv_heads * head_dim
        self.suffix = suffix
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, kv_heads, head_dim
        self.gated, self.window = bool(opt("output_gate")), int(opt("window"))
        self.rotary_dim = int(opt("rotary_dim")) or head_dim
        self.rope = layer_rope(cfg, spec)
        # The softmax divides by sqrt(H); another scale multiplies the queries by its ratio to that.
        self.q_scale = float(opt("scale")) * head_dim ** 0.5 if opt("scale") else 1.0
        self.kv_store, self.kv_reuse = str(opt("kv_store")), str(opt("kv_reuse"))
        bias = bool(opt("qkv_bias"))
        own_kv = not self.kv_reuse
        setattr(self, f"q_proj{suffix}", Linear(d, x * (2 if self.gated else 1), bias=bias, dtype=dtype,
                                                rngs=rngs))
        setattr(self, f"k_proj{suffix}", Linear(d, kv, bias=bias, dtype=dtype, rngs=rngs) if own_kv else None)
        v_proj = own_kv and not opt("k_eq_v")
        setattr(self, f"v_proj{suffix}", Linear(d, kv, bias=bias, dtype=dtype, rngs=rngs) if v_proj else None)
        setattr(self, f"o_proj{suffix}", Linear(x, d, bias=bool(opt("o_bias")), dtype=dtype, rngs=rngs))
        norm = bool(opt("qk_norm"))
        setattr(self, f"q_norm{suffix}", model_norm(cfg, head_dim, dtype) if norm else None)
        setattr(self, f"k_norm{suffix}", model_norm(cfg, head_dim, dtype) if norm and own_kv else None)
        self.v_norm = model_norm(cfg, head_dim, dtype, with_scale=False) if opt("v_norm") else None
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
        q_BTNH = apply_rope(norm(q_BTNH) if norm is not None else q_BTNH, cos, sin)
        return (q_BTNH * jnp.asarray(self.q_scale, q_BTNH.dtype) if self.q_scale != 1.0 else q_BTNH), gate

    def q(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Projected, normed and rotated queries ``[B, T, N, H]``."""
        return self.queries(x_BTD, cos, sin)[0]

    def kv(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projected, normed and rotated keys and values ``[B, T, K, H]``."""
        k_BTKH = split_heads(self._part("k_proj"), x_BTD, self.num_kv_heads, self.head_dim)
        v_proj = self._part("v_proj")
        v_BTKH = k_BTKH if v_proj is None else split_heads(v_proj, x_BTD, self.num_kv_heads, self.head_dim)
        norm = self._part("k_norm")
        return (apply_rope(norm(k_BTKH) if norm is not None else k_BTKH, cos, sin),
                self.v_norm(v_BTKH) if self.v_norm is not None else v_BTKH)

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
        cos, sin = ctx.rope_tables(self.rotary_dim, self.rope)
        q, gate = self.queries(x_BTD, cos, sin)
        if self.kv_reuse:  # KV sharing: the storing layer's keys and values; nothing of our own
            if self.kv_reuse not in ctx.shared_kv:
                raise ValueError(f"attention kv_reuse={self.kv_reuse!r}: no earlier layer of this pass "
                                 "stored keys and values under that name (kv_store)")
            k, v, k_new, v_new, cached = ctx.shared_kv[self.kv_reuse]
            state = None
        else:
            k_new, v_new = self.kv(x_BTD, cos, sin)
            k, v = k_new, v_new
            if state is None and ctx.stack_kv:  # handed back for the caller to stack (Transformer: stack_kv)
                state = KVState(k=k_new, v=v_new)
            elif state is not None:
                state = state.write(k_new, v_new, ctx.slots_BT)
                k, v = state.k, state.v
            cached = state is not None and not ctx.stack_kv
            if self.kv_store:
                ctx.shared_kv[self.kv_store] = (k, v, k_new, v_new, cached)
        sinks_N = self.sink_logits()
        if ctx.segment_ids is not None:  # packed rows: memory O(T * chunk)
            attn_BTX = dispatch.prefill_attention(q, k_new, v_new, ctx.segment_ids, sinks_N,
                                                  window=self.window, impl=ctx.impl).reshape(b, t, -1)
        elif dispatch.use_verify_kernel(ctx.impl, q, k, window=self.window, sinks=sinks_N is not None):
            lengths_B = ctx.lengths_B if cached else jnp.zeros((b,), jnp.int32)
            attn_BTX = dispatch.verify_attention(q, k, v, lengths_B, ctx.block_mask, sinks_N,
                                                 ctx.positions_BT, window=self.window).reshape(b, t, -1)
        else:
            attn_BTX = attend(q, k, v, ctx.windowed(self.window) if self.window else ctx.visible(), sinks_N)
        return self.output(attn_BTX, gate), state


def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    projs = "q" + ("" if option(spec, "kv_reuse") else "k" if option(spec, "k_eq_v") else "kv")
    rows = [WeightRow(f"{p}_proj.weight", f"{p}_proj.kernel", transpose=True) for p in projs + "o"]
    if option(spec, "qkv_bias"):
        rows += [WeightRow(f"{p}_proj.bias", f"{p}_proj.bias") for p in projs]
    if option(spec, "o_bias"):
        rows.append(WeightRow("o_proj.bias", "o_proj.bias"))
    if option(spec, "qk_norm"):
        norms = "q" if option(spec, "kv_reuse") else "qk"
        rows += [WeightRow(f"{p}_norm.weight", f"{p}_norm.weight") for p in norms]
    if option(spec, "sinks"):
        rows.append(WeightRow("sinks", "sinks"))
    return tuple(rows)


def _flops(cfg: ModelConfig, spec: LayerSpec, rows: int, keys: float) -> float:
    """Projections (``2 * m * n * k`` each) plus ``QK^T`` and ``PV`` over the keys in the window."""
    kv_heads, head_dim = head_shape(cfg, spec)
    d, x, kv = cfg.hidden_size, cfg.num_heads * head_dim, kv_heads * head_dim
    window = option(spec, "window")
    seen = min(keys, window) if window else keys
    kv_projs = 0 if option(spec, "kv_reuse") else 1 if option(spec, "k_eq_v") else 2
    weights = d * x * (2 if option(spec, "output_gate") else 1) + kv_projs * d * kv + x * d
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
    # a kv_reuse layer keeps nothing: it reads the storing layer's state in each pass
    state=lambda cfg, spec, batch, max_len, dtype: None if option(spec, "kv_reuse") else KVState.zeros(
        batch, max_len, *head_shape(cfg, spec), dtype),
))
