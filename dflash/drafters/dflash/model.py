"""DFlash block-diffusion drafter (exact semantics: docs/design.md §5).

N Qwen3-style decoder layers and a final norm; no embedding or LM head of its own (the
target's frozen ones are used). Context = ``hidden_norm(fc(concat of target features))``,
applied once; every layer's keys/values are ``k_proj``/``v_proj`` of ``[context ; block]``
("KV injection") while queries come from the block only. Block = ``[anchor, MASK x (B-1)]``
at positions ``p .. p+B-1``, bidirectional inside, context strictly before ``p``; output row
``k`` predicts the token at ``p + k`` (same position, not shifted). A ``sliding_attention`` layer
(``drafter_layers``) is causal sliding-window attention over context-then-block instead.

Shape letters: B batch, S context positions, Q block (query) rows, D width, n features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.attention import block_slots
from dflash.config import FAMILIES, ConfigError, LayerSpec, ModelConfig, check_block_drafter, check_built_for
from dflash.kernels import dispatch
from dflash.kernels.anchor_attention import merge_anchor_chunks, split_anchor_chunks
from dflash.models.cache import Cache
from dflash.models.kinds import init_cache
from dflash.models.layers import Linear, RMSNorm, rope_cos_sin
from dflash.models.transformer import DecoderLayer, Transformer
from dflash.sharding import constrain

DEFAULT_BLOCK_SIZE = 16  # the kind's default (DFlashKind.default_block_size reads it)
ANCHOR_CHUNK = 64  # a chunk's MLP product at the Qwen3-8B preset: [4, 64, 16, 12288] bf16 = 96 MiB per chip


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` ids spread evenly from layer 1 to layer L-3 (rounded); one id -> L // 2."""
    last = num_target_layers - 3
    if count == 1 or last <= 1:
        return (num_target_layers // 2,)
    count = min(count, last)
    return tuple(int(round(x)) for x in np.linspace(1, last, count))


DRAFTER_LAYER = LayerSpec(mixer_options={"qk_norm": True})  # Qwen3-style, whatever the target
FULL, SLIDING = "full_attention", "sliding_attention"  # drafter layer types (HF ``layer_types``)


def drafter_layers(num_layers: int, layer_types: tuple[str, ...] = (), sliding_window: int = 0
                   ) -> tuple[LayerSpec, ...]:
    """The drafter's layer specs: ``layer_types`` (() = all full) with ``window=sliding_window`` on
    the sliding ones (docs/design.md §5)."""
    types = tuple(layer_types) or (FULL,) * num_layers
    if len(types) != num_layers or set(types) - {FULL, SLIDING}:
        raise ConfigError(f"drafter.layer_types must list {num_layers} of {FULL!r} / {SLIDING!r} "
                          f"(one per drafter layer), got {list(types)}")
    if (SLIDING in types) != (sliding_window > 0):
        raise ConfigError(f"drafter.sliding_window={sliding_window} with layer_types {list(types)}: "
                          "a positive window is needed exactly when a layer is sliding_attention")
    windowed = LayerSpec(mixer_options={**dict(DRAFTER_LAYER.mixer_options), "window": sliding_window})
    return tuple(windowed if t == SLIDING else DRAFTER_LAYER for t in types)


@dataclasses.dataclass(frozen=True)
class DFlashConfig:
    """Drafter architecture: its own decoder layers (``layers``, a ``ModelConfig``) and what ties it
    to its target (the feature layers it reads, their count, the mask token); ``for_target`` fills
    the target-derived parts."""

    layers: ModelConfig  # the drafter's own (Qwen3-style) layers
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE
    model_type: str = "qwen3"  # the target's family (recorded on export)

    def __post_init__(self) -> None:
        lc = self.layers
        check_block_drafter("drafter", lc, block_size=self.block_size, mask_token_id=self.mask_token_id)
        for i, spec in enumerate(lc.layers):
            if spec.mixer != "attention" or set(dict(spec.mixer_options)) - {"qk_norm", "window"}:
                raise ConfigError(f"DFlash drafter layers are Qwen3-style attention, full or sliding; "
                                  f"layer {i} is {spec.mixer} {dict(spec.mixer_options)}")
        if len({w for w in self.windows if w}) > 1:
            raise ConfigError(f"DFlash drafter sliding layers share one window, got {self.windows}")
        if not self.target_layer_ids:
            raise ConfigError("drafter.target_layer_ids must name at least one target layer")
        for i in self.target_layer_ids:
            if not 0 <= i < self.num_target_layers:
                raise ConfigError(
                    f"drafter.target_layer_ids: layer {i} is out of range for a target with "
                    f"{self.num_target_layers} layers (valid: 0..{self.num_target_layers - 1})"
                )
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids):
            raise ConfigError(f"drafter.target_layer_ids has duplicates: {self.target_layer_ids}")

    # The drafter's shapes are its layers' (read, never copied).
    hidden_size = property(lambda self: self.layers.hidden_size)
    intermediate_size = property(lambda self: self.layers.intermediate_size)
    num_layers = property(lambda self: self.layers.num_layers)
    num_heads = property(lambda self: self.layers.num_heads)
    num_kv_heads = property(lambda self: self.layers.num_kv_heads)
    head_dim = property(lambda self: self.layers.head_dim)
    vocab_size = property(lambda self: self.layers.vocab_size)
    rms_norm_eps = property(lambda self: self.layers.rms_norm_eps)
    rope = property(lambda self: self.layers.rope)
    rope_theta = property(lambda self: self.layers.rope.theta)
    max_position_embeddings = property(lambda self: self.layers.max_position_embeddings)

    @property
    def windows(self) -> tuple[int, ...]:
        """Each layer's sliding window (0: full attention)."""
        return tuple(int(spec.mixer_option("window", 0)) for spec in self.layers.layers)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(SLIDING if w else FULL for w in self.windows)

    @property
    def sliding_window(self) -> int:
        """The sliding layers' window (0: none slides)."""
        return max(self.windows)

    @classmethod
    def for_target(cls, target: ModelConfig, *, mask_token_id: int, num_layers: int = 1,
                   block_size: int = DEFAULT_BLOCK_SIZE, target_layer_ids: tuple[int, ...] | None = None,
                   num_target_features: int = 5, layer_types: tuple[str, ...] = (), sliding_window: int = 0,
                   rope_theta: float = 0.0, **shape: int) -> DFlashConfig:
        """Defaults from the target: its width, heads, rope and vocabulary. ``shape``
        (``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``; 0 = the target's)
        gives the drafter's own, as published drafters for hybrid targets have; ``rope_theta`` > 0
        the drafter's own RoPE base (z-lab's Gemma 4 drafters: 1e6, where the target's base
        RoPE, its sliding layers', is 1e4)."""
        ids = tuple(target_layer_ids) if target_layer_ids else default_target_layer_ids(
            target.num_layers, num_target_features)
        specs = drafter_layers(num_layers, layer_types, sliding_window)
        layers = layer_config(target, num_layers, specs, **shape)
        if rope_theta:
            rope = dataclasses.replace(layers.rope, theta=float(rope_theta))
            layers = dataclasses.replace(layers, rope=rope)
        return cls(layers=layers,
                   num_target_layers=target.num_layers,
                   target_layer_ids=ids, mask_token_id=mask_token_id, block_size=block_size,
                   model_type=FAMILIES[target.model_type].drafter_model_type or target.model_type)

    def check_target(self, target: ModelConfig) -> None:
        """A drafter only runs against a target of the width/vocab/depth it was built for."""
        check_built_for("drafter", {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                                    "num_layers": self.num_target_layers}, target)


