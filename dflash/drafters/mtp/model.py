"""Multi-token-prediction (MTP) heads: a target family's own next-next-token block (exact semantics:
docs/design.md, "MTP heads").

One MTP step at position ``t`` reads the target's final-normed hidden state ``h_t`` and the
embedding of the token at ``t + 1`` and predicts the token at ``t + 2``::

    x = fc([pre_fc_norm_embedding(embed(tok_{t+1})) ; pre_fc_norm_hidden(h_t)])   # [2D] -> [D]
    y = norm(DecoderLayer(x))              # the target's full-attention layer, causal over positions
    logits = lm_head(y)                    # the target's LM head; y is also the next step's "h"

The embedding and the LM head are the target's (shared, frozen, never parameters of the head);
the layer is built from the target's own layer specs (gated attention with partial RoPE, MoE with a
shared expert, zero-centred norms: whatever the family's attention layers are), so there is no
second layer body. Shape letters: B rows, T positions, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import LayerSpec, ModelConfig, check_built_for
from dflash.errors import ConfigError
from dflash.kernels import dispatch
from dflash.models.cache import Cache
from dflash.models.kinds import WeightRow, init_cache, layer_weights
from dflash.models.layers import Linear, model_norm
from dflash.models.transformer import DecoderLayer, pass_context

DEFAULT_BLOCK_SIZE = 4  # anchor + 3 chained MTP steps per verify pass


def mtp_layer_specs(target: ModelConfig, num_layers: int) -> tuple[LayerSpec, ...]:
    """The MTP layers' specs: the target's full-attention mixer (its first attention layer's, options
    and all) with the MLP target layer ``j`` has (vLLM builds MTP layer ``j`` with the MLP rule of
    decoder layer index ``j``: experts or dense as the family decides)."""
    attention = next((spec for spec in target.layers if spec.mixer == "attention"), None)
    if attention is None:
        raise ConfigError(
            f"an MTP head needs the target's attention layer spec; this {target.model_type} "
            "target has no attention layer"
        )
    return tuple(
        dataclasses.replace(
            target.layers[j % target.num_layers], mixer=attention.mixer, mixer_options=attention.mixer_options
        )
        for j in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """An MTP head: its layers (``layers``: the target's config cut to the MTP layers) and how many
    chained steps a verify pass drafts (``block_size - 1``)."""

    layers: ModelConfig
    block_size: int = DEFAULT_BLOCK_SIZE
    mask_token_id: int | None = None  # an MTP head has none (every token is a real token)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(
                f"drafter.block_size must be >= 2 (the anchor + at least one MTP step), got {self.block_size}"
            )
        for i, spec in enumerate(self.layers.layers):
            if spec.mixer != "attention":
                raise ConfigError(f"MTP layer {i} must be an attention layer, got {spec.mixer!r}")

    hidden_size = property(lambda self: self.layers.hidden_size)
    vocab_size = property(lambda self: self.layers.vocab_size)
    num_layers = property(lambda self: self.layers.num_layers)

    @classmethod
    def for_target(
        cls, target: ModelConfig, *, num_layers: int = 1, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> MTPConfig:
        if num_layers < 1:
            raise ConfigError(f"an MTP head needs at least one layer, got num_layers={num_layers}")
        specs = mtp_layer_specs(target, num_layers)
        return cls(
            layers=dataclasses.replace(target, num_layers=num_layers, layers=specs), block_size=block_size
        )

    def check_target(self, target: ModelConfig) -> None:
        check_built_for("MTP head", {n: getattr(self.layers, n) for n in ("hidden_size", "vocab_size")},
                        target)


PREFIX = "mtp."


def mtp_rows(cfg: MTPConfig) -> tuple[WeightRow, ...]:
    """The head's tensors as the target checkpoints store them (``mtp.*``, vLLM's names)."""
    rows = [
        WeightRow(f"{PREFIX}fc.weight", "fc.kernel", transpose=True),
        *(
            WeightRow(f"{PREFIX}{n}.weight", f"{n}.weight")
            for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
        ),
    ]
    for i in range(cfg.num_layers):
        rows += layer_weights(cfg.layers, i, prefix=PREFIX)
    return tuple(rows)


class MTPHead(nnx.Module):
    """Parameters only (the embedding and LM head are the target's); caches go in and come out."""

    def __init__(
        self, cfg: MTPConfig, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto", rngs: nnx.Rngs
    ):
        self.cfg = cfg
        # auto | pallas | reference (dflash.kernels.dispatch): a static attribute, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        lc, d = cfg.layers, cfg.hidden_size
        self.fc = Linear(2 * d, d, bias=False, dtype=dtype, rngs=rngs)
        self.pre_fc_norm_embedding = model_norm(lc, d, dtype)
        self.pre_fc_norm_hidden = model_norm(lc, d, dtype)
        self.layers = nnx.List([DecoderLayer(lc, spec, dtype=dtype, rngs=rngs) for spec in lc.layers])
        for decoder in self.layers:  # an MLP with a kernel choice (moe) follows the run's, as the target's
            if hasattr(decoder.mlp, "impl"):
                decoder.mlp.impl = self.attention_impl
        self.norm = model_norm(lc, d, dtype)

    def inputs(self, emb_BTD: jax.Array, hidden_BTD: jax.Array) -> jax.Array:
        """``fc([norm(embedding of the next token) ; norm(hidden)])``: the layer's input ``[B, T, D]``."""
        dtype = self.fc.kernel[...].dtype
        e = self.pre_fc_norm_embedding(emb_BTD.astype(dtype))
        h = self.pre_fc_norm_hidden(hidden_BTD.astype(dtype))
        return self.fc(jnp.concatenate([e, h], axis=-1))

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache: Cache | None,
        *,
        layer: int = 0,
        block_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """MTP layer ``layer`` over inputs ``x`` at ``positions`` (RoPE as the target's) -> (the
        normed output ``[B, T, D]``, the cache with ``lengths + T``). With a cache the block sees
        the committed slots plus itself under ``block_mask`` (default causal); without one, causal
        attention within ``segment_ids`` (training over packed rows)."""
        ctx = pass_context(
            self.cfg.layers,
            self.attention_impl,
            positions_BT,
            cache,
            block_mask=block_mask,
            segment_ids=segment_ids,
        )
        state = cache.layers[0] if cache is not None else None
        decoder = self.layers[layer]
        y, state = decoder(x_BTD, lambda h: decoder.mixer(h, ctx=ctx, state=state))
        new = None
        if cache is not None:
            new = Cache(layers=(state,), lengths=cache.lengths + x_BTD.shape[1], max_len=cache.max_len)
        return self.norm(y), new

    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
        """One KV state (the first MTP layer's): the engine chains that layer."""
        one = dataclasses.replace(self.cfg.layers, num_layers=1, layers=self.cfg.layers.layers[:1])
        return init_cache(one, batch, max_len, dtype)


def build_head(
    cfg: MTPConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0, attention_impl: str = "auto"
) -> MTPHead:
    return MTPHead(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
