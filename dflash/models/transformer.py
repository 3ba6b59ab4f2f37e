"""The one decoder implementation: Qwen3, Qwen2/2.5 and Llama-3.x differ only by config.

Forward: ``(tokens [B,T], positions [B,T], cache) -> (logits, hidden states, new cache)``.
Shape letters: B batch, T new tokens, S cache slots, D model width, N query heads,
K kv heads, G = N / K, H head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash import cache as kvc
from dflash.attention import attend
from dflash.config import ModelConfig, llama3_inv_freq_scale
from dflash.kernels import dispatch
from dflash.sharding import constrain


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] (float32)
    hidden: jax.Array | None  # [n_requested, B, T, D], outputs of the requested layers
    cache: kvc.KVCache | None  # lengths advanced by T
    final: jax.Array | None = None  # [B, T, D] final-normed last hidden state (``final_hidden=True``)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``, kernel stored ``[in, out]`` (HF stores ``[out, in]``)."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = _normal(rngs, (din, dout), dtype)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` (float32, llama3 scaling applied when configured)."""
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope.theta) ** exponent)).astype(np.float32)
    if cfg.rope.rope_type == "llama3":
        inv = llama3_inv_freq_scale(cfg.rope, inv).astype(np.float32)
    return inv


def rope_cos_sin(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, H]`` in float32 (HF "rotate_half" layout: halves repeated)."""
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x_BTNH * cos.astype(x_BTNH.dtype) + rotated * sin.astype(x_BTNH.dtype))


def split_heads(proj: Linear, x_BTD: jax.Array, heads: int, head_dim: int) -> jax.Array:
    """``proj(x)`` as ``[B, T, heads, head_dim]``."""
    b, t, _ = x_BTD.shape
    return constrain(proj(x_BTD).reshape(b, t, heads, head_dim), ("batch", ..., "heads", None))


def rotated_heads(proj: Linear, norm: RMSNorm | None, x_BTD: jax.Array, heads: int, head_dim: int,
                  cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Queries or keys: projection, per-head RMSNorm (Qwen3's q/k norm, when present), RoPE."""
    y_BTNH = split_heads(proj, x_BTD, heads, head_dim)
    return apply_rope(norm(y_BTNH) if norm is not None else y_BTNH, cos, sin)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(d, q, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kv, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kv, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(q, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def q(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Projected, normed and rotated queries ``[B,T,N,H]``."""
        return rotated_heads(self.q_proj, self.q_norm, x_BTD, self.num_heads, self.head_dim, cos, sin)

    def kv(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projected, normed and rotated keys and values ``[B,T,K,H]``."""
        return (rotated_heads(self.k_proj, self.k_norm, x_BTD, self.num_kv_heads, self.head_dim, cos, sin),
                split_heads(self.v_proj, x_BTD, self.num_kv_heads, self.head_dim))

    def qkv(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array):
        return (self.q(x_BTD, cos, sin), *self.kv(x_BTD, cos, sin))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gated_BTF = constrain(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD), ("batch", ..., "mlp"))
        return self.down_proj(gated_BTF)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)


class Transformer(nnx.Module):
    """Decoder-only target LM. Holds parameters only; the cache goes in and comes out."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        # auto | pallas | reference (dflash.kernels.dispatch): a static attribute, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        self.embed_tokens = _normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        untied = not cfg.tie_word_embeddings
        self.lm_head = _normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype) if untied else None

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.embed_tokens[...], tokens_BT, axis=0), ("batch", ..., None))

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Final norm + LM head, float32 logits ``[B, T, V]``."""
        return self.unembed(self.norm(h_BTD))

    def head_weight(self) -> jax.Array:
        """The LM head as ``[D, V]`` (the embedding, transposed, when tied): for loss heads that
        apply it to row chunks (``dflash.training.loss_head``) instead of all rows at once."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def unembed(self, x_BTD: jax.Array) -> jax.Array:
        """The LM head alone (drafters apply their own final norm first)."""
        if self.lm_head is None:
            logits = jnp.einsum("...D,VD->...V", x_BTD, self.embed_tokens[...],
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...D,DV->...V", x_BTD, self.lm_head[...], preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", ..., "vocab"))

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        cache: kvc.KVCache | None = None,
        *,
        block_mask: jax.Array | None = None,
        hidden_layers: tuple[int, ...] = (),
        compute_logits: bool = True,
        final_hidden: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> ForwardOutput:
        """Runs the decoder over a block of ``T`` new tokens.

        With a cache, the block's K/V are written at slots ``[len, len+T)``, queries see the
        committed prefix plus the block under ``block_mask`` (``[T,T]`` or ``[B,T,T]``,
        default causal), and the returned cache has ``lengths + T``: roll back with
        ``cache.with_lengths``. Without a cache, attention is over the block alone.
        ``final_hidden``: also return the final-normed last hidden state (``logits`` without the
        LM head), so a chunked loss head never holds ``[B, T, V]`` logits.
        ``segment_ids`` ``[B, T]`` (packed training rows, instead of ``block_mask``): causal
        attention within each document through ``dispatch.prefill_attention``, never a
        ``[T, T]`` mask (memory O(T * chunk)); a cache, if any, must be empty with T slots.
        """
        b, t = tokens_BT.shape
        if segment_ids is not None and (block_mask is not None or (cache is not None and cache.max_len != t)):
            raise ValueError("segment_ids replaces block_mask, and needs no cache or an empty one of T slots")
        if block_mask is None:
            block_mask = kvc.causal_mask(t)
        cos, sin = rope_cos_sin(self.cfg, positions_BT)
        if cache is not None:
            slots_BT = kvc.block_slots(cache.lengths, t)
            mask_BTS = kvc.visibility(cache.lengths, cache.max_len, block_mask)
            k_all, v_all = cache.k, cache.v
        elif segment_ids is None:
            mask_BTS = jnp.broadcast_to(block_mask, (b, t, t))
        want = {layer: i for i, layer in enumerate(hidden_layers)}
        hidden: list[jax.Array | None] = [None] * len(hidden_layers)
        x_BTD = self.embed(tokens_BT)
        for i, layer in enumerate(self.layers):
            x_BTD = constrain(x_BTD, ("batch", ..., None))  # layer boundary: batch over data x fsdp
            h = layer.input_layernorm(x_BTD)
            q, k, v = layer.self_attn.qkv(h, cos, sin)
            k_new, v_new = k, v
            if cache is not None:
                k_all = kvc.write_layer(k_all, i, k, slots_BT)
                v_all = kvc.write_layer(v_all, i, v, slots_BT)
                k, v = k_all[i], v_all[i]
            if segment_ids is not None:
                attn_BTD = dispatch.prefill_attention(q, k_new, v_new, segment_ids,
                                                      impl=self.attention_impl).reshape(b, t, -1)
            elif dispatch.use_verify_kernel(self.attention_impl, q, k):
                lengths_B = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
                attn_BTD = dispatch.verify_attention(q, k, v, lengths_B, block_mask).reshape(b, t, -1)
            else:
                attn_BTD = attend(q, k, v, mask_BTS)
            x_BTD = x_BTD + layer.self_attn.o_proj(attn_BTD)
            x_BTD = x_BTD + layer.mlp(layer.post_attention_layernorm(x_BTD))
            if i in want:
                hidden[want[i]] = x_BTD
        new_cache = None
        if cache is not None:
            new_cache = kvc.KVCache(k=k_all, v=v_all, lengths=cache.lengths + t)
        final = self.norm(x_BTD) if compute_logits or final_hidden else None
        logits = self.unembed(final) if compute_logits else None
        hidden_arr = jnp.stack(hidden) if hidden_layers else None
        return ForwardOutput(logits, hidden_arr, new_cache, final if final_hidden else None)


def build(cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0,
          attention_impl: str = "auto") -> Transformer:
    """A randomly initialised target (std 0.02 normal, unit norms)."""
    return Transformer(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
             attention_impl: str = "auto") -> Transformer:
    """The model's structure with ``ShapeDtypeStruct`` leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, attention_impl=attention_impl,
                                              rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
