"""DFlash block-diffusion drafter (exact semantics: DESIGN.md §5).

N Qwen3-style decoder layers and a final norm; no embedding or LM head of its own (the
target's frozen ones are used). Context = ``hidden_norm(fc(concat of target features))``,
applied once; every layer's keys/values are ``k_proj``/``v_proj`` of ``[context ; block]``
("KV injection") while queries come from the block only. Block = ``[anchor, MASK x (B-1)]``
at positions ``p .. p+B-1``, bidirectional inside, context strictly before ``p``; output row
``k`` predicts the token at ``p + k`` (same position, not shifted).

Shape letters: B batch, S context positions, Q block (query) rows, D width, n features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash import cache as kvc
from dflash.config import ConfigError, ModelConfig, RopeConfig
from dflash.models.transformer import (
    DecoderLayer,
    Linear,
    RMSNorm,
    Transformer,
    attend,
    rope_cos_sin,
)

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}  # loss-decay gamma of the published recipe


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` ids spread evenly from layer 1 to layer L-3 (rounded); one id -> L // 2."""
    last = num_target_layers - 3
    if count == 1 or last <= 1:
        return (num_target_layers // 2,)
    count = min(count, last)
    return tuple(int(round(x)) for x in np.linspace(1, last, count))


def default_gamma(block_size: int) -> float:
    """Published gamma for B = 8/10/16; other sizes scale B = 16's value proportionally."""
    return GAMMA_BY_BLOCK.get(block_size, 7.0 * block_size / 16)


@dataclasses.dataclass(frozen=True)
class DFlashConfig:
    """Drafter architecture; ``for_target`` fills the target-derived fields."""

    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int = 1
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    model_type: str = "qwen3"  # the target's family (recorded on export)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"drafter.block_size must be >= 2, got {self.block_size}")
        if self.num_layers < 1:
            raise ConfigError(f"drafter.num_layers must be >= 1, got {self.num_layers}")
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
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"drafter.mask_token_id={self.mask_token_id} is outside the vocabulary "
                f"(0..{self.vocab_size - 1})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("drafter.num_heads must be a multiple of drafter.num_kv_heads")

    @classmethod
    def for_target(cls, target: ModelConfig, *, mask_token_id: int, num_layers: int = 1,
                   block_size: int = 16, target_layer_ids: tuple[int, ...] | None = None,
                   num_target_features: int = 5) -> DFlashConfig:
        """Defaults from the target: its width, heads, rope and vocabulary."""
        ids = tuple(target_layer_ids) if target_layer_ids else default_target_layer_ids(
            target.num_layers, num_target_features)
        return cls(
            num_target_layers=target.num_layers, target_layer_ids=ids, mask_token_id=mask_token_id,
            vocab_size=target.vocab_size, hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size, num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads, head_dim=target.head_dim, num_layers=num_layers,
            block_size=block_size, rms_norm_eps=target.rms_norm_eps, rope=target.rope,
            max_position_embeddings=target.max_position_embeddings, model_type=target.model_type,
        )

    def layer_config(self) -> ModelConfig:
        """The drafter's layers are Qwen3-style (q/k RMSNorm, no biases) whatever the target."""
        return ModelConfig(
            model_type="qwen3", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope=self.rope,
            max_position_embeddings=self.max_position_embeddings, qk_norm=True,
        )

    def check_target(self, target: ModelConfig) -> None:
        """A drafter only runs against a target of the width/vocab/depth it was built for."""
        for ours, theirs, name in ((self.hidden_size, target.hidden_size, "hidden_size"),
                                   (self.vocab_size, target.vocab_size, "vocab_size"),
                                   (self.num_target_layers, target.num_layers, "num_layers")):
            if ours != theirs:
                raise ConfigError(f"drafter was built for a target with {name}={ours}, "
                                  f"but this target has {name}={theirs}")


class DFlashDrafter(nnx.Module):
    """Parameters only; the context cache goes in and comes out."""

    def __init__(self, cfg: DFlashConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = Linear(len(cfg.target_layer_ids) * h, h, bias=False, dtype=dtype, rngs=rngs)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        layer_cfg = cfg.layer_config()
        self.layers = nnx.List([DecoderLayer(layer_cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.layer_cfg = layer_cfg

    # ------------------------------------------------------------------ shared pieces
    def project_context(self, feats_BSnD: jax.Array) -> jax.Array:
        """``hidden_norm(fc(concat features))`` -> ``[B, S, D]``; applied once, not per layer."""
        return self.hidden_norm(self.fc(feats_BSnD))

    def _layer(self, layer: DecoderLayer, x_BQD, cos_q, sin_q, k_ctx, v_ctx, mask_BQK):
        """One layer with KV injection: keys/values of ``[context ; block]``, queries of the block."""
        h = layer.input_layernorm(x_BQD)
        q = layer.self_attn.q(h, cos_q, sin_q)
        k_blk, v_blk = layer.self_attn.kv(h, cos_q, sin_q)
        k = jnp.concatenate([k_ctx.astype(k_blk.dtype), k_blk], axis=1)  # [B, S+Q, K, H]
        v = jnp.concatenate([v_ctx.astype(v_blk.dtype), v_blk], axis=1)
        x_BQD = x_BQD + layer.self_attn.o_proj(attend(q, k, v, mask_BQK))
        return x_BQD + layer.mlp(layer.post_attention_layernorm(x_BQD))

    # ------------------------------------------------------------------ training path
    def __call__(self, x_BQD: jax.Array, q_pos_BQ: jax.Array, ctx_BSD: jax.Array,
                 ctx_pos_BS: jax.Array, mask_BQK: jax.Array) -> jax.Array:
        """Normed block hidden states ``[B, Q, D]`` for block embeddings ``x`` over context ``ctx``.

        ``mask_BQK`` is ``[B, Q, S + Q]``: which context positions and block rows each row sees
        (the sparse anchor mask when many blocks are packed).
        """
        cos_q, sin_q = rope_cos_sin(self.layer_cfg, q_pos_BQ)
        cos_c, sin_c = rope_cos_sin(self.layer_cfg, ctx_pos_BS)
        for layer in self.layers:
            k_ctx, v_ctx = layer.self_attn.kv(ctx_BSD, cos_c, sin_c)
            x_BQD = self._layer(layer, x_BQD, cos_q, sin_q, k_ctx, v_ctx, mask_BQK)
        return self.norm(x_BQD)

    # ------------------------------------------------------------------ inference path
    def init_context_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> kvc.KVCache:
        """The drafter's own cache: projected *context* K/V only, one entry per layer."""
        return kvc.init_cache(self.layer_cfg, batch, max_len, dtype)

    def extend_context(self, cache: kvc.KVCache, feats_BTnD: jax.Array, positions_BT: jax.Array,
                       new_lengths_B: jax.Array) -> kvc.KVCache:
        """Writes K/V of ``T`` new context features at ``[len, len+T)``; keeps ``new_lengths`` visible.

        After verification only the anchor and the accepted drafts are real context, so the
        caller passes ``new_lengths = len + accepted + 1`` (stale slots are masked, then overwritten).
        """
        ctx = self.project_context(feats_BTnD)
        cos, sin = rope_cos_sin(self.layer_cfg, positions_BT)
        slots = kvc.block_slots(cache.lengths, ctx.shape[1])
        k_all, v_all = cache.k, cache.v
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.kv(ctx, cos, sin)
            k_all = kvc.write_layer(k_all, i, k, slots)
            v_all = kvc.write_layer(v_all, i, v, slots)
        return kvc.KVCache(k=k_all, v=v_all, lengths=new_lengths_B.astype(jnp.int32))

    def draft_logits(self, target: Transformer, cache: kvc.KVCache, anchor_B: jax.Array) -> jax.Array:
        """Logits ``[B, B_blk - 1, V]`` for positions ``p+1 .. p+B_blk-1``, ``p = cache.lengths``.

        The block's own K/V are used for this pass only and never kept.
        """
        b, q = anchor_B.shape[0], self.cfg.block_size
        tokens = jnp.concatenate(
            [anchor_B[:, None], jnp.full((b, q - 1), self.cfg.mask_token_id, jnp.int32)], axis=1)
        x = target.embed(tokens).astype(self.fc.kernel[...].dtype)
        positions = cache.lengths[:, None] + jnp.arange(q, dtype=jnp.int32)[None]
        cos, sin = rope_cos_sin(self.layer_cfg, positions)
        prefix_BS = jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]
        mask = jnp.concatenate([jnp.broadcast_to(prefix_BS[:, None, :], (b, q, cache.max_len)),
                                jnp.ones((b, q, q), bool)], axis=2)  # [B, Q, S+Q]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, cos, sin, cache.k[i], cache.v[i], mask)
        return target.unembed(self.norm(x)[:, 1:])


def build_drafter(cfg: DFlashConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> DFlashDrafter:
    return DFlashDrafter(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
