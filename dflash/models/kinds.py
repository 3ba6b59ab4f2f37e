"""The layer kinds: one registry of *mixer* kinds (attention, ...) and one of *MLP* kinds (dense, ...).

A decoder layer is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (``transformer.DecoderLayer``);
``ModelConfig.layers`` names each layer's mixer and MLP kind with their options
(``dflash.config.LayerSpec``). A kind is registered once with everything the rest of the
package needs to know about it:

- the module that computes it (built as ``module(cfg, spec, dtype=..., rngs=...)``; a mixer is
  called as ``mixer(h, ctx=..., state=...) -> (out, state)`` with the pass's ``Context``, an MLP
  as ``mlp(h) -> out``);
- the options it accepts, with their defaults (anything else in a config is an error);
- its weight rows: Hugging Face tensor names <-> parameter paths (``WeightRow``), read by
  loading and saving alike;
- its sharding rows (parameter path regex -> logical axes), added to ``dflash.sharding.RULES``;
- its FLOPs per token (``flops(cfg, spec, rows, keys)``: forward FLOPs of ``rows`` tokens, each
  seeing ``keys`` keys; the plans and ``dflash.flops`` add them up);
- a mixer's cache state (``state(cfg, spec, batch, max_len, dtype)``: a ``cache.LayerState``,
  or None for a mixer that keeps nothing between passes).

Adding a kind is one module that calls ``register_mixer`` / ``register_mlp``; nothing else
changes (``tests/test_seams.py`` proves it with kinds defined only in the test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.config import FAMILIES, LayerSpec, ModelConfig
from dflash.errors import CacheOverflowError, ConfigError
from dflash.models.cache import Cache
from dflash.sharding import register_rules


@dataclasses.dataclass(frozen=True)
class WeightRow:
    """One tensor of a Hugging Face checkpoint and the parameter it fills.

    ``transpose``: HF stores ``[..., out, in]``, we ``[..., in, out]`` (the last two axes swap).
    ``experts > 0``: ``hf`` contains ``{e}`` and the parameter is the ``experts`` tensors
    ``e = 0..experts-1`` stacked on axis 0, as per-expert checkpoints store a mixture of experts.
    ``part = (i, n)``: the HF tensor's ``out`` axis holds ``n`` parameters side by side and this
    one is the ``i``-th (a fused ``gate_up_proj``); ``interleaved``: they alternate column by
    column instead (this one: columns ``i::n``, gpt-oss). ``cols = (lo, hi, every)``: a fused tensor
    made of groups of ``every`` columns, this parameter taking columns ``[lo, hi)`` of each group,
    group after group (Qwen3-Next's ``in_proj_qkvz`` per key-head group; one group: a block of
    columns of any width, Qwen3.5's ``in_proj_qkv``). ``axis``: the HF tensor's axis holding the
    parts when it is not the ``out`` axis (``conv1d.weight [C, 1, K]``: 0; not with ``transpose``).
    ``alternative``: the row to read instead when
    the checkpoint lacks this row's tensors (another layout of the same parameter); saving always
    writes this row's layout.
    """

    hf: str
    ours: str
    transpose: bool = False
    experts: int = 0
    part: tuple[int, int] = (0, 1)
    interleaved: bool = False
    alternative: WeightRow | None = None
    cols: tuple[int, int, int] | None = None
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.axis is not None and self.transpose:
            raise ConfigError(f"weight row {self.hf!r}: axis and transpose do not combine")

    def prefixed(self, hf: str, ours: str) -> WeightRow:
        alt = self.alternative.prefixed(hf, ours) if self.alternative else None
        return dataclasses.replace(self, hf=hf + self.hf, ours=ours + self.ours, alternative=alt)

    def hf_keys(self) -> list[str]:
        return [self.hf.format(e=e) for e in range(self.experts)] if self.experts else [self.hf]

    def file_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each HF tensor of this row for a parameter of ``shape``."""
        each = list(shape[1:] if self.experts else shape)
        if self.transpose:
            each[-2:] = each[-2:][::-1]
        each[self.out_axis] = self.fused_width(each[self.out_axis])
        return tuple(each)

    @property
    def out_axis(self) -> int:
        """Our ``out`` axis (the last, or ``axis``) in the HF tensor."""
        return self.axis if self.axis is not None else -2 if self.transpose else -1

    @property
    def our_axis(self) -> int:
        """The axis of our parameter that the parts run along."""
        return self.axis if self.axis is not None else -1

    @property
    def fused(self) -> bool:
        """The HF tensor holds other parameters beside this one."""
        return self.part[1] > 1 or self.cols is not None

    def fused_width(self, width: int) -> int:
        """The HF tensor's width on ``out_axis`` for ``width`` columns of ours."""
        if self.cols is None:
            return width * self.part[1]
        lo, hi, every = self.cols
        return width // (hi - lo) * every

    def columns(self, width: int) -> np.ndarray:
        """The HF column (on ``out_axis``) of each of our ``width`` columns, increasing."""
        c = np.arange(width)
        if self.cols is None:
            i, n = self.part
            return c * n + i if self.interleaved else c + i * width
        lo, hi, every = self.cols
        if width % (hi - lo):
            raise ConfigError(f"weight row {self.hf!r}: {width} columns are not whole groups of {hi - lo}")
        return (c // (hi - lo)) * every + lo + c % (hi - lo)


Rows = Callable[[ModelConfig, LayerSpec], tuple[WeightRow, ...]]
Flops = Callable[[ModelConfig, LayerSpec, int, float], float]


@dataclasses.dataclass(frozen=True)
class MixerKind:
    name: str
    module: Callable[..., nnx.Module]
    attr: str  # the mixer's attribute in a layer, as HF names it (``self_attn``)
    options: Mapping[str, Any]
    weights: Rows  # relative to the mixer (``q_proj.weight``)
    sharding: tuple[tuple[str, tuple[str | None, ...]], ...]
    flops: Flops  # forward FLOPs of ``rows`` tokens each seeing ``keys`` keys (projections included)
    state: Callable[[ModelConfig, LayerSpec, int, int, Any], Any]


@dataclasses.dataclass(frozen=True)
class MLPKind:
    name: str
    module: Callable[..., nnx.Module]
    options: Mapping[str, Any]
    weights: Rows  # relative to the MLP (``gate_proj.weight``)
    sharding: tuple[tuple[str, tuple[str | None, ...]], ...]
    flops: Callable[[ModelConfig, LayerSpec, int], float]  # forward FLOPs of ``rows`` tokens
    # Parameters a pass over ``rows`` tokens leaves unread (a mixture's experts no token is routed
    # to; dflash.flops.params_read); None: it reads all of them.
    unread: Callable[[ModelConfig, LayerSpec, int], float] | None = None
    # Where its HF tensors live relative to the layer (Gemma 4's expert block: beside ``mlp.``).
    hf_prefix: Callable[[LayerSpec], str] = lambda spec: "mlp."


MIXERS: dict[str, MixerKind] = {}
MLPS: dict[str, MLPKind] = {}


def register_mixer(kind: MixerKind) -> MixerKind:
    MIXERS[kind.name] = kind
    register_rules(kind.sharding)
    return kind


def register_mlp(kind: MLPKind) -> MLPKind:
    MLPS[kind.name] = kind
    register_rules(kind.sharding)
    return kind


def mixer_kind(spec: LayerSpec) -> MixerKind:
    if spec.mixer not in MIXERS:
        raise ConfigError(f"unknown mixer kind {spec.mixer!r}; registered: {', '.join(sorted(MIXERS))}")
    return MIXERS[spec.mixer]


def mlp_kind(spec: LayerSpec) -> MLPKind:
    if spec.mlp not in MLPS:
        raise ConfigError(f"unknown MLP kind {spec.mlp!r}; registered: {', '.join(sorted(MLPS))}")
    return MLPS[spec.mlp]


def option(spec: LayerSpec, name: str) -> Any:
    """A mixer option of ``spec``, its kind's default when unset."""
    return dict(spec.mixer_options).get(name, mixer_kind(spec).options[name])


def mlp_option(spec: LayerSpec, name: str) -> Any:
    return dict(spec.mlp_options).get(name, mlp_kind(spec).options[name])


def check(cfg: ModelConfig) -> ModelConfig:
    """Every layer's kinds are registered and their options known: a clear error otherwise."""
    for i, spec in enumerate(cfg.layers):
        for kind, given, what in ((mixer_kind(spec), spec.mixer_options, "mixer"),
                                  (mlp_kind(spec), spec.mlp_options, "MLP")):
            unknown = sorted(set(dict(given)) - set(kind.options))
            if unknown:
                raise ConfigError(f"layer {i}: {what} kind {kind.name!r} has no option {unknown[0]!r} "
                                  f"(its options: {', '.join(sorted(kind.options)) or 'none'})")
    return cfg


def layer_weights(cfg: ModelConfig, i: int, prefix: str = "") -> tuple[WeightRow, ...]:
    """Weight rows of decoder layer ``i`` (HF keys under ``prefix``, e.g. ``model.``)."""
    spec = cfg.layer(i)
    mixer, mlp = mixer_kind(spec), mlp_kind(spec)
    at = f"layers.{i}."
    gemma: tuple[WeightRow, ...] = ()
    if FAMILIES[cfg.model_type].gemma:  # the Gemma body's norms, scalar and per-layer input (DecoderLayer)
        names = ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "layer_scalar"]
        if cfg.per_layer_input_size:
            names.append("post_per_layer_input_norm.weight")
        gemma = tuple(WeightRow(f"{prefix}{at}{n}", f"{at}{n}") for n in names) + tuple(
            WeightRow(f"{prefix}{at}{n}.weight", f"{at}{n}.kernel", transpose=True)
            for n in ("per_layer_input_gate", "per_layer_projection") if cfg.per_layer_input_size)
    return (*gemma, WeightRow(f"{prefix}{at}input_layernorm.weight", f"{at}input_layernorm.weight"),
            WeightRow(f"{prefix}{at}post_attention_layernorm.weight", f"{at}post_attention_layernorm.weight"),
            *(row.prefixed(f"{prefix}{at}{mixer.attr}.", f"{at}{mixer.attr}.") for row in mixer.weights(cfg,
                                                                                                        spec)),
            *(row.prefixed(f"{prefix}{at}{mlp.hf_prefix(spec)}", f"{at}mlp.")
              for row in mlp.weights(cfg, spec)))


def layer_flops(cfg: ModelConfig, i: int, rows: int, keys: float) -> float:
    """Forward FLOPs of layer ``i`` over ``rows`` tokens each seeing ``keys`` keys."""
    spec = cfg.layer(i)
    return mixer_kind(spec).flops(cfg, spec, rows, keys) + mlp_kind(spec).flops(cfg, spec, rows)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache: each layer's state as its mixer kind makes it, ``max_len`` slots per row."""
    if max_len <= 0:
        raise CacheOverflowError(f"max_len must be positive, got {max_len}")
    states = tuple(mixer_kind(spec).state(cfg, spec, batch, max_len, dtype) for spec in cfg.layers)
    return Cache(layers=states, lengths=jnp.zeros((batch,), jnp.int32), max_len=max_len)


def tree_blocker(cfg: ModelConfig) -> str | None:
    """The first layer whose cache state cannot commit a tree path (``LayerState.TREE``), described,
    or None. Reads the state classes from an abstract cache: nothing is allocated or compiled."""
    states = jax.eval_shape(lambda: init_cache(cfg, 1, 1)).layers
    for i, (spec, state) in enumerate(zip(cfg.layers, states, strict=True)):
        if state is not None and not type(state).TREE:
            return f"layer {i} is {spec.mixer} (its {type(state).__name__} cannot commit a tree path)"
    return None


def check_tree(cfg: ModelConfig) -> None:
    """Refuses tree verification on a target that cannot commit a tree path, in one line, up front."""
    if (blocker := tree_blocker(cfg)) is not None:
        raise ConfigError(f"tree verification (--tree-width, --ngram-branch, --dynamic-tree) is not "
                          f"available for this target: {blocker}; decode it with a chain (drop those "
                          "options)")
