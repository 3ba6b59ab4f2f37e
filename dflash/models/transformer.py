"""The one decoder implementation: every family differs only by its config (``ModelConfig``).

Forward: ``(tokens [B,T], positions [B,T], cache) -> (logits, hidden states, new cache)``.
Each layer is ``DecoderLayer``: pre-norm -> mixer -> residual -> pre-norm -> MLP -> residual,
with the mixer and the MLP of the kinds its ``LayerSpec`` names (``dflash.models.kinds``). The
same body serves the DFlash drafter and Orthrus, which pass in a mixer of their own.
Shape letters: B batch, T new tokens, S cache slots, D model width, N query heads,
K kv heads, G = N / K, H head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.attention import causal_mask
from dflash.config import FAMILIES, LayerSpec, ModelConfig
from dflash.kernels import dispatch

# The built-in kinds register themselves on import: every model below can use them.
from dflash.models import attention_mixer, dense_mlp, gdn_mixer, kinds, moe_mlp  # noqa: F401
from dflash.models.cache import Cache

# Re-exported: the pieces other modules build on.
from dflash.models.layers import (  # noqa: F401, E402
    Context,
    Linear,
    RMSNorm,
    apply_rope,
    model_norm,
    normal,
    rope_cos_sin,
    split_heads,
)
from dflash.sharding import constrain, register_rules

register_rules((  # the Gemma body's own parameters (per-layer inputs, layer scalar)
    (r"(^|\.)embed_tokens_per_layer$", ("vocab", None)),
    (r"(^|\.)per_layer_model_projection\.kernel$", ("embed", None)),
    (r"(^|\.)per_layer_input_gate\.kernel$", ("embed", None)),
    (r"(^|\.)per_layer_projection\.kernel$", (None, "embed")),
    (r"(^|\.)layer_scalar$", (None,)),
))

INPUT_EMBEDDINGS = -1
"""A ``hidden_layers`` entry: the embedding output (HF ``hidden_states[0]``), what a drafter that
pairs a position's hidden state with the NEXT token's embedding (MTP) reads at commit."""
FINAL_NORMED = -2
"""A ``hidden_layers`` entry: the final-normed last hidden state, what the LM head reads (MTP heads)."""


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] (float32)
    hidden: jax.Array | None  # [n_requested, B, T, D], outputs of the requested layers
    cache: Cache | None  # lengths advanced by T
    final: jax.Array | None = None  # [B, T, D] final-normed last hidden state (``final_hidden=True``)
    kv: tuple[jax.Array, jax.Array] | None = None  # ([L, B, T, K, H] keys, values) with ``stack_kv``


Mix = Callable[[jax.Array], tuple[jax.Array, Any]]


class DecoderLayer(nnx.Module):
    """Pre-norm residual layer: ``x + mix(norm(x))``, then ``x + mlp(norm(x))``.

    The Gemma body (``Family.gemma``) norms each branch's output too (HF names:
    ``post_attention_layernorm`` after the mixer, ``pre_`` / ``post_feedforward_layernorm`` around
    the MLP), then, with per-layer inputs, adds ``norm(proj(gelu(gate(x)) * per_layer_input))``,
    and scales the layer's output by ``layer_scalar``.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        mixer, mlp = kinds.mixer_kind(spec), kinds.mlp_kind(spec)
        d = cfg.hidden_size
        self.gemma = FAMILIES[cfg.model_type].gemma  # static
        self.input_layernorm = model_norm(cfg, d, dtype)
        self.mixer_attr = mixer.attr  # static: where the mixer lives (HF's name: ``self_attn``)
        setattr(self, mixer.attr, mixer.module(cfg, spec, dtype=dtype, rngs=rngs))
        self.post_attention_layernorm = model_norm(cfg, d, dtype)
        self.mlp = mlp.module(cfg, spec, dtype=dtype, rngs=rngs)
        gemma = self.gemma
        self.pre_feedforward_layernorm = model_norm(cfg, d, dtype) if gemma else None
        self.post_feedforward_layernorm = model_norm(cfg, d, dtype) if gemma else None
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype)) if gemma else None
        p = cfg.per_layer_input_size if gemma else 0
        self.per_layer_input_gate = Linear(d, p, bias=False, dtype=dtype, rngs=rngs) if p else None
        self.per_layer_projection = Linear(p, d, bias=False, dtype=dtype, rngs=rngs) if p else None
        self.post_per_layer_input_norm = model_norm(cfg, d, dtype) if p else None

    @property
    def mixer(self) -> nnx.Module:
        return getattr(self, self.mixer_attr)

    def __call__(self, x: jax.Array, mix: Mix,
                 per_layer_input: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """``mix(normed x) -> (out, aux)`` is the layer's own mixer or a caller's (a drafter's
        attention); the MLP and the norms are the layer's. Any rank ``[B, ..., D]``;
        ``per_layer_input`` ``[B, ..., P]``: this layer's slice of the per-layer inputs."""
        x = constrain(x, "hidden")  # layer boundary: batch over data x fsdp x expert
        out, aux = mix(self.input_layernorm(x))
        if not self.gemma:
            x = x + out
            return x + self.mlp(self.post_attention_layernorm(x)), aux
        x = x + self.post_attention_layernorm(out)
        normed = self.pre_feedforward_layernorm(x)
        mlp_out = self.mlp(normed, x) if getattr(self.mlp, "takes_residual", False) else self.mlp(normed)
        x = x + self.post_feedforward_layernorm(mlp_out)
        if self.per_layer_input_gate is not None:
            gated = jax.nn.gelu(self.per_layer_input_gate(x), approximate=True) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar[...], aux


def pass_context(cfg: ModelConfig, impl: str, positions_BT: jax.Array, cache: Cache | None = None, *,
                 block_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 stack_kv: bool = False, valid_B: jax.Array | None = None) -> Context:
    """The ``Context`` of one pass of ``cfg``'s layers (the target's, or a head built from its specs)."""
    t = positions_BT.shape[1]
    return Context(positions_BT, causal_mask(t) if block_mask is None else block_mask, cfg.rope, impl,
                   lengths_B=None if cache is None else cache.lengths,
                   max_len=None if cache is None else cache.max_len, segment_ids=segment_ids,
                   stack_kv=stack_kv, valid_B=valid_B)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """Gemma's final-logit soft-cap ``c * tanh(logits / c)`` (``cap`` 0: unchanged). The one place it
    is written: ``Transformer.unembed`` and the chunked loss head (``dflash.drafters.loss_head``)
    both apply it, so the drafter trains on the distribution the target emits."""
    return jnp.tanh(logits / cap) * cap if cap else logits


def embed_scale(cfg: ModelConfig) -> float:
    """What the word embeddings are multiplied by: ``sqrt(D)`` for Gemma (in the weights' dtype, as
    transformers rounds it), 0.0 (not scaled) otherwise."""
    return cfg.hidden_size ** 0.5 if FAMILIES[cfg.model_type].gemma else 0.0


class Transformer(nnx.Module):
    """Decoder-only target LM. Holds parameters only; the cache goes in and comes out."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = kinds.check(cfg)
        self.dtype = dtype
        # auto | pallas | reference (dflash.kernels.dispatch): a static attribute, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        self.embed_tokens = normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.embed_scale = embed_scale(cfg)
        ple, n = cfg.per_layer_input_size, cfg.num_layers
        per_layer_shape = (cfg.per_layer_vocab_size, n * ple)
        self.embed_tokens_per_layer = normal(rngs, per_layer_shape, dtype) if ple else None
        self.per_layer_model_projection = Linear(cfg.hidden_size, n * ple, bias=False, dtype=dtype,
                                                 rngs=rngs) if ple else None
        self.per_layer_projection_norm = model_norm(cfg, ple, dtype) if ple else None
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype=dtype, rngs=rngs) for spec in cfg.layers])
        for layer in self.layers:  # an MLP with a kernel choice (moe: its grouped matmul) follows this one
            if hasattr(layer.mlp, "impl"):
                layer.mlp.impl = self.attention_impl
        self.norm = model_norm(cfg, cfg.hidden_size, dtype)
        untied = not cfg.tie_word_embeddings
        self.lm_head = normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype) if untied else None

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.embed_tokens[...], tokens_BT, axis=0)
        if self.embed_scale:
            x_BTD = x_BTD * jnp.asarray(self.embed_scale, x_BTD.dtype)
        return constrain(x_BTD, "hidden")

    def per_layer_inputs(self, tokens_BT: jax.Array, x_BTD: jax.Array) -> jax.Array:
        """Gemma 4's per-layer inputs ``[B, T, L, P]``: the token's per-layer embedding (times
        ``sqrt(P)``) plus the normed projection of its word embedding ``x`` (times ``1/sqrt(D)``),
        times ``1/sqrt(2)``, in the weights' dtype as transformers computes them."""
        b, t = tokens_BT.shape
        n, p = self.cfg.num_layers, self.cfg.per_layer_input_size
        table = self.embed_tokens_per_layer[...]
        tok_BTLP = jnp.take(table, tokens_BT, axis=0) * jnp.asarray(p ** 0.5, table.dtype)
        tok_BTLP = tok_BTLP.reshape(b, t, n, p)
        proj_BTLP = (self.per_layer_model_projection(x_BTD) * jnp.asarray(self.cfg.hidden_size ** -0.5,
                                                                          x_BTD.dtype)).reshape(b, t, n, p)
        return (self.per_layer_projection_norm(proj_BTLP) + tok_BTLP) * jnp.asarray(2 ** -0.5, x_BTD.dtype)

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Final norm + LM head, float32 logits ``[B, T, V]``."""
        return self.unembed(self.norm(h_BTD))

    def head_weight(self) -> jax.Array:
        """The LM head as ``[D, V]`` (the embedding, transposed, when tied): for loss heads that
        apply it to row chunks (``dflash.drafters.loss_head``) instead of all rows at once."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def unembed(self, x_BTD: jax.Array) -> jax.Array:
        """The LM head alone (drafters apply their own final norm first)."""
        if self.lm_head is None:
            logits = jnp.einsum("...D,VD->...V", x_BTD, self.embed_tokens[...],
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...D,DV->...V", x_BTD, self.lm_head[...], preferred_element_type=jnp.float32)
        return constrain(softcap(logits, self.cfg.final_logit_softcapping), "vocab")

    def context(self, positions_BT: jax.Array, cache: Cache | None = None, *,
                block_mask: jax.Array | None = None,
                segment_ids: jax.Array | None = None, stack_kv: bool = False,
                valid_B: jax.Array | None = None) -> Context:
        """What the layers of one pass over the tokens at ``positions_BT`` read (``layers.Context``)."""
        return pass_context(self.cfg, self.attention_impl, positions_BT, cache, block_mask=block_mask,
                            segment_ids=segment_ids, stack_kv=stack_kv, valid_B=valid_B)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        cache: Cache | None = None,
        *,
        block_mask: jax.Array | None = None,
        hidden_layers: tuple[int, ...] = (),
        compute_logits: bool = True,
        final_hidden: bool = False,
        segment_ids: jax.Array | None = None,
        stack_kv: bool = False,
        valid_B: jax.Array | None = None,
    ) -> ForwardOutput:
        """Runs the decoder over a block of ``T`` new tokens.

        With a cache, every layer writes the block into its state (attention: K/V at slots
        ``[len, len+T)``), queries see the committed prefix plus the block under ``block_mask``
        (``[T,T]`` or ``[B,T,T]``, default causal), and the returned cache has ``lengths + T``:
        keep part of the block with ``cache.keep``. Without a cache, attention is over the block
        alone. ``final_hidden``: also return the final-normed last hidden state (``logits``
        without the LM head), so a chunked loss head never holds ``[B, T, V]`` logits.
        ``segment_ids`` ``[B, T]`` (packed training rows, instead of ``block_mask``): causal
        attention within each document through ``dispatch.prefill_attention``, never a
        ``[T, T]`` mask (memory O(T * chunk)); a cache, if any, must be empty with T slots.
        ``stack_kv`` (no cache; attention layers of one shape): also return every layer's keys and
        values of the block, each written in place into one ``[L, B, T, K, H]`` buffer (what
        Orthrus's training reads; 5% less memory per chip at the Qwen3-8B preset than per-layer
        caches stacked afterwards). ``valid_B`` ``[B]`` (a right-padded block, with a cache): the
        real tokens per row; the caller keeps exactly these afterwards (``cache.keep(valid_B, T)``),
        so a recurrent state may stop at them instead of holding a state per position.
        ``hidden_layers``: layer indices, or the sentinels ``INPUT_EMBEDDINGS`` / ``FINAL_NORMED``.
        """
        t = tokens_BT.shape[1]
        if segment_ids is not None and (block_mask is not None or (cache is not None and cache.max_len != t)):
            raise ValueError("segment_ids replaces block_mask, and needs no cache or an empty one of T slots")
        if stack_kv and cache is not None:
            raise ValueError("stack_kv hands back the block's keys and values in place of a cache")
        ctx = self.context(positions_BT, cache, block_mask=block_mask, segment_ids=segment_ids,
                           stack_kv=stack_kv, valid_B=valid_B)
        if stack_kv:
            shape = (self.cfg.num_layers, tokens_BT.shape[0], t, self.cfg.num_kv_heads, self.cfg.head_dim)
            k_all, v_all = (constrain(jnp.zeros(shape, self.dtype), "kv_stack") for _ in "kv")
        want = {layer: i for i, layer in enumerate(hidden_layers)}
        hidden: list[jax.Array | None] = [None] * len(hidden_layers)
        states: list[Any] = []
        x_BTD = self.embed(tokens_BT)
        if INPUT_EMBEDDINGS in want:
            hidden[want[INPUT_EMBEDDINGS]] = x_BTD
        per_layer_BTLP = (self.per_layer_inputs(tokens_BT, x_BTD) if self.embed_tokens_per_layer is not None
                          else None)
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            x_BTD, state = layer(x_BTD, lambda h, layer=layer, state=state: layer.mixer(h, ctx=ctx,
                                                                                        state=state),
                                 None if per_layer_BTLP is None else per_layer_BTLP[:, :, i])
            if stack_kv and state is not None:  # in place: one buffer for all layers
                k_all = k_all.at[i].set(state.k.astype(k_all.dtype))
                v_all = v_all.at[i].set(state.v.astype(v_all.dtype))
                state = None
            states.append(state)
            if i in want:
                hidden[want[i]] = x_BTD
        new_cache = None
        if cache is not None:
            new_cache = Cache(layers=tuple(states), lengths=cache.lengths + t, max_len=cache.max_len)
        final = self.norm(x_BTD) if compute_logits or final_hidden or FINAL_NORMED in want else None
        if FINAL_NORMED in want:
            hidden[want[FINAL_NORMED]] = final
        logits = self.unembed(final) if compute_logits else None
        hidden_arr = jnp.stack(hidden) if hidden_layers else None
        kv = (k_all, v_all) if stack_kv else None
        return ForwardOutput(logits, hidden_arr, new_cache, final if final_hidden else None, kv)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
        """An empty cache for this model (each layer's state as its kind makes it)."""
        return kinds.init_cache(self.cfg, batch, max_len, self.dtype if dtype is None else dtype)


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
