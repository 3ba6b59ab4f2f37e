"""Gemma 4's MTP assistant (``Gemma4AssistantForCausalLM``): a small Gemma 4 text model whose layers
own no keys or values — each reads the TARGET's cache (exact semantics: docs/design.md, "Gemma 4
assistant").

One step drafts the token after ``tok`` sitting at position ``p`` (the target has committed
``0 .. p-1``) from ``h``, the target's final-normed hidden state at ``p - 1`` (or the assistant's own
projected output of the previous step)::

    x = pre_projection([embed_target(tok) ; h])          # [2 D_target] -> [D]
    y = norm(layers(x))   # every layer: queries at position p over the target's committed keys and
                          # values of the last layer of its type that computes them (no causal
                          # block: the step has no keys of its own)
    logits = lm_head(y)   # or the centroid-masked head; h_next = post_projection(y)   # [D] -> [D_target]

The decoder layers are the project's one layer body (``DecoderLayer`` with the attention mixer's
``kv_reuse``: the target's keys and values go in through the pass's ``Context.shared_kv``). Sliding
layers: transformers masks the assistant with a bidirectional window over the keys handed to it
(``|0 - i| <= sliding_window`` on the key axis flipped), so a step sees the last ``sliding_window + 1``
committed keys; in our terms (query position minus key position ``< window``) that is a window of
``sliding_window + 2``. Shape letters: B rows, T queries, S cache slots, K kv heads, H head dim,
D width, V vocabulary, C centroids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.attention import attend, window_mask
from dflash.config import GEMMA4_TYPES, ModelConfig
from dflash.errors import ConfigError
from dflash.kernels import dispatch
from dflash.models.cache import Cache
from dflash.models.layers import Context, Linear, model_norm, normal, rope_tables
from dflash.models.transformer import DecoderLayer

DEFAULT_BLOCK_SIZE = 4  # anchor + 3 chained assistant steps per verify pass
ASSISTANT_TEXT = {
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "final_logit_softcapping": None,
}  # an assistant's text_config: none of these (transformers' validate_architecture), no soft-cap
REFUSED = (
    "hidden_size_per_layer_input",
    "enable_moe_block",
    "use_double_wide_mlp",
    "vocab_size_per_layer_input",
)  # transformers' validate_architecture: all must be 0 / False


def layer_type(spec: Any) -> str:
    """A Gemma 4 layer's type: sliding (it has a window) or full attention."""
    return GEMMA4_TYPES[not spec.mixer_option("window", 0)]


def producers(target: ModelConfig) -> dict[str, int]:
    """Per layer type, the target layer whose keys and values the assistant reads: the last layer of
    that type computing its own (the one that stores them for KV sharing, when the target shares)."""
    out = {}
    for i, spec in enumerate(target.layers):
        if spec.mixer == "attention" and not spec.mixer_option("kv_reuse", ""):
            out[layer_type(spec)] = i
    return out


