"""EAGLE-3 drafter (exact semantics: docs/design.md, "EAGLE-3"; vLLM's ``llama_eagle3.py`` serves it).

One Llama decoder layer over rows that pair two things: drafter row ``t`` reads the target's
features at ``t`` (``fc`` of the low/mid/high layers' hidden states, 3·D -> D) and the embedding of
token ``t+1``, and predicts token ``t+2``. The layer's attention input is
``[embed_norm(embed) ; hidden_norm(hidden)]`` (2·D wide q/k/v projections) with the residual
taken from ``hidden``; then the post-attention norm + MLP, the final norm and an LM head over a
reduced draft vocabulary whose logits are scattered back to the target vocabulary (``d2t``:
draft id -> target id offsets; ``t2d``: which target ids the draft vocabulary holds; -inf
elsewhere). A drafted step feeds back the layer's pre-norm output in place of ``fc(features)``.

Internally the layer is the project's ``DecoderLayer``: its ``input_layernorm`` is EAGLE-3's
``hidden_norm`` (it norms the residual stream) and ``embed_norm`` is EAGLE-3's
``input_layernorm`` (hf.py maps the names).

Shape letters: B rows, S sequence / cache slots, T new rows, D width, V target vocabulary,
W draft vocabulary, n feature layers, J earlier TTT steps, N/K/H heads, kv heads, head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.attention import NEG_INF, attend, causal_mask
from dflash.config import ConfigError, LayerSpec, ModelConfig, check_built_for
from dflash.drafters.dflash.model import SHAPE_FIELDS, layer_config
from dflash.kernels import dispatch
from dflash.kernels.prefill_attention import doc_causal_mask
from dflash.models.cache import Cache
from dflash.models.kinds import init_cache
from dflash.models.layers import Context, Linear, RMSNorm, normal, rope_cos_sin
from dflash.models.transformer import DecoderLayer

DEFAULT_BLOCK_SIZE = 8  # anchor + 7 chained drafts (the TTT depth)
DEFAULT_TTT_STEPS = 7
STEP_DECAY = 0.8  # TTT step i's loss weight is 0.8**i (SpecForge, specforge/core/eagle3.py)
DEFAULT_CHUNK = 256  # TTT rows of each sequence per chunk of the attention and the loss (train.loss_chunk)
LLAMA_LAYER = LayerSpec()  # plain attention (no q/k norm, no biases), dense SiLU MLP


def default_target_layer_ids(num_target_layers: int) -> tuple[int, ...]:
    """Outputs of layers 1, L//2-1 and L-4 (SpecForge's low/mid/high; vLLM's aux ids are each + 1)."""
    ids = (1, num_target_layers // 2 - 1, num_target_layers - 4)
    return tuple(sorted({min(max(i, 0), num_target_layers - 1) for i in ids}))


class VocabMap(nnx.Variable):
    """The draft <-> target vocabulary maps: buffers, never trained."""


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """One Llama layer of the target's width (``layers``), the target layers it reads, the draft
    vocabulary's size, the chain length it drafts (``block_size``) and the TTT depth it trains."""

    layers: ModelConfig
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    draft_vocab_size: int
    block_size: int = DEFAULT_BLOCK_SIZE
    ttt_steps: int = DEFAULT_TTT_STEPS
    mask_token_id: int | None = None  # EAGLE-3 drafts no mask rows: the engine never masks a token

    def __post_init__(self) -> None:
        if self.layers.num_layers != 1:
            raise ConfigError(f"drafter.num_layers: EAGLE-3 has exactly 1 layer, got "
                              f"{self.layers.num_layers}")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"drafter.draft_vocab_size must be in 1..{self.vocab_size} (the target's "
                              f"vocabulary), got {self.draft_vocab_size}")
        if self.ttt_steps < 1:
            raise ConfigError(f"drafter.ttt_steps must be >= 1, got {self.ttt_steps}")
        if self.block_size < 2:
            raise ConfigError(f"drafter.block_size must be >= 2 (anchor + drafts), got {self.block_size}")
        if not self.target_layer_ids or len(set(self.target_layer_ids)) != len(self.target_layer_ids):
            raise ConfigError(f"drafter.target_layer_ids must name distinct target layers, got "
                              f"{self.target_layer_ids}")
        for i in self.target_layer_ids:
            if not 0 <= i < self.num_target_layers:
                raise ConfigError(f"drafter.target_layer_ids: layer {i} is out of range for a target with "
                                  f"{self.num_target_layers} layers (valid: 0..{self.num_target_layers - 1})")

    hidden_size = property(lambda self: self.layers.hidden_size)
    vocab_size = property(lambda self: self.layers.vocab_size)
    num_layers = property(lambda self: self.layers.num_layers)

    @classmethod
    def for_target(cls, target: ModelConfig, *, draft_vocab_size: int = 0,
                   block_size: int = DEFAULT_BLOCK_SIZE,
                   ttt_steps: int = DEFAULT_TTT_STEPS, target_layer_ids: tuple[int, ...] | None = None,
                   num_layers: int = 1, mask_token_id: int | None = None, **shape: int) -> Eagle3Config:
        """The target's width, heads, rope and vocabulary (``draft_vocab_size`` 0: the whole of it)."""
        return cls(layers=layer_config(target, num_layers, (LLAMA_LAYER,) * num_layers,
                                       **{k: v for k, v in shape.items() if k in SHAPE_FIELDS}),
                   num_target_layers=target.num_layers,
                   target_layer_ids=tuple(target_layer_ids or default_target_layer_ids(target.num_layers)),
                   draft_vocab_size=draft_vocab_size or target.vocab_size, block_size=block_size,
                   ttt_steps=ttt_steps, mask_token_id=mask_token_id)

    def check_target(self, target: ModelConfig) -> None:
        """A drafter only runs against a target of the width/vocab/depth it was built for."""
        check_built_for("drafter", {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                                    "num_layers": self.num_target_layers}, target)


