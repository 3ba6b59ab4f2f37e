"""Orthrus dual-view drafting (exact semantics: docs/design.md §6).

Every target layer gets a second, full-rank attention (``q/k/v/o_proj_diff`` and
``q_norm_diff`` / ``k_norm_diff``), warm-started as copies of the AR attention; only these are
trained. The diffusion view of a block ``[anchor, MASK x (B-1)]`` runs the target's own frozen
residual stream (embedding, ``input_layernorm``, ``post_attention_layernorm``, MLP, final norm,
LM head) through the target's own layer body, with the diffusion attention passed in as the
layer's mixer: queries from ``q_proj_diff`` attend to the **AR K/V of the prefix** (made by the
frozen AR projections: the target's KV cache at inference, the clean AR pass in training) plus
the block's own diffusion K/V, bidirectionally. Output row ``j`` predicts the token at
``a + j + 1`` (the usual shift): ``B - 1`` drafts, the last row is discarded.

This module holds only the ``*_diff`` parameters (no copy of the target); the frozen target is
passed in. Nothing is written to the target's cache: the prefix is read, the block's K/V live
for one pass only, so the cache that comes back from a draft is the one that went in.

Shape letters: B batch, A blocks per row, Q block rows, S prefix (cache) slots, D width,
N query heads, K kv heads, G = N / K, H head dim, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import ConfigError, ModelConfig, check_block_drafter
from dflash.kernels import dispatch
from dflash.models.attention_mixer import AttentionProjections, first_non_plain_layer
from dflash.models.cache import Cache, KVState
from dflash.models.layers import rope_tables
from dflash.models.transformer import Transformer

DEFAULT_BLOCK_SIZE = 32  # the kind's default (OrthrusKind.default_block_size reads it)
_ARCH_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "layers")


@dataclasses.dataclass(frozen=True)
class OrthrusConfig:
    """The target's architecture (one diffusion attention per layer, shaped like its own) plus the
    block size and the mask token."""

    target: ModelConfig
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        t = self.target
        check_block_drafter("orthrus", t, block_size=self.block_size, mask_token_id=self.mask_token_id)
        if (other := first_non_plain_layer(t)) is not None:
            raise ConfigError(f"Orthrus needs full attention without sinks in every target layer; {other}")

    num_layers = property(lambda self: self.target.num_layers)
    hidden_size = property(lambda self: self.target.hidden_size)
    vocab_size = property(lambda self: self.target.vocab_size)
    model_type = property(lambda self: self.target.model_type)

    @classmethod
    def for_target(cls, target: ModelConfig, *, mask_token_id: int,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> OrthrusConfig:
        """One diffusion attention per target layer, shaped exactly like the target's own."""
        return cls(target=target, mask_token_id=mask_token_id, block_size=block_size)

    def check_target(self, target: ModelConfig) -> None:
        """The diffusion attentions only fit a target of exactly this depth / width / heads / layers."""
        for name in _ARCH_FIELDS:
            ours, theirs = getattr(self.target, name), getattr(target, name)
            if ours != theirs:
                shown = (ours, theirs) if name != "layers" else ("(its layers)", "(other layers)")
                raise ConfigError(f"Orthrus drafter was built for a target with {name}={shown[0]}, "
                                  f"but this target has {name}={shown[1]}")