SHAPE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")  # a drafter's own, or 0


def layer_config(target: Any, num_layers: int, layers: tuple[LayerSpec, ...] | None = None,
                 **shape: int) -> ModelConfig:
    """``num_layers`` Qwen3-style layers (q/k RMSNorm, no biases; ``layers``: their specs, default
    all full attention) shaped like ``target`` (a ``ModelConfig``, or anything with its size fields:
    an exported drafter's config.json), except the ``SHAPE_FIELDS`` given non-zero in ``shape``."""
    if set(shape) - set(SHAPE_FIELDS):
        raise TypeError(f"unknown drafter shape fields {sorted(set(shape) - set(SHAPE_FIELDS))}")
    fields = dict(vocab_size=target.vocab_size, hidden_size=target.hidden_size,
                  rms_norm_eps=target.rms_norm_eps,
                  rope=target.rope, max_position_embeddings=target.max_position_embeddings,
                  **{name: shape.get(name) or getattr(target, name) for name in SHAPE_FIELDS})
    return ModelConfig(model_type="qwen3", num_layers=num_layers,
                       layers=layers if layers is not None else (DRAFTER_LAYER,) * num_layers, **fields)


class DFlashDrafter(nnx.Module):
    """Parameters only; the context cache goes in and comes out."""

    remat = False  # training: recompute each layer in the backward (``train.remat``; static)
    anchor_chunk = ANCHOR_CHUNK  # anchors per rematerialised step under ``remat`` (static)

    def __init__(self, cfg: DFlashConfig, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        # auto | pallas | reference (dflash.kernels.dispatch): a static attribute, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        h = cfg.hidden_size
        self.fc = Linear(len(cfg.target_layer_ids) * h, h, bias=False, dtype=dtype, rngs=rngs)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.layers = nnx.List([DecoderLayer(cfg.layers, spec, dtype=dtype,
                                             rngs=rngs) for spec in cfg.layers.layers])
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.layer_cfg = cfg.layers

    # ------------------------------------------------------------------ shared pieces
    def project_context(self, feats_BSnD: jax.Array) -> jax.Array:
        """``hidden_norm(fc(concat features))`` -> ``[B, S, D]``; applied once, not per layer."""
        return self.hidden_norm(self.fc(feats_BSnD))

    def _layer(self, layer: DecoderLayer, x_BAQD, cos_q, sin_q, k_ctx_BSKH, v_ctx_BSKH, ctx_mask_BAS,
               q_pos_BAQ, ctx_pos_BS):
        """One layer with KV injection over ``A`` blocks of ``Q`` rows.

        Keys/values are the context's (shared by all blocks, masked per block) plus the block's
        own; queries come from the block only. Blocks never see each other, so attention is
        computed blockwise: O(A*Q*(S+Q)) instead of a dense O(A*Q*(S+A*Q)). A sliding layer
        also masks each row by the positions (``q_pos_BAQ``, ``ctx_pos_BS``; docs/design.md §5).
        """
        attn = layer.self_attn

        def inject(h_BAQD):
            b, a, k, d = h_BAQD.shape
            h = h_BAQD.reshape(b, a * k, d)
            q = attn.q(h, cos_q, sin_q)  # [B, A*Q, N, H]
            k_blk, v_blk = attn.kv(h, cos_q, sin_q)  # [B, A*Q, K, H]
            n, hd, kh = q.shape[2], q.shape[3], k_blk.shape[2]
            out = dispatch.anchor_attention(  # [B, A, Q, N, H]
                q.reshape(b, a, k, n, hd), k_ctx_BSKH, v_ctx_BSKH, k_blk.reshape(b, a, k, kh, hd),
                v_blk.reshape(b, a, k, kh, hd), ctx_mask_BAS, impl=self.attention_impl, window=attn.window,
                q_pos_BAQ=q_pos_BAQ, ctx_pos_BS=ctx_pos_BS)
            return attn.output(out.reshape(b, a, k, n * hd)), None

        return layer(x_BAQD, inject)[0]

    def _rope(self, positions: jax.Array):
        flat = positions.reshape(positions.shape[0], -1)
        return rope_cos_sin(self.layer_cfg, flat)

    # ------------------------------------------------------------------ training path
    def __call__(self, x_BAQD: jax.Array, q_pos_BAQ: jax.Array, ctx_BSD: jax.Array,
                 ctx_pos_BS: jax.Array, ctx_mask_BAS: jax.Array) -> jax.Array:
        """Normed hidden states ``[B, A, Q, D]`` of ``A`` blocks drafted over one context.

        ``ctx_mask_BAS`` says which context positions block ``j`` sees (``s < anchor_j`` of its
        own document: the sparse anchor mask); each block sees all of itself and no other block.
        """
        cos_c, sin_c = rope_cos_sin(self.layer_cfg, ctx_pos_BS)
        if self.remat:
            return self.norm(self._remat_layers(x_BAQD, q_pos_BAQ, ctx_BSD, ctx_pos_BS, cos_c, sin_c,
                                                ctx_mask_BAS))
        cos_q, sin_q = self._rope(q_pos_BAQ)
        for layer in self.layers:
            k_ctx, v_ctx = layer.self_attn.kv(ctx_BSD, cos_c, sin_c)
            x_BAQD = self._layer(layer, x_BAQD, cos_q, sin_q, k_ctx, v_ctx, ctx_mask_BAS, q_pos_BAQ,
                                 ctx_pos_BS)
        return self.norm(x_BAQD)

    def _remat_layers(self, x_BAQD, q_pos_BAQ, ctx_BSD, ctx_pos_BS, cos_c, sin_c, ctx_mask_BAS) -> jax.Array:
        """``train.remat``: every layer runs over ``anchor_chunk`` anchors at a time in a
        ``lax.scan`` with a rematerialised body, so the backward holds one chunk's MLP and
        attention intermediates (``[B, chunk, Q, I]``), not all anchors' (768 MiB each per chip
        at the Qwen3-8B preset). Blocks never see each other: same values as the plain path.
        """
        a = x_BAQD.shape[1]
        c = min(self.anchor_chunk, a)
        x_nBcQD = constrain(split_anchor_chunks(x_BAQD, c), "chunks")
        xs = (split_anchor_chunks(q_pos_BAQ, c), split_anchor_chunks(ctx_mask_BAS, c))
        for layer in self.layers:
            k_ctx, v_ctx = layer.self_attn.kv(ctx_BSD, cos_c, sin_c)  # [B, S, K, H], shared by all chunks

            @jax.checkpoint
            def one(carry, chunk, layer=layer, k_ctx=k_ctx, v_ctx=v_ctx):
                x_BcQD, pos_BcQ, mask_BcS = chunk
                cos_q, sin_q = self._rope(pos_BcQ)
                return carry, self._layer(layer, x_BcQD, cos_q, sin_q, k_ctx, v_ctx, mask_BcS, pos_BcQ,
                                          ctx_pos_BS)

            _, x_nBcQD = jax.lax.scan(one, None, (x_nBcQD, *xs))
        return merge_anchor_chunks(x_nBcQD, a)

    # ------------------------------------------------------------------ inference path
    def init_context_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> Cache:
        """The drafter's own cache: projected *context* K/V only, one state per layer."""
        return init_cache(self.layer_cfg, batch, max_len, dtype)

    def extend_context(self, cache: Cache, feats_BTnD: jax.Array, positions_BT: jax.Array,
                       new_lengths_B: jax.Array) -> Cache:
        """Writes K/V of ``T`` new context features at ``[len, len+T)``; keeps ``new_lengths`` visible.

        After verification only the anchor and the accepted drafts are real context, so the
        caller passes ``new_lengths = len + accepted + 1`` (stale slots are masked, then overwritten).
        """
        ctx = self.project_context(feats_BTnD)
        cos, sin = rope_cos_sin(self.layer_cfg, positions_BT)
        slots = block_slots(cache.lengths, ctx.shape[1])
        states = tuple(state.write(*layer.self_attn.kv(ctx, cos, sin), slots)
                       for layer, state in zip(self.layers, cache.layers, strict=True))
        return Cache(layers=states, lengths=new_lengths_B.astype(jnp.int32), max_len=cache.max_len)

    def draft_logits(self, target: Transformer, cache: Cache, anchor_B: jax.Array,
                     block_size: int | None = None) -> jax.Array:
        """Logits ``[B, Q-1, V]`` for positions ``p+1 .. p+Q-1``, ``p = cache.lengths``.

        The block's own K/V are used for this pass only and never kept. ``block_size`` may be
        smaller than the trained one (shorter blocks at inference).
        """
        b, k = anchor_B.shape[0], block_size or self.cfg.block_size
        tokens = jnp.concatenate(
            [anchor_B[:, None], jnp.full((b, k - 1), self.cfg.mask_token_id, jnp.int32)], axis=1)
        x = target.embed(tokens).astype(self.fc.kernel[...].dtype)[:, None]  # [B, 1, Q, D]
        positions = cache.lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None]
        cos, sin = rope_cos_sin(self.layer_cfg, positions)
        slots_BS = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
        ctx_mask = (slots_BS < cache.lengths[:, None])[:, None]  # [B, 1, S]
        # A context slot holds the features of the token at that position (extend_context), so a
        # sliding layer's window over the context is a window over the slots.
        for layer, state in zip(self.layers, cache.layers, strict=True):
            x = self._layer(layer, x, cos, sin, state.k, state.v, ctx_mask, positions[:, None], slots_BS)
        return target.unembed(self.norm(x[:, 0, 1:]))


def build_drafter(cfg: DFlashConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0,
                  attention_impl: str = "auto") -> DFlashDrafter:
    return DFlashDrafter(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