def vocab_map(counts_V: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(d2t [W] int64, t2d [V] bool)`` for the ``W`` most frequent tokens (SpecForge's rule).

    Ties and never-seen tokens go by id order (unseen ones fill the draft vocabulary when fewer than
    ``W`` tokens were seen); draft ids follow target ids in increasing order, ``d2t[i] = id_i - i``.
    """
    counts = np.asarray(counts_V)
    if counts.ndim != 1 or not 1 <= draft_vocab_size <= counts.shape[0]:
        raise ConfigError(f"draft_vocab_size={draft_vocab_size} must be in 1..{counts.shape[-1]} "
                          "(the target vocabulary)")
    order = np.lexsort((np.arange(counts.shape[0]), -counts))  # count descending, then id ascending
    ids = np.sort(order[:draft_vocab_size])
    t2d = np.zeros(counts.shape[0], bool)
    t2d[ids] = True
    return (ids - np.arange(draft_vocab_size)).astype(np.int64), t2d


def check_vocab_map(d2t_W: np.ndarray, t2d_V: np.ndarray) -> None:
    """``d2t`` and ``t2d`` must describe the same set of target ids (a clear error naming them)."""
    ids = np.arange(d2t_W.shape[0]) + np.asarray(d2t_W)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= t2d_V.shape[0] or len(np.unique(ids)) != len(ids):
        raise ConfigError("d2t maps draft ids outside the target vocabulary or twice onto one id")
    if not np.array_equal(np.flatnonzero(np.asarray(t2d_V)), np.sort(ids)):
        raise ConfigError("t2d and d2t disagree: t2d must be True exactly at the target ids d2t maps to")


class Eagle3Drafter(nnx.Module):
    """Parameters and the vocabulary maps; the drafter's KV cache goes in and comes out."""

    remat = False  # training: recompute each TTT step's layer in the backward (``train.remat``; static)

    def __init__(self, cfg: Eagle3Config, *, dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_cfg = cfg.layers
        self.attention_impl = dispatch.check_impl(attention_impl)
        d, lc = cfg.hidden_size, cfg.layers
        self.embed_tokens = normal(rngs, (cfg.vocab_size, d), dtype)
        self.fc = Linear(len(cfg.target_layer_ids) * d, d, bias=False, dtype=dtype, rngs=rngs)
        self.embed_norm = RMSNorm(d, lc.rms_norm_eps, dtype)
        self.layers = nnx.List([DecoderLayer(lc, LLAMA_LAYER, dtype=dtype, rngs=rngs)])
        attn = self.layers[0].self_attn  # q/k/v read [embed ; hidden]: 2·D wide
        attn.q_proj = Linear(2 * d, lc.num_heads * lc.head_dim, bias=False, dtype=dtype, rngs=rngs)
        attn.k_proj = Linear(2 * d, lc.num_kv_heads * lc.head_dim, bias=False, dtype=dtype, rngs=rngs)
        attn.v_proj = Linear(2 * d, lc.num_kv_heads * lc.head_dim, bias=False, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(d, lc.rms_norm_eps, dtype)
        self.lm_head = Linear(d, cfg.draft_vocab_size, bias=False, dtype=dtype, rngs=rngs)
        d2t, t2d = vocab_map(np.zeros(cfg.vocab_size), cfg.draft_vocab_size)  # the first W ids until trained
        self.d2t = VocabMap(jnp.asarray(d2t, jnp.int32))
        self.t2d = VocabMap(jnp.asarray(t2d))

    @property
    def layer(self) -> DecoderLayer:
        return self.layers[0]

    def set_vocab_map(self, d2t_W: np.ndarray, t2d_V: np.ndarray) -> None:
        check_vocab_map(d2t_W, t2d_V)
        self.d2t[...] = jnp.asarray(d2t_W, jnp.int32)
        self.t2d[...] = jnp.asarray(t2d_V, bool)

    # ------------------------------------------------------------------ pieces
    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def project(self, feats_BTnD: jax.Array) -> jax.Array:
        """``fc`` of the concatenated target features: the hidden input of a row fed by the target."""
        return self.fc(feats_BTnD.astype(self.fc.kernel[...].dtype))

    def draft_ids(self) -> jax.Array:
        """``[W]``: the target id of each draft id."""
        return jnp.arange(self.cfg.draft_vocab_size, dtype=jnp.int32) + self.d2t[...]

    def head(self, prenorm_BTD: jax.Array) -> jax.Array:
        """float32 logits over the draft vocabulary ``[..., W]``."""
        return self.lm_head(self.norm(prenorm_BTD)).astype(jnp.float32)

    def target_logits(self, prenorm_BTD: jax.Array) -> jax.Array:
        """float32 logits over the target vocabulary ``[..., V]``: -inf outside the draft vocabulary."""
        w = self.head(prenorm_BTD)
        full = jnp.full((*w.shape[:-1], self.cfg.vocab_size), -jnp.inf, jnp.float32)
        return full.at[..., self.draft_ids()].set(w)

    def rows(self, emb_BTD: jax.Array, hidden_BTD: jax.Array, attend_fn: Any) -> tuple[jax.Array, Any]:
        """The layer over rows ``(embedding, hidden)``; ``attend_fn(x2_BT2D) -> (out, aux)`` is the
        attention over the 2·D wide input. Returns the pre-norm output (fed back) and ``aux``."""
        emb = self.embed_norm(emb_BTD.astype(hidden_BTD.dtype))
        return self.layer(hidden_BTD, lambda h_norm: attend_fn(jnp.concatenate([emb, h_norm], axis=-1)))

    # ------------------------------------------------------------------ inference: own KV cache
    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
        return init_cache(self.layer_cfg, batch, max_len, dtype)

    def extend(self, cache: Cache, emb_BTD: jax.Array, hidden_BTD: jax.Array, positions_BT: jax.Array,
               new_lengths_B: jax.Array) -> tuple[jax.Array, Cache]:
        """Rows at slots ``[len, len+T)`` (causal among themselves, after the cached ones); returns
        their pre-norm outputs and the cache with ``new_lengths`` visible (the rest is overwritten)."""
        t = positions_BT.shape[1]
        ctx = Context(positions_BT, causal_mask(t), self.layer_cfg.rope, self.attention_impl,
                      lengths_B=cache.lengths, max_len=cache.max_len)
        attn = self.layer.self_attn
        out, state = self.rows(emb_BTD, hidden_BTD, lambda x2: attn(x2, ctx=ctx, state=cache.layers[0]))
        return out, Cache(layers=(state,), lengths=new_lengths_B.astype(jnp.int32), max_len=cache.max_len)

    def scratch_rows(self, cache: Cache, emb_BTD: jax.Array, hidden_BTD: jax.Array, positions_BT: jax.Array,
                     scratch: tuple[jax.Array, jax.Array], sees_BTR: jax.Array
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Rows that never enter the cache (tree nodes): each sees the cached slots ``< len`` and the
        scratch rows ``sees_BTR`` allows over ``R = scratch rows + T`` (these rows appended last).
        Returns the pre-norm outputs and the scratch K/V with these rows appended."""
        attn = self.layer.self_attn
        cos, sin = rope_cos_sin(self.layer_cfg, positions_BT)

        def mix(x2):
            q = attn.q(x2, cos, sin)
            k_new, v_new = attn.kv(x2, cos, sin)
            k_s, v_s = (jnp.concatenate([s, n.astype(s.dtype)], axis=1)
                        for s, n in zip(scratch, (k_new, v_new), strict=True))
            state = cache.layers[0]
            prefix_BS = jnp.arange(cache.max_len)[None] < cache.lengths[:, None]
            prefix_BTS = jnp.broadcast_to(prefix_BS[:, None], (*sees_BTR.shape[:2], cache.max_len))
            mask = jnp.concatenate([prefix_BTS, sees_BTR], axis=-1)
            out = attend(q, jnp.concatenate([state.k, k_s.astype(state.k.dtype)], axis=1),
                         jnp.concatenate([state.v, v_s.astype(state.v.dtype)], axis=1), mask)
            return attn.output(out), (k_s, v_s)

        return self.rows(emb_BTD, hidden_BTD, mix)

    # ------------------------------------------------------------------ training: TTT
    def ttt_forward(self, feats_BSnD: jax.Array, tokens_BS: jax.Array, positions_BS: jax.Array,
                    segment_ids_BS: jax.Array, steps: int, chunk: int = DEFAULT_CHUNK) -> list[jax.Array]:
        """Pre-norm outputs ``[B, S, D]`` of ``steps`` training-time-test steps over packed rows.

        Step ``i``, row ``t``: the embedding of token ``t+1+i`` (the data's), the hidden input
        ``fc(features_t)`` (step 0) or step ``i-1``'s output at ``t``, RoPE position ``pos_t + i``;
        it sees step 0's rows ``s <= t`` of its document and its own earlier steps at ``t`` -- what
        the engine computes when it drafts ``i`` tokens after row ``t`` (``extend`` + chained steps).
        Attention runs ``chunk`` query rows at a time (``ttt_attention``); with ``remat`` each step's
        layer is recomputed in the backward, so only its inputs and keys stay between the steps.
        """
        attn = self.layer.self_attn
        nxt = lambda x, i: jnp.pad(x[:, i:], ((0, 0), (0, i)))  # noqa: E731  x[t + i], 0 past the end

        def step(hidden_BSD, emb_BSD, cos, sin, earlier):
            def mix(x2):
                q = attn.q(x2, cos, sin)
                k, v = attn.kv(x2, cos, sin)
                return attn.output(ttt_attention(q, (*earlier, (k, v)), segment_ids_BS, chunk)), (k, v)

            return self.rows(emb_BSD, hidden_BSD, mix)

        step = jax.checkpoint(step) if self.remat else step
        hidden = self.project(feats_BSnD)
        earlier: tuple[tuple[jax.Array, jax.Array], ...] = ()
        outs = []
        for i in range(steps):
            cos, sin = rope_cos_sin(self.layer_cfg, positions_BS + i)
            hidden, kv = step(hidden, self.embed(nxt(tokens_BS, 1 + i)), cos, sin, earlier)
            earlier = (*earlier, kv)
            outs.append(hidden)
        return outs


def seq_map(body: Callable[..., Any], xs: Any, seq_len: int, chunk: int, *, remat: bool) -> Any:
    """``body(start, xs_chunk)`` over ``chunk`` rows of the sequence at a time, in a ``lax.scan``.

    ``xs``: a tree of ``[B, S, ...]`` arrays, handed to ``body`` as ``[B, c, ...]`` chunks (the last
    zero-padded) with ``start`` the chunk's first row; the outputs ``[B, c, ...]`` come back as
    ``[B, S, ...]``. With ``remat`` the body is ``jax.checkpoint``-ed: the backward recomputes one
    chunk at a time, so no ``[B, S, ...]`` intermediate of the body is ever kept whole.
    """
    if chunk < 1:
        raise ConfigError(f"train.loss_chunk must be >= 1, got {chunk}")
    c = min(chunk, seq_len)
    n = -(-seq_len // c)

    def split(x: jax.Array) -> jax.Array:  # [B, S, ...] -> [n, B, c, ...]
        x = jnp.pad(x, [(0, 0), (0, n * c - seq_len)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], n, c, *x.shape[2:]), 0, 1)

    def merge(y: jax.Array) -> jax.Array:  # [n, B, c, ...] -> [B, S, ...]
        y = jnp.swapaxes(y, 0, 1)
        return y.reshape(y.shape[0], n * c, *y.shape[3:])[:, :seq_len]

    f = jax.checkpoint(body) if remat else body
    _, ys = jax.lax.scan(lambda _, a: (None, f(*a)), None, (jnp.arange(n) * c, jax.tree.map(split, xs)))
    return jax.tree.map(merge, ys)


def ttt_attention(q_BSNH: jax.Array, keys: tuple[tuple[jax.Array, jax.Array], ...], segment_ids_BS: jax.Array,
                  chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Attention of TTT step ``J = len(keys) - 1``: over step 0's keys (causal, same document) and
    over every later step's key at the query's own row (the "diagonal"), one softmax in float32.
    ``[B, S, N*H]``. ``chunk`` query rows at a time, rematerialised (``seq_map``): scores
    ``[B, N, chunk, S]``, never ``[B, N, S, S]``; each row's values are the dense form's.
    ``dflash.attention.attend`` over the concatenated keys is its reference (tests)."""
    b, s, n, h = q_BSNH.shape
    (k0, v0), later = keys[0], keys[1:]
    kh = k0.shape[2]
    k0_f, v0_f = k0.astype(jnp.float32), v0.astype(jnp.float32)
    scale = h ** -0.5

    def one(start, xs):
        q_BcNH, seg_Bc, later_c = xs
        c = q_BcNH.shape[1]
        q = q_BcNH.reshape(b, c, kh, n // kh, h).astype(jnp.float32)
        s0 = jnp.einsum("BTKGH,BSKH->BKGTS", q, k0_f) * scale
        s0 = jnp.where(doc_causal_mask(seg_Bc, segment_ids_BS, start)[:, None, None], s0, NEG_INF)
        diag = [jnp.einsum("BTKGH,BTKH->BKGT", q, k.astype(jnp.float32))[..., None] * scale
                for k, _ in later_c]
        probs = jax.nn.softmax(jnp.concatenate([s0, *diag], axis=-1), axis=-1)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :s], v0_f)
        for j, (_, v) in enumerate(later_c):
            p_BTKG1 = probs[..., s + j].transpose(0, 3, 1, 2)[..., None]
            out = out + p_BTKG1 * v.astype(jnp.float32)[:, :, :, None]
        return out.reshape(b, c, n * h).astype(q_BSNH.dtype)

    return seq_map(one, (q_BSNH, segment_ids_BS, later), s, chunk, remat=True)


def build_drafter(cfg: Eagle3Config, *, dtype: jnp.dtype = jnp.float32, seed: int = 0,
                  attention_impl: str = "auto") -> Eagle3Drafter:
    return Eagle3Drafter(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