class OrthrusDrafter(nnx.Module):
    """The per-layer diffusion attentions only; the frozen target is an argument."""

    remat = False  # training: recompute each layer in the backward (``train.remat``; static)

    def __init__(self, cfg: OrthrusConfig, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        # Its own setting for its block attention (not the target's): static, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        self.layers = nnx.List([AttentionProjections(cfg.target, spec, dtype=dtype, rngs=rngs, suffix="_diff")
                                for spec in cfg.target.layers])

    def __call__(self, target: Transformer, x_BAQD: jax.Array, pos_BAQ: jax.Array, prefix: Sequence[KVState],
                 ctx_mask_BAS: jax.Array) -> jax.Array:
        """Residual stream ``[B, A, Q, D]`` (before the final norm) of ``A`` blocks per row.

        ``x_BAQD``: embedded blocks; ``pos_BAQ``: their absolute positions; ``prefix``: the AR
        keys/values of every target layer over the prefix (a KV cache's states, or the clean AR pass
        in training); ``ctx_mask_BAS``: which prefix slots block ``j`` sees.
        """
        b, a, q, d = x_BAQD.shape
        flat_pos = pos_BAQ.reshape(b, a * q)
        tables: dict[int, tuple[jax.Array, jax.Array]] = {}
        blk = lambda t: t.reshape(b, a, q, *t.shape[2:])  # noqa: E731  [B, A*Q, ...] -> [B, A, Q, ...]
        for layer, diff, kv in zip(target.layers, self.layers, prefix, strict=True):
            if diff.rotary_dim not in tables:
                tables[diff.rotary_dim] = rope_tables(target.cfg.rope, diff.rotary_dim, flat_pos)
            cos, sin = tables[diff.rotary_dim]

            def run(x_BAQD, k_ctx_BSKH, v_ctx_BSKH, layer=layer, diff=diff, cos=cos, sin=sin):
                def mix(h_BAQD):
                    h_BTD = h_BAQD.reshape(b, a * q, d)
                    q_BTNH, gate = diff.queries(h_BTD, cos, sin)
                    k_BTKH, v_BTKH = diff.kv(h_BTD, cos, sin)
                    # Each block sees the prefix its mask allows plus all of itself, never another
                    # block: the same attention as the DFlash drafter's (Pallas kernel on TPU/GPU).
                    # The prefix (a KV cache) is only read.
                    attn_BAQNH = dispatch.anchor_attention(blk(q_BTNH), k_ctx_BSKH, v_ctx_BSKH, blk(k_BTKH),
                                                           blk(v_BTKH), ctx_mask_BAS,
                                                           impl=self.attention_impl)
                    gate_BAQX = None if gate is None else blk(gate)
                    return diff.output(attn_BAQNH.reshape(b, a, q, -1), gate_BAQX), None

                return layer(x_BAQD, mix)[0]

            x_BAQD = (jax.checkpoint(run) if self.remat else run)(x_BAQD, kv.k, kv.v)
        return x_BAQD

    def draft_logits(self, target: Transformer, cache: Cache, anchor_B: jax.Array,
                     block_size: int | None = None) -> jax.Array:
        """Logits ``[B, Q-1, V]`` for positions ``p+1 .. p+Q-1``, ``p = cache.lengths`` (the anchor's).

        Reads the committed prefix of the target's cache (slots ``< lengths``); writes nothing.
        """
        b, k = anchor_B.shape[0], block_size or self.cfg.block_size
        tokens = jnp.concatenate(
            [anchor_B[:, None], jnp.full((b, k - 1), self.cfg.mask_token_id, jnp.int32)], axis=1)
        x = target.embed(tokens)[:, None]  # [B, 1, Q, D]
        positions = (cache.lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None])[:, None]  # [B, 1, Q]
        ctx_mask = (jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None])[:, None]  # [B, 1, S]
        h = self(target, x, positions, cache.layers, ctx_mask)
        return target.logits(h[:, 0, : k - 1])  # row j predicts the token at p + j + 1

    @classmethod
    def from_target(cls, target: Transformer, cfg: OrthrusConfig, *,
                    attention_impl: str = "auto") -> OrthrusDrafter:
        """Warm start: every ``*_diff`` parameter is a copy of the target's AR counterpart.

        Real copies (new buffers), so donating the drafter's state in a train step can never
        invalidate the frozen target's arrays.
        """
        cfg.check_target(target.cfg)
        dtype = target.embed_tokens[...].dtype
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: cls(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0))))
        source = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(target, nnx.Param))}
        filled = {}
        for path, var in nnx.to_flat_state(state):
            key = ".".join(map(str, path))
            src = source[ar_counterpart(key)]
            filled[path] = var.replace(jnp.array(src[...], dtype=dtype, copy=True))
        return nnx.merge(graphdef, nnx.from_flat_state(filled))


def ar_counterpart(diff_path: str) -> str:
    """``layers.3.q_proj_diff.kernel`` -> ``layers.3.self_attn.q_proj.kernel`` (the AR weight it copies)."""
    layers, i, name, *leaf = diff_path.split(".")
    if layers != "layers" or not name.endswith("_diff"):
        raise ValueError(f"not an Orthrus parameter path: {diff_path!r}")
    return ".".join([layers, i, "self_attn", name[: -len("_diff")], *leaf])


def build_orthrus(cfg: OrthrusConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> OrthrusDrafter:
    """Randomly initialised diffusion attentions (tests; real drafters start ``from_target``)."""
    return OrthrusDrafter(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