@dataclasses.dataclass(frozen=True)
class AssistantConfig:
    """The assistant's own layers (every one ``kv_reuse`` of its type), the target width it reads
    and writes (``backbone_hidden_size``), its head (``num_centroids = 0``: the plain LM head) and
    how many chained steps a verify pass drafts (``block_size - 1``)."""

    layers: ModelConfig
    backbone_hidden_size: int
    tie_word_embeddings: bool = True
    num_centroids: int = 0
    centroid_top_k: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    mask_token_id: int | None = None  # an assistant has none (every token is a real token)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(
                f"drafter.block_size must be >= 2 (the anchor + at least one assistant step), "
                f"got {self.block_size}"
            )
        if self.num_centroids and (
            self.vocab_size % self.num_centroids or not 0 < self.centroid_top_k <= self.num_centroids
        ):
            raise ConfigError(
                f"config.json num_centroids={self.num_centroids} must divide vocab_size="
                f"{self.vocab_size} and centroid_intermediate_top_k={self.centroid_top_k} "
                "must be in 1..num_centroids"
            )

    hidden_size = property(lambda self: self.layers.hidden_size)
    vocab_size = property(lambda self: self.layers.vocab_size)
    num_layers = property(lambda self: self.layers.num_layers)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, block_size: int | None = None) -> AssistantConfig:
        """A ``gemma4_assistant`` ``config.json``: its ``text_config`` read as a Gemma 4 text model
        without sharing, then every layer turned into a reader of the target's KV of its type."""
        text = dict(hf.get("text_config") or {})
        if not text:
            raise ConfigError("config.json of a gemma4_assistant lacks text_config")
        for key in REFUSED:
            if text.get(key):
                raise ConfigError(
                    f"config.json text_config.{key}={text[key]!r}: a Gemma 4 assistant has "
                    "none (transformers refuses it too)"
                )
        base = ModelConfig.from_hf({**text, "model_type": "gemma4_text", "num_kv_shared_layers": 0})
        layers = []
        for spec in base.layers:
            opts = {k: v for k, v in dict(spec.mixer_options).items() if k != "kv_store"}
            opts["kv_reuse"] = layer_type(spec)
            if opts.get("window"):
                opts["window"] = int(opts["window"]) + 2  # module docstring: the bidirectional window
            layers.append(dataclasses.replace(spec, mixer_options=opts))
        ordered = bool(hf.get("use_ordered_embeddings"))
        return cls(
            layers=dataclasses.replace(base, layers=tuple(layers), final_logit_softcapping=0.0),
            backbone_hidden_size=int(hf.get("backbone_hidden_size", 1536)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            num_centroids=int(hf.get("num_centroids", 2048)) if ordered else 0,
            centroid_top_k=int(hf.get("centroid_intermediate_top_k", 32)) if ordered else 0,
            block_size=int(block_size or hf.get("dflash_block_size") or DEFAULT_BLOCK_SIZE),
        )

    @classmethod
    def for_target(cls, target: ModelConfig, *, num_layers: int, block_size: int = DEFAULT_BLOCK_SIZE
                   ) -> AssistantConfig:
        """A fresh assistant for a ``gemma4`` target that ships none: ``num_layers`` layers of the
        target's own spec (its width, heads, MLP, RoPE and window; sliding layers, then one full
        layer, which a Gemma 4 model always ends with), each reading the target's keys and values of
        its type; no per-layer inputs, experts or double-wide MLPs; the plain, tied LM head. Built
        through the ``config.json`` the export writes, so exporting and loading it give it back."""
        if target.model_type != "gemma4":
            raise ConfigError(f"a Gemma 4 assistant drafts for a gemma4 target, not {target.model_type!r}")
        if num_layers < 2:
            raise ConfigError(f"drafter.num_layers={num_layers}: a Gemma 4 assistant needs at least 2 layers "
                              "(sliding layers, then the full layer a Gemma 4 model ends with)")
        text = target.to_hf()
        made = producers(target)
        types = [GEMMA4_TYPES[0]] * (num_layers - 1) + [GEMMA4_TYPES[1]]
        text.pop("dflash_layers", None)
        shapes = {str(i): text["per_layer_config"][str(made[t])] for i, t in enumerate(types)}
        text.update(num_hidden_layers=num_layers, layer_types=types, per_layer_config=shapes)
        text.update(ASSISTANT_TEXT)
        return cls.from_hf({"text_config": text, "backbone_hidden_size": target.hidden_size},
                           block_size=block_size)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` ``Gemma4AssistantForCausalLM.save_pretrained`` writes for this assistant
        (``from_hf``'s inverse; ``dflash_block_size`` records the chain, which transformers ignores)."""
        layers = []
        for spec in self.layers.layers:
            opts = {k: v for k, v in dict(spec.mixer_options).items() if k != "kv_reuse"}
            if opts.get("window"):
                opts["window"] = int(opts["window"]) - 2  # module docstring: the bidirectional window
            layers.append(dataclasses.replace(spec, mixer_options=opts))
        text = dataclasses.replace(self.layers, layers=tuple(layers)).to_hf()
        for key in ("architectures", "torch_dtype", "dflash_layers"):
            text.pop(key, None)
        text.update(ASSISTANT_TEXT, num_kv_shared_layers=self.num_layers)
        hf: dict[str, Any] = {
            "architectures": ["Gemma4AssistantForCausalLM"],
            "model_type": "gemma4_assistant",
            "text_config": text,
            "backbone_hidden_size": self.backbone_hidden_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_ordered_embeddings": bool(self.num_centroids),
            "dflash_block_size": self.block_size,
        }
        if self.num_centroids:
            hf.update(num_centroids=self.num_centroids, centroid_intermediate_top_k=self.centroid_top_k)
        return hf

    def check_target(self, target: ModelConfig) -> None:
        """The assistant reads ``target``'s embeddings, hidden states and keys and values: widths,
        vocabulary and, per layer type, the kv heads and head dim must be the target's."""
        if target.model_type != "gemma4":
            raise ConfigError(f"a Gemma 4 assistant drafts for a gemma4 target, not {target.model_type!r}")
        for name, ours, theirs in (
            ("backbone_hidden_size", self.backbone_hidden_size, target.hidden_size),
            ("vocab_size", self.vocab_size, target.vocab_size),
        ):
            if ours != theirs:
                raise ConfigError(f"the assistant's {name}={ours}, but the target's is {theirs}")
        made = producers(target)
        for i, spec in enumerate(self.layers.layers):
            kind = layer_type(spec)
            if kind not in made:
                raise ConfigError(
                    f"assistant layer {i} reads the target's {kind} keys and values; the target "
                    "has no such layer"
                )
            theirs = target.layers[made[kind]]
            shape = [
                (s.mixer_option("kv_heads", 0) or c.num_kv_heads, s.mixer_option("head_dim", 0) or c.head_dim)
                for s, c in ((spec, self.layers), (theirs, target))
            ]
            if shape[0] != shape[1]:
                raise ConfigError(
                    f"assistant layer {i} ({kind}) expects (kv heads, head dim) {shape[0]}, but the "
                    f"target's layer {made[kind]} has {shape[1]}"
                )


class TokenOrdering(nnx.Variable):
    """The centroid head's ``token_ordering`` (int32 ``[V]``): a buffer, not a trained parameter."""


class Gemma4Assistant(nnx.Module):
    """Parameters only; the target's cache goes in, nothing of the assistant's own is cached."""

    def __init__(
        self,
        cfg: AssistantConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        attention_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        # auto | pallas | reference (dflash.kernels.dispatch): a static attribute, part of the graphdef.
        self.attention_impl = dispatch.check_impl(attention_impl)
        lc, d, db = cfg.layers, cfg.hidden_size, cfg.backbone_hidden_size
        self.pre_projection = Linear(2 * db, d, bias=False, dtype=dtype, rngs=rngs)
        self.post_projection = Linear(d, db, bias=False, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(lc, spec, dtype=dtype, rngs=rngs) for spec in lc.layers])
        self.norm = model_norm(lc, d, dtype)
        self.embed_tokens = normal(rngs, (cfg.vocab_size, d), dtype)  # the LM head when tied
        self.lm_head = None if cfg.tie_word_embeddings else normal(rngs, (d, cfg.vocab_size), dtype)
        c = cfg.num_centroids
        self.centroids = Linear(d, c, bias=False, dtype=dtype, rngs=rngs) if c else None
        self.token_ordering = TokenOrdering(jnp.arange(cfg.vocab_size, dtype=jnp.int32)) if c else None

    def target_kv(self, target: ModelConfig, cache: Cache) -> dict[str, tuple[jax.Array, jax.Array]]:
        """The target cache's keys and values ``[B, S, K, H]`` each layer type reads."""
        made = producers(target)
        return {
            kind: (cache.layers[made[kind]].k, cache.layers[made[kind]].v)
            for kind in {layer_type(spec) for spec in self.cfg.layers.layers}
        }

    def __call__(
        self,
        emb_BTD: jax.Array,
        hidden_BTD: jax.Array,
        positions_BT: jax.Array,
        kv: dict[str, tuple[jax.Array, jax.Array]],
        lengths_B: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """T independent steps (each query sees the ``lengths_B`` committed slots of ``kv`` only, none of
        the others) -> (the normed output ``[B, T, D]`` the head reads, the next step's hidden state
        ``[B, T, D_target]``)."""
        dtype = self.pre_projection.kernel[...].dtype
        x = self.pre_projection(jnp.concatenate([emb_BTD.astype(dtype), hidden_BTD.astype(dtype)], axis=-1))
        t = x.shape[1]
        slots = next(iter(kv.values()))[0].shape[1]
        ctx = Context(
            positions_BT,
            jnp.zeros((t, t), bool),
            self.cfg.layers.rope,
            self.attention_impl,
            lengths_B=lengths_B,
            max_len=slots,
        )
        ctx.shared_kv.update({kind: (k, v, k, v, True) for kind, (k, v) in kv.items()})
        for decoder in self.layers:
            x, _ = decoder(x, lambda h, decoder=decoder: decoder.mixer(h, ctx=ctx, state=None))
        y = self.norm(x)
        return y, self.post_projection(y)

    def at_anchors(
        self,
        emb_BAD: jax.Array,
        hidden_BAD: jax.Array,
        positions_BA: jax.Array,
        kv: dict[str, tuple[jax.Array, jax.Array]],
        visible_BAS: jax.Array,
        key_positions_BS: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """``__call__``'s step for training: the A queries of a row at ``positions_BA`` see the keys
        ``visible_BAS`` allows (the row's own keys before each query, in its document) and, in a
        sliding layer, only those ``window`` positions back (``key_positions_BS``: the keys'
        positions). Dense ``attend`` over ``[A, S]``, the op the engine's step reduces to."""
        dtype = self.pre_projection.kernel[...].dtype
        x = self.pre_projection(jnp.concatenate([emb_BAD.astype(dtype), hidden_BAD.astype(dtype)], axis=-1))
        tables: dict[Any, tuple[jax.Array, jax.Array]] = {}

        def mix(h_BAD: jax.Array, attn: Any) -> tuple[jax.Array, None]:
            rope = attn.rope or self.cfg.layers.rope
            if (attn.rotary_dim, rope) not in tables:
                tables[attn.rotary_dim, rope] = rope_tables(rope, attn.rotary_dim, positions_BA)
            q, gate = attn.queries(h_BAD, *tables[attn.rotary_dim, rope])
            mask = visible_BAS
            if attn.window:
                mask = mask & window_mask(positions_BA, key_positions_BS, attn.window)
            k, v = kv[attn.kv_reuse]
            return attn.output(attend(q, k, v, mask, attn.sink_logits()), gate), None

        for decoder in self.layers:
            x, _ = decoder(x, lambda h, attn=decoder.mixer: mix(h, attn))
        y = self.norm(x)
        return y, self.post_projection(y)

    def head_table(self) -> jax.Array:
        """The LM head as ``[V, D]`` (the tied embedding, or ``lm_head`` transposed)."""
        return self.embed_tokens[...] if self.lm_head is None else self.lm_head[...].T

    def logits(self, y_BTD: jax.Array) -> jax.Array:
        """``[B, T, V]`` float32: the LM head, or the centroid-masked head (only the tokens of the
        ``centroid_top_k`` best centroids get logits; the others -inf, where transformers writes the
        smallest selected logit of the batch minus one: the same argmax and the same top-k)."""
        table = self.head_table()
        if self.centroids is None:
            return jnp.einsum("btd,vd->btv", y_BTD, table, preferred_element_type=jnp.float32)
        b, t, _ = y_BTD.shape
        c, v = self.cfg.num_centroids, self.cfg.vocab_size
        _, top_BTk = jax.lax.top_k(self.centroids(y_BTD), self.cfg.centroid_top_k)
        clusters = self.token_ordering[...].reshape(c, v // c)
        tokens_BTn = clusters[top_BTk].reshape(b, t, -1)  # the chosen centroids' tokens
        picked = jnp.einsum("btd,btnd->btn", y_BTD, table[tokens_BTn], preferred_element_type=jnp.float32)
        rows = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
        return jnp.full((b, t, v), -jnp.inf, jnp.float32).at[(*rows, tokens_BTn)].set(picked)


def build_assistant(
    cfg: AssistantConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0, attention_impl: str = "auto"
) -> Gemma4Assistant:
    return Gemma4Assistant(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
