"""Frozen, validated configuration dataclasses.

Architecture configs live here; experiment configs (training, inference) join them as
the pipeline grows. Every config validates itself in ``__post_init__`` so a bad value is
reported where it was made, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from dflash.errors import ConfigError

# Names of the dtypes a model can be loaded or computed in (configs and CLIs take these names).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_TYPES = ("default", "llama3", "yarn", "proportional")

def check_built_for(what: str, built: dict[str, int], target: ModelConfig) -> None:
    """A drafter runs only against a target of the shape it was built for: ``built`` maps target
    fields (``hidden_size``, ``num_layers`` ...) to the values it was built with."""
    for name, ours in built.items():
        theirs = getattr(target, name)
        if ours != theirs:
            raise ConfigError(f"{what} was built for a target with {name}={ours}, "
                              f"but this target has {name}={theirs}")


def check_block_drafter(name: str, layers: ModelConfig, *, block_size: int, mask_token_id: int) -> None:
    """Checks every block drafter shares (DFlash, Orthrus) on the ``layers`` it runs; ``name``
    prefixes its own fields."""
    if block_size < 2:
        raise ConfigError(f"drafter.block_size must be >= 2, got {block_size}")
    if layers.num_layers < 1:
        raise ConfigError(f"{name}.num_layers must be >= 1, got {layers.num_layers}")
    if not 0 <= mask_token_id < layers.vocab_size:
        raise ConfigError(f"drafter.mask_token_id={mask_token_id} is outside the vocabulary "
                          f"(0..{layers.vocab_size - 1})")
    if layers.num_heads % layers.num_kv_heads:
        raise ConfigError(f"{name}.num_heads must be a multiple of {name}.num_kv_heads")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` is ``default``, ``llama3`` or ``yarn``).

    llama3 reads ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``; YaRN reads ``factor``, ``beta_fast``, ``beta_slow``,
    ``truncate``, ``original_max_position_embeddings`` and scales cos and sin by
    ``attention_factor`` (0: derived from ``factor``, ``mscale`` and ``mscale_all_dim`` as
    transformers derives it). ``proportional`` (Gemma 4's full-attention layers) rotates only the
    first ``proportion * dim / 2`` frequency pairs of the whole head (exponents over the whole head
    width; the other pairs keep frequency 0, so they pass unrotated) and divides by ``factor``.
    Fields another type does not read stay at their defaults.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    proportion: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type={self.rope_type!r} is not supported (supported: "
                              f"{', '.join(map(repr, ROPE_TYPES))})")
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        """From a HF ``config.json``: ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
        ``rope_scaling`` (older files)."""
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":  # scaling fields are meaningless: keep them canonical
            return cls(theta=theta)
        if rope_type == "proportional":
            return cls(theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)),
                       proportion=float(params.get("partial_rotary_factor", 1.0)))
        original = int(params.get("original_max_position_embeddings",
                                  hf.get("max_position_embeddings", 8192)))
        if rope_type == "yarn":  # transformers' defaults (beta_fast / beta_slow: `or`, as it reads them)
            factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
            return cls(theta=theta, rope_type=rope_type, factor=float(factor),
                       original_max_position_embeddings=original,
                       beta_fast=float(params.get("beta_fast") or 32.0),
                       beta_slow=float(params.get("beta_slow") or 1.0),
                       truncate=bool(params.get("truncate", True)),
                       attention_factor=float(params.get("attention_factor") or 0.0),
                       mscale=float(params.get("mscale") or 0.0),
                       mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))
        return cls(
            theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
        )

    def scaling_to_hf(self) -> dict[str, Any]:
        """The ``rope_scaling`` / ``rope_parameters`` fields of this type (no ``rope_theta``)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type == "proportional":
            out["partial_rotary_factor"] = self.proportion
            out.update({"factor": self.factor} if self.factor != 1 else {})
        if self.rope_type == "llama3":
            out.update(factor=self.factor, low_freq_factor=self.low_freq_factor,
                       high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        elif self.rope_type == "yarn":
            out.update(factor=self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                       truncate=self.truncate,
                       original_max_position_embeddings=self.original_max_position_embeddings)
            out.update({k: getattr(self, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                        if getattr(self, k)})
        return out

    @property
    def attention_scale(self) -> float:
        """The factor YaRN applies to cos and sin (1 for the other types), as transformers computes it."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor:
            return self.attention_factor

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)


Option = tuple[str, bool | int | float | str]


def _options(value: Any, where: str) -> tuple[Option, ...]:
    """Kind options as a sorted tuple of ``(name, value)`` pairs: hashable, so a config stays static."""
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for name, v in items:
        if not isinstance(name, str) or not isinstance(v, bool | int | float | str):
            raise ConfigError(f"{where}: option {name!r}={v!r} must be a name and a bool, number or string")
        out.append((name, v))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is: a *mixer* kind and an *MLP* kind, each with its options.

    The kinds are keys of ``dflash.models.kinds`` (``attention``; ``dense``), which also say which
    options each accepts and their defaults (attention: ``qk_norm``, ``qkv_bias``, ``o_bias``,
    ``window``, ``sinks``, ``output_gate``, ``rotary_dim``; gdn: ``key_heads``, ``value_heads``,
    ``key_dim``, ``value_dim``, ``conv_kernel``, ``layout``; dense: ``bias``; moe: ``experts``,
    ``top_k``, ``router``, ``expert_bias``, ``activation``, ``shared_expert_size`` ...). Options are stored as
    sorted ``(name, value)`` pairs; pass a dict.
    """

    mixer: str = "attention"
    mlp: str = "dense"
    mixer_options: Any = ()
    mlp_options: Any = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer_options", _options(self.mixer_options, f"mixer {self.mixer!r}"))
        object.__setattr__(self, "mlp_options", _options(self.mlp_options, f"mlp {self.mlp!r}"))

    def mixer_option(self, name: str, default: Any = None) -> Any:
        return dict(self.mixer_options).get(name, default)

    def mlp_option(self, name: str, default: Any = None) -> Any:
        return dict(self.mlp_options).get(name, default)

    def to_json(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "mlp": self.mlp, "mixer_options": dict(self.mixer_options),
                "mlp_options": dict(self.mlp_options)}


@dataclasses.dataclass(frozen=True)
class Family:
    """A ``model_type`` we read: its HF architecture name and the layer every model of it has by
    default (Qwen3: q/k norm; Qwen2: q/k/v biases; Llama: biases as its config says; gpt-oss: sinks).
    ``zero_centred_norm``: its RMSNorms scale by ``1 + w`` (Qwen3-Next, Qwen3.5); ``hf_model_type``:
    the ``model_type`` ``to_hf`` writes (the text model's, when the family's checkpoints wrap it);
    ``drafter_model_type``: what a DFlash drafter for it records (its layers are Qwen3 layers; the
    published drafters for the hybrid families say ``qwen3``, and transformers' AutoConfig would
    read ``qwen3_5`` as the multimodal wrapper's config). ``gemma``: the Gemma 4 layer body (word
    embeddings times ``sqrt(D)``; sandwich norms: the attention's and the MLP's outputs normed
    before their residual adds; a per-layer ``layer_scalar``; norms scale in float32)."""

    architecture: str
    layer: LayerSpec
    zero_centred_norm: bool = False
    hf_model_type: str = ""
    drafter_model_type: str = ""
    gemma: bool = False


_GATED = LayerSpec(mixer_options={"qk_norm": True, "output_gate": True})  # Qwen3-Next's full attention
FAMILIES: dict[str, Family] = {
    "qwen3": Family("Qwen3ForCausalLM", LayerSpec(mixer_options={"qk_norm": True})),
    "qwen2": Family("Qwen2ForCausalLM", LayerSpec(mixer_options={"qkv_bias": True})),
    "llama": Family("LlamaForCausalLM", LayerSpec()),
    # Qwen3 attention; each layer's MLP a mixture of experts or dense as the config says (_moe_mlps).
    "qwen3_moe": Family("Qwen3MoeForCausalLM", LayerSpec(mixer_options={"qk_norm": True})),
    # Attention sinks and biases, windows on the layers layer_types slides; every MLP a mixture of
    # experts with gpt-oss routing, biases and clamped SwiGLU (_gpt_oss_mlps).
    "gpt_oss": Family("GptOssForCausalLM", LayerSpec(mixer_options={"sinks": True})),
    # Hybrid: layer_types names each layer's mixer, Gated DeltaNet ("gdn") or gated attention with
    # partial RoPE (_hybrid_layers); norms zero-centred. Qwen3-Next's MLPs are experts with a shared
    # expert (or dense, as Qwen3-MoE decides); Qwen3.5's dense; Qwen3.5-MoE's all experts.
    "qwen3_next": Family("Qwen3NextForCausalLM", _GATED, zero_centred_norm=True, drafter_model_type="qwen3"),
    "qwen3_5": Family("Qwen3_5ForCausalLM", _GATED, zero_centred_norm=True, hf_model_type="qwen3_5_text",
                      drafter_model_type="qwen3"),
    "qwen3_5_moe": Family("Qwen3_5MoeForCausalLM", _GATED, zero_centred_norm=True,
                          hf_model_type="qwen3_5_moe_text", drafter_model_type="qwen3"),
    # Gemma 4 text: q/k norms, unscaled v norm, attention scale 1, GeGLU; layer_types slide or not,
    # full layers with their own head shapes and proportional RoPE; KV sharing, per-layer inputs
    # (_gemma4_layers). Its DFlash drafters are Qwen3 layers recording model_type qwen3, as z-lab's
    # gemma-4 drafters do (their embedding scale and soft-cap go in dflash_config: dflash.drafters.dflash.hf).
    "gemma4": Family("Gemma4ForCausalLM", LayerSpec(mixer_options={"qk_norm": True, "v_norm": True,
                                                                   "scale": 1.0},
                                                    mlp_options={"activation": "gelu_tanh"}),
                     hf_model_type="gemma4_text", drafter_model_type="qwen3", gemma=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# model_types of the text models inside multimodal checkpoints, and the family each belongs to
# (``Qwen3_5ForConditionalGeneration`` nests a ``qwen3_5_text`` config as ``text_config``).
MODEL_TYPE_ALIASES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe", "gemma4_text": "gemma4"}
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
SHARED_EXPERT_FAMILIES = ("qwen3_next", "qwen3_5_moe")  # read shared_expert_intermediate_size
WINDOWED_FAMILIES = ("qwen3", "qwen2", "qwen3_moe")  # read use_sliding_window / sliding_window / layer_types
_HYBRID_DEFAULTS = {"head_dim": 256, "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
                    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                    "linear_num_value_heads": 32}
# The class defaults of a family's HF config that differ from the other families' (read when a
# config.json omits the key, as transformers fills it in).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt_oss": {"attention_bias": True, "sliding_window": 128, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
                "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 4096,
                                    "rope_theta": 150000.0}},
    # transformers' Qwen3NextConfig / Qwen3_5(Moe)TextConfig class defaults.
    "qwen3_next": {**_HYBRID_DEFAULTS, "num_key_value_heads": 2, "num_experts": 512,
                   "num_experts_per_tok": 10, "norm_topk_prob": True, "moe_intermediate_size": 512,
                   "shared_expert_intermediate_size": 512},
    "qwen3_5": {**_HYBRID_DEFAULTS, "num_key_value_heads": 4},
    "qwen3_5_moe": {**_HYBRID_DEFAULTS, "num_key_value_heads": 2, "num_experts": 256,
                    "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                    "shared_expert_intermediate_size": 512},
}
# transformers' Gemma4TextConfig class defaults (global_head_dim: what its __post_init__ assumes).
HF_DEFAULTS["gemma4"] = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "sliding_window": 512,
    "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256, "num_kv_shared_layers": 0,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}}}
# Config fields of mixture-of-experts designs we cannot build, each with what it asks for (shared
# experts: outside SHARED_EXPERT_FAMILIES).
UNSUPPORTED_FIELDS = {
    "n_group": "group-limited expert routing (DeepSeek-V3 / Kimi)",
    "topk_group": "group-limited expert routing (DeepSeek-V3 / Kimi)",
    "scoring_func": "sigmoid expert scoring (DeepSeek-V3 / Kimi)",
    "kv_lora_rank": "multi-head latent attention (DeepSeek MLA)",
    "q_lora_rank": "multi-head latent attention (DeepSeek MLA)",
    "n_shared_experts": "shared experts",
    "shared_expert_intermediate_size": "shared experts",
}
UNSUPPORTED_TYPES = {"deepseek_v3": "n_group", "deepseek_v2": "kv_lora_rank", "kimi_k2": "n_group"}
QUANT_METHODS = ("mxfp4",)  # quantization_config.quant_method values loading dequantises


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only target: sizes, RoPE, and one ``LayerSpec`` per layer.

    ``layers=()`` means every layer is the family's default (``FAMILIES[model_type].layer``);
    ``with_layers`` changes the depth of a uniform config.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    layers: tuple[LayerSpec, ...] = ()
    # RMSNorms (layers', final, q/k) scale by ``1 + w`` instead of ``w``; None: as the family does.
    zero_centred_norm: bool | None = None
    # Logits become ``c * tanh(logits / c)`` (Gemma's final_logit_softcapping); 0: not capped.
    final_logit_softcapping: float = 0.0
    # Gemma 4's per-layer inputs: a ``[per_layer_vocab_size, L * per_layer_input_size]`` embedding
    # and a projection of the word embedding, gated into every layer's output; 0: none.
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.zero_centred_norm is None:
            object.__setattr__(self, "zero_centred_norm", FAMILIES[self.model_type].zero_centred_norm)
        if not self.layers:
            object.__setattr__(self, "layers", (FAMILIES[self.model_type].layer,) * self.num_layers)
        if len(self.layers) != self.num_layers:
            raise ConfigError(f"{len(self.layers)} layer specs for num_layers={self.num_layers}")
        object.__setattr__(self, "layers", tuple(self.layers))

    def layer(self, i: int) -> LayerSpec:
        return self.layers[i]

    @property
    def uniform(self) -> bool:
        """Every layer is the family's default layer (what a plain HF config of the family describes)."""
        return all(spec == FAMILIES[self.model_type].layer for spec in self.layers)

    def with_layers(self, num_layers: int) -> ModelConfig:
        """The same architecture ``num_layers`` deep (a uniform config only)."""
        if len(set(self.layers)) != 1:
            raise ConfigError("with_layers needs a config whose layers are all alike")
        return dataclasses.replace(self, num_layers=num_layers, layers=(self.layers[0],) * num_layers)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Reads a Hugging Face ``config.json`` dict (old and new rope formats; a multimodal
        checkpoint's ``text_config``)."""
        hf = _text_config(hf)
        model_type = hf.get("model_type")
        _refuse_unsupported(hf)
        if model_type not in FAMILIES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        hf = _with_defaults(hf, model_type)
        if model_type == "gemma4":
            return _gemma4_config(hf)
        if hf.get("use_sliding_window") and model_type not in WINDOWED_FAMILIES:
            raise ConfigError(f"use_sliding_window=true is not supported for model_type {model_type!r} "
                              f"(sliding windows are read for {', '.join(WINDOWED_FAMILIES)})")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        if model_type == "qwen3_5_moe":  # no dense MLP: the shared expert's width stands in for one
            hf = {"intermediate_size": hf["shared_expert_intermediate_size"], **hf}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config.json lacks required key {key!r}")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            layers=_layers_from_hf(hf, model_type),
            zero_centred_norm=bool(hf.get("dflash_zero_centred_norm",
                                          FAMILIES[model_type].zero_centred_norm)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers`` reads back into this model.

        Layers other than the family's default are written as ``dflash_layers`` (one spec each),
        which ``from_hf`` reads back; ``transformers`` ignores the key.
        """
        rope: dict[str, Any] = {"rope_theta": self.rope.theta, **self.rope.scaling_to_hf()}
        eos: Any = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        first = self.layers[0]
        family = FAMILIES[self.model_type]
        out: dict[str, Any] = {
            "architectures": [family.architecture],
            "model_type": family.hf_model_type or self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_id else None,
            "torch_dtype": "float32",
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = bool(first.mixer_option("qkv_bias", False))
        if self.model_type == "llama":
            out["mlp_bias"] = bool(first.mlp_option("bias", False))
        if self.model_type in ("qwen3_moe", "qwen3_next", "qwen3_5_moe"):
            out.update(_moe_to_hf(self.layers))
        if self.model_type in HYBRID_FAMILIES:
            out.update(_hybrid_to_hf(self.layers, self.head_dim))
            rope["partial_rotary_factor"] = out["partial_rotary_factor"]
            first = next((spec for spec in self.layers if spec.mixer == "attention"), first)
            out["attention_bias"] = bool(first.mixer_option("qkv_bias", False))
        if self.zero_centred_norm != family.zero_centred_norm:  # read back by from_hf; transformers cannot
            out["dflash_zero_centred_norm"] = self.zero_centred_norm
        windows = {spec.mixer_option("window", 0) for spec in self.layers} - {0}
        types = ["sliding_attention" if spec.mixer_option("window", 0) else "full_attention"
                 for spec in self.layers]
        if len(windows) == 1 and self.model_type in WINDOWED_FAMILIES:  # HF's own sliding-window keys
            out.update(use_sliding_window=True, sliding_window=windows.pop(), layer_types=types)
        if self.model_type == "gpt_oss":
            out.update(_gpt_oss_to_hf(self.layers), layer_types=types,
                       sliding_window=min(windows) if windows else HF_DEFAULTS["gpt_oss"]["sliding_window"])
        if self.model_type == "gemma4":
            out = _gemma4_to_hf(self, out)
        if self.layers != _layers_from_hf({**out, "model_type": self.model_type}, self.model_type):
            out["dflash_layers"] = [spec.to_json() for spec in self.layers]
        return out

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Exact parameter count (embeddings counted once when tied), for attention or Gated
        DeltaNet mixers and dense or mixture-of-experts MLPs (``dflash.models.count_params`` counts
        any model)."""
        h = self.hidden_size
        gemma, ple = FAMILIES[self.model_type].gemma, self.per_layer_input_size
        total = 0
        for spec in self.layers:
            opt = spec.mixer_option
            head_dim = opt("head_dim", 0) or self.head_dim
            q, kv = self.num_heads * head_dim, (opt("kv_heads", 0) or self.num_kv_heads) * head_dim
            kv_projs = 0 if opt("kv_reuse", "") else 1 if opt("k_eq_v", False) else 2  # Gemma 4 KV sharing
            if spec.mixer == "gdn":  # in_proj (q, k, v, z, b, a), depthwise conv over q k v, A_log, dt_bias,
                kd = opt("key_heads") * opt("key_dim")  # gated norm, out_proj
                vd, nv = opt("value_heads") * opt("value_dim"), opt("value_heads")
                mixer = h * (2 * kd + 2 * vd + 2 * nv) + (2 * kd + vd) * opt("conv_kernel") + 2 * nv
                mixer += opt("value_dim") + vd * h
            else:
                mixer = h * q * (2 if opt("output_gate", False) else 1) + kv_projs * h * kv + q * h
                mixer += (q + kv_projs * kv) * bool(opt("qkv_bias", False)) + h * bool(opt("o_bias", False))
                mixer += (1 + bool(kv_projs)) * head_dim * bool(opt("qk_norm", False))
                mixer += self.num_heads * bool(opt("sinks", False))
            if spec.mlp == "moe":
                e = spec.mlp_option("experts")
                f = spec.mlp_option("intermediate_size") or self.intermediate_size
                mlp = h * e + e * 3 * h * f + e * bool(spec.mlp_option("router_bias", False))
                mlp += e * (2 * f + h) * bool(spec.mlp_option("expert_bias", False))
                mlp += 3 * h * spec.mlp_option("shared_expert_size", 0) + h * bool(
                    spec.mlp_option("shared_expert_gate", False))
                dense = spec.mlp_option("dense_size", 0)  # Gemma 4's block: dense MLP, router scales, 3 norms
                mlp += (3 * h * dense + h + e + 3 * h) if dense else 0
            else:
                f = spec.mlp_option("intermediate_size", 0) or self.intermediate_size
                mlp = 3 * h * f + (2 * f + h) * bool(spec.mlp_option("bias", False))
            # Gemma body: two more norms, the layer scalar, the per-layer input gate / projection / norm
            body = (2 * h + 1 + (2 * h * ple + h if ple else 0)) if gemma else 0
            total += mixer + mlp + 2 * h + body
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        per_layer = self.per_layer_vocab_size * self.num_layers * ple + h * self.num_layers * ple + ple
        return total + h + emb + (per_layer if ple else 0)


def _layers_from_hf(hf: dict[str, Any], model_type: str) -> tuple[LayerSpec, ...]:
    """One spec per layer: ``dflash_layers`` when written by ``to_hf``, else the family's default
    with the biases the config asks for (Llama's ``attention_bias`` / ``mlp_bias``)."""
    n = hf["num_hidden_layers"]
    if hf.get("dflash_layers") is not None:
        specs = hf["dflash_layers"]
        if not isinstance(specs, list) or len(specs) != n:
            raise ConfigError(f"config.json dflash_layers must list {n} layer specs")
        try:
            return tuple(LayerSpec(**spec) for spec in specs)
        except TypeError as err:
            raise ConfigError(f"config.json dflash_layers: {err}") from err
    spec = FAMILIES[model_type].layer
    attention_bias = bool(hf.get("attention_bias", False))
    mixer = dict(spec.mixer_options)
    if model_type != "qwen2" and attention_bias:
        mixer.update(qkv_bias=True, o_bias=True)
    mlp = {**dict(spec.mlp_options), **({"bias": True} if hf.get("mlp_bias") else {})}
    full = LayerSpec(spec.mixer, spec.mlp, mixer, mlp)
    if model_type in HYBRID_FAMILIES:
        return _hybrid_layers(hf, full, n)
    if model_type == "gemma4":
        return _gemma4_layers(hf, full, n)
    if model_type == "qwen3_moe":
        return _moe_mlps(hf, _attention_layers(hf, full, n))
    if model_type == "gpt_oss":
        return _gpt_oss_mlps(hf, _attention_layers(hf, full, n))
    return _attention_layers(hf, full, n)


def _attention_layers(hf: dict[str, Any], full: LayerSpec, n: int) -> tuple[LayerSpec, ...]:
    """``full`` on every layer, with the sliding window on the layers the config slides."""
    gpt_oss = hf["model_type"] == "gpt_oss"  # always windowed: layer_types, else every other layer
    if not (hf.get("use_sliding_window") or gpt_oss) or hf.get("sliding_window") is None:
        return (full,) * n
    # As transformers reads it: layer_types, else the layers from max_window_layers on slide
    # (gpt-oss: the even layers).
    types = hf.get("layer_types") or ["sliding_attention" if (i % 2 == 0 if gpt_oss else
                                                              i >= hf.get("max_window_layers", n)) else
                                      "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"config.json layer_types must list {n} of 'full_attention' / 'sliding_attention', "
                          f"got {types}")
    window = dataclasses.replace(full, mixer_options={**dict(full.mixer_options),
                                                      "window": int(hf["sliding_window"])})
    return tuple(window if t == "sliding_attention" else full for t in types)


LAYER_TYPES = ("linear_attention", "full_attention")  # what layer_types may name in a hybrid family
GDN_KEYS = {"key_heads": "linear_num_key_heads", "value_heads": "linear_num_value_heads",
            "key_dim": "linear_key_head_dim", "value_dim": "linear_value_head_dim",
            "conv_kernel": "linear_conv_kernel_dim"}  # gdn mixer option <- config.json key


def _hybrid_layers(hf: dict[str, Any], full: LayerSpec, n: int) -> tuple[LayerSpec, ...]:
    """Qwen3-Next / Qwen3.5: ``layer_types`` (default: every ``full_attention_interval``-th layer
    full, as transformers fills it in) picks Gated DeltaNet (``gdn``, the ``linear_*`` sizes) or
    ``full`` with RoPE on ``head_dim * partial_rotary_factor`` channels (Qwen3.5's M-RoPE sections
    all see the same position in a text model, so it is this RoPE); then the family's MLPs."""
    model_type = hf["model_type"]
    interval = hf.get("full_attention_interval", 4)
    types = hf.get("layer_types") or [LAYER_TYPES[(i + 1) % interval == 0] for i in range(n)]
    if len(types) != n or set(types) - set(LAYER_TYPES):
        raise ConfigError(f"config.json layer_types must list {n} of 'linear_attention' / 'full_attention', "
                          f"got {types}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rotary = int(head_dim * float(rope.get("partial_rotary_factor", hf["partial_rotary_factor"])))
    if not 0 < rotary <= head_dim or rotary % 2:
        raise ConfigError(f"config.json partial_rotary_factor gives {rotary} rotary channels of head_dim "
                          f"{head_dim}; an even number in 2..{head_dim} is needed")
    partial = {"rotary_dim": rotary} if rotary < head_dim else {}
    attention = dataclasses.replace(full, mixer_options={**dict(full.mixer_options), **partial})
    layout = "qwen3_next" if model_type == "qwen3_next" else "qwen3_5"
    linear = lambda: dataclasses.replace(full, mixer="gdn", mixer_options={  # noqa: E731
        "layout": layout, **{ours: int(hf[key]) for ours, key in GDN_KEYS.items()}})
    layers = tuple(attention if t == "full_attention" else linear() for t in types)
    if model_type == "qwen3_5_moe":  # every MLP a mixture; transformers always renormalises the top k
        every = {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
        return _moe_mlps({**hf, **every}, layers)
    return _moe_mlps(hf, layers) if model_type == "qwen3_next" else layers


def _hybrid_to_hf(layers: tuple[LayerSpec, ...], head_dim: int) -> dict[str, Any]:
    """The hybrid keys that describe ``layers``: layer_types, the first GDN layer's sizes, the
    first attention layer's partial_rotary_factor (anything else is left to ``dflash_layers``)."""
    out: dict[str, Any] = {"layer_types": [LAYER_TYPES[spec.mixer != "gdn"] for spec in layers]}
    gdn = next((dict(spec.mixer_options) for spec in layers if spec.mixer == "gdn"), {})
    if gdn:  # an option left to the kind's default: the default (the same as transformers' class default)
        out.update({key: gdn.get(ours, _HYBRID_DEFAULTS[key]) for ours, key in GDN_KEYS.items()})
    attention = next((spec for spec in layers if spec.mixer == "attention"), layers[0])
    out["partial_rotary_factor"] = (attention.mixer_option("rotary_dim", 0) or head_dim) / head_dim
    return out


MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


def _moe_mlps(hf: dict[str, Any], layers: tuple[LayerSpec, ...]) -> tuple[LayerSpec, ...]:
    """Qwen3-MoE / Qwen3-Next: layer ``i`` is sparse when ``(i + 1) % decoder_sparse_step == 0`` and
    ``i`` is not in ``mlp_only_layers`` (as transformers builds it); ``norm_topk_prob`` from the config."""
    hf = {k: v for k, v in {"num_experts": hf.get("num_local_experts"), **hf}.items() if v is not None}
    missing = [k for k in MOE_KEYS if k not in hf]  # (transformers 5 writes num_experts as num_local_experts)
    if missing:
        raise ConfigError(f"config.json lacks {missing[0]!r}, which a {hf['model_type']} model needs")
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"config.json decoder_sparse_step must be a positive int, got {step!r}")
    moe = {"experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
           "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
           "intermediate_size": hf["moe_intermediate_size"]}
    if hf["model_type"] in SHARED_EXPERT_FAMILIES:  # a shared expert, scaled by sigmoid(shared_expert_gate)
        moe.update(shared_expert_size=int(hf["shared_expert_intermediate_size"]), shared_expert_gate=True)
    sparse = lambda i: hf["num_experts"] > 0 and i not in dense and (i + 1) % step == 0  # noqa: E731
    return tuple(dataclasses.replace(spec, mlp="moe", mlp_options=moe) if sparse(i) else spec
                 for i, spec in enumerate(layers))


def _moe_to_hf(layers: tuple[LayerSpec, ...]) -> dict[str, Any]:
    """The Qwen3-MoE keys that describe ``layers`` (one expert shape; dense layers as
    ``mlp_only_layers``); anything else is left to ``dflash_layers``."""
    moe = [dict(spec.mlp_options) for spec in layers if spec.mlp == "moe"]
    if not moe:
        return {"num_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 1}
    first = moe[0]
    shared = ({"shared_expert_intermediate_size": first["shared_expert_size"]}
              if "shared_expert_size" in first else {})
    return {"num_experts": first["experts"], "num_experts_per_tok": first["top_k"],
            "moe_intermediate_size": first["intermediate_size"], **shared,
            "norm_topk_prob": bool(first.get("norm_topk_prob", False)), "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, spec in enumerate(layers) if spec.mlp != "moe"]}


def _gpt_oss_mlps(hf: dict[str, Any], layers: tuple[LayerSpec, ...]) -> tuple[LayerSpec, ...]:
    """gpt-oss: every layer's MLP a mixture of ``num_local_experts`` experts of width
    ``intermediate_size``: top-k on the router's logits (it has a bias), softmax over the k, experts
    with biases and the clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``)."""
    for key in ("num_local_experts", "num_experts_per_tok"):
        if key not in hf:
            raise ConfigError(f"config.json lacks {key!r}, which a gpt_oss model needs")
    moe = {"experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
           "intermediate_size": hf["intermediate_size"], "router": "topk_softmax", "router_bias": True,
           "expert_bias": True, "activation": "clamped_swiglu", "swiglu_limit": float(hf["swiglu_limit"]),
           "swiglu_alpha": float(hf["swiglu_alpha"]), "layout": "gpt_oss"}
    return tuple(dataclasses.replace(spec, mlp="moe", mlp_options=moe) for spec in layers)


def _gpt_oss_to_hf(layers: tuple[LayerSpec, ...]) -> dict[str, Any]:
    """The gpt-oss keys that describe ``layers`` (the first layer's experts; anything else is left to
    ``dflash_layers``)."""
    first = dict(layers[0].mlp_options)
    return {"num_local_experts": first.get("experts", 1), "num_experts_per_tok": first.get("top_k", 1),
            "swiglu_limit": first.get("swiglu_limit", 7.0), "swiglu_alpha": first.get("swiglu_alpha", 1.702)}


def _with_defaults(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``hf`` with its family's class defaults where it omits a key (or sets it to null); the
    default RoPE only when the file has neither ``rope_parameters`` nor ``rope_scaling``."""
    given = {k: v for k, v in hf.items() if v is not None}
    defaults = dict(HF_DEFAULTS.get(model_type, {}))
    if "rope_scaling" in given or "rope_parameters" in given:
        defaults.pop("rope_parameters", None)
    return {**defaults, **given}


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: a multimodal checkpoint's ``text_config`` under its family's name
    (with the wrapper's ``tie_word_embeddings``, which is what transformers ties its LM head by), or
    a text-only config whose ``model_type`` names the text model (``qwen3_5_text``)."""
    model_type = hf.get("model_type")
    if isinstance(hf.get("text_config"), Mapping) and model_type in FAMILIES:
        return {**hf["text_config"], "model_type": model_type,
                "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    if model_type in MODEL_TYPE_ALIASES:
        return {**hf, "model_type": MODEL_TYPE_ALIASES[model_type]}
    return hf


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    """A clear error naming the config field of a mixture-of-experts design (or a quantization)
    we cannot build (shared experts: only in the families that have them)."""
    model_type = hf.get("model_type")
    fields = [k for k in UNSUPPORTED_FIELDS if hf.get(k) not in (None, 0, "softmax")
              and not (k == "shared_expert_intermediate_size" and model_type in SHARED_EXPERT_FAMILIES)]
    if fields:
        raise ConfigError(f"config.json {fields[0]}={hf[fields[0]]!r} asks for "
                          f"{UNSUPPORTED_FIELDS[fields[0]]}, "
                          f"which is not supported (model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type in UNSUPPORTED_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}: it uses "
                          f"{UNSUPPORTED_FIELDS[UNSUPPORTED_TYPES[model_type]]} (config field "
                          f"{UNSUPPORTED_TYPES[model_type]!r}); supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant is not None and quant not in QUANT_METHODS:
        raise ConfigError(f"config.json quantization_config.quant_method={quant!r} is not supported (loading "
                          f"dequantises {', '.join(QUANT_METHODS)}; others must be dequantised first)")


GEMMA4_TYPES = ("sliding_attention", "full_attention")
# Gemma 4 fields whose values we cannot build: field -> (the value that is fine, what the others ask for).
GEMMA4_REFUSED = {
    "use_bidirectional_attention": (("vision", None), "bidirectional attention over all tokens"),
    "hidden_activation": (("gelu_pytorch_tanh",), "another MLP activation"),
}


def _gemma4_config(hf: dict[str, Any]) -> ModelConfig:
    """A ``gemma4_text`` config (transformers' class defaults filled in): the word embedding and the
    layers as ``_gemma4_layers`` reads them, the sliding layers' RoPE as the model's (the full
    layers' as their attention options), soft-capped logits, per-layer inputs."""
    for key, (fine, what) in GEMMA4_REFUSED.items():
        if hf.get(key) not in fine:
            raise ConfigError(f"config.json {key}={hf.get(key)!r} asks for {what}, which is not supported "
                              f"for gemma4 (supported: {fine[0]!r})")
    rope = _gemma4_rope(hf, "sliding_attention")
    eos = hf.get("eos_token_id")
    ple = int(hf.get("hidden_size_per_layer_input") or 0)
    return ModelConfig(
        model_type="gemma4", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
        rms_norm_eps=float(hf["rms_norm_eps"]), rope=rope,
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf["tie_word_embeddings"]), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),),
        layers=_layers_from_hf(hf, "gemma4"),
        final_logit_softcapping=float(hf.get("final_logit_softcapping") or 0.0),
        per_layer_input_size=ple, per_layer_vocab_size=int(hf["vocab_size_per_layer_input"]) if ple else 0)


def _gemma4_rope(hf: dict[str, Any], layer_type: str) -> RopeConfig:
    """The RoPE of one layer type (``rope_parameters`` holds one per type)."""
    params = (hf.get("rope_parameters") or {}).get(layer_type)
    if not isinstance(params, Mapping):
        raise ConfigError(f"config.json rope_parameters lacks {layer_type!r} (gemma4 keeps one RoPE per "
                          f"layer type: {', '.join(GEMMA4_TYPES)})")
    return RopeConfig.from_hf({"rope_parameters": dict(params)})


def _gemma4_layer_types(hf: dict[str, Any], n: int) -> list[str]:
    """``layer_types`` as transformers fills it in: every 6th layer full by default, the last always full."""
    types = list(hf.get("layer_types") or [GEMMA4_TYPES[(i + 1) % 6 == 0] for i in range(n)])
    if len(types) != n or set(types) - set(GEMMA4_TYPES):
        raise ConfigError(f"config.json layer_types must list {n} of {' / '.join(GEMMA4_TYPES)}, got {types}")
    types[-1] = "full_attention"
    return types


def _gemma4_layers(hf: dict[str, Any], base: LayerSpec, n: int) -> tuple[LayerSpec, ...]:
    """Gemma 4's layers as transformers builds them: sliding layers window ``sliding_window``; full
    layers take ``per_layer_config``'s head shape (else ``global_head_dim``, and
    ``num_global_key_value_heads`` when ``attention_k_eq_v``), their values equal to their keys
    (before the norms) when ``attention_k_eq_v``, and their type's RoPE where it is not the sliding
    one. ``num_kv_shared_layers``: the last that many layers reuse the keys and values of the last
    earlier layer of their type (which stores them, ``kv_store``) and, with
    ``use_double_wide_mlp``, have MLPs twice as wide."""
    types = _gemma4_layer_types(hf, n)
    per_layer = {int(k): v for k, v in (hf.get("per_layer_config") or {}).items() if str(k).isdigit()}
    shared = int(hf.get("num_kv_shared_layers") or 0)
    first_shared = n - shared
    if not 0 <= shared < n or set(types[first_shared:]) - set(types[:first_shared]):
        raise ConfigError(f"config.json num_kv_shared_layers={shared}: every shared layer needs an earlier "
                          f"layer of its type to share with ({n} layers, types {types})")
    sliding_rope = _gemma4_rope(hf, "sliding_attention") if "sliding_attention" in types else None
    k_eq_v = bool(hf.get("attention_k_eq_v"))
    layers = []
    for i, t in enumerate(types):
        opts = dict(base.mixer_options)
        if t == "sliding_attention":
            opts["window"] = int(hf["sliding_window"])
        else:
            over = per_layer.get(i) or {"head_dim": hf["global_head_dim"], **(
                {"num_key_value_heads": hf["num_global_key_value_heads"]}
                if k_eq_v and hf.get("num_global_key_value_heads") else {})}
            head_dim = int(over.get("head_dim", hf["head_dim"]))
            kv = int(over.get("num_key_value_heads", hf["num_key_value_heads"]))
            opts.update({"head_dim": head_dim} if head_dim != hf["head_dim"] else {})
            opts.update({"kv_heads": kv} if kv != hf["num_key_value_heads"] else {})
            opts.update({"k_eq_v": True} if k_eq_v else {})
            rope = _gemma4_rope(hf, t)
            if rope != sliding_rope:
                if rope.rope_type not in ("default", "proportional") or rope.factor != 1:
                    raise ConfigError(f"config.json rope_parameters.{t}: rope_type={rope.rope_type!r} "
                                      f"factor={rope.factor} is not supported (default or proportional, "
                                      "factor 1)")
                opts["rope_theta"] = rope.theta
                if rope.rope_type == "proportional":
                    opts["rope_proportion"] = rope.proportion
        if i >= first_shared:
            opts["kv_reuse"] = t
        elif shared and i == max(j for j in range(first_shared) if types[j] == t):
            opts["kv_store"] = t
        mlp, kind = dict(base.mlp_options), base.mlp
        if i >= first_shared and hf.get("use_double_wide_mlp"):
            mlp["intermediate_size"] = 2 * int(hf["intermediate_size"])
        if hf.get("enable_moe_block"):  # the expert block beside the dense MLP (moe kind, layout gemma4)
            kind, mlp = "moe", _gemma4_moe(hf, mlp.get("intermediate_size") or int(hf["intermediate_size"]))
        layers.append(LayerSpec(base.mixer, kind, opts, mlp))
    if sliding_rope is None:
        raise ConfigError("config.json layer_types: a gemma4 model without sliding layers is not supported")
    return tuple(layers)


def _gemma4_moe(hf: dict[str, Any], dense: int) -> dict[str, Any]:
    """The moe kind's options for Gemma 4's expert block (``enable_moe_block``) beside a dense MLP
    ``dense`` wide."""
    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if not hf.get(key):
            raise ConfigError(f"config.json lacks {key!r}, which gemma4's enable_moe_block needs")
    return {"experts": int(hf["num_experts"]), "top_k": int(hf["top_k_experts"]),
            "intermediate_size": int(hf["moe_intermediate_size"]), "norm_topk_prob": True, "router": "gemma4",
            "activation": "geglu", "layout": "gemma4", "dense_size": dense}


def _gemma4_to_hf(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    """The ``gemma4_text`` keys that describe ``cfg`` (head shapes as ``per_layer_config``)."""
    layers = cfg.layers
    types = [GEMMA4_TYPES[not spec.mixer_option("window", 0)] for spec in layers]
    full = next(spec for spec, t in zip(layers, types, strict=True) if t == "full_attention")
    theta = full.mixer_option("rope_theta", 0.0)
    proportion = full.mixer_option("rope_proportion", 0.0)
    full_rope: dict[str, Any] = {"rope_type": "proportional" if proportion else "default",
                                 "rope_theta": theta or cfg.rope.theta}
    if proportion:
        full_rope["partial_rotary_factor"] = proportion
    windows = [spec.mixer_option("window", 0) for spec in layers if spec.mixer_option("window", 0)]
    for key in ("hidden_act", "rope_theta", "attention_bias"):
        out.pop(key)
    out.update(
        hidden_activation="gelu_pytorch_tanh", layer_types=types,
        sliding_window=windows[0] if windows else HF_DEFAULTS["gemma4"]["sliding_window"],
        rope_parameters={"sliding_attention": {"rope_theta": cfg.rope.theta, **cfg.rope.scaling_to_hf()},
                         "full_attention": full_rope},
        per_layer_config={str(i): {"head_dim": opt("head_dim", 0) or cfg.head_dim,
                                   "num_key_value_heads": opt("kv_heads", 0) or cfg.num_kv_heads}
                          for i, opt in enumerate(spec.mixer_option for spec in layers)},
        attention_bias=bool(full.mixer_option("qkv_bias", False)),
        attention_k_eq_v=bool(full.mixer_option("k_eq_v", False)),
        num_kv_shared_layers=sum(bool(spec.mixer_option("kv_reuse", "")) for spec in layers),
        use_double_wide_mlp=any(spec.mlp_option("dense_size" if spec.mlp == "moe" else "intermediate_size", 0)
                                not in (0, cfg.intermediate_size) for spec in layers),
        final_logit_softcapping=cfg.final_logit_softcapping or None,
        hidden_size_per_layer_input=cfg.per_layer_input_size,
        vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size)
    moe = next((dict(spec.mlp_options) for spec in layers if spec.mlp == "moe"), None)
    out.update(enable_moe_block=moe is not None, **({} if moe is None else {
        "num_experts": moe["experts"], "top_k_experts": moe["top_k"],
        "moe_intermediate_size": moe["intermediate_size"]}))
    return out


def _llama3_rope() -> RopeConfig:
    return RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)


PRESETS: dict[str, ModelConfig] = {
    "qwen3_0_6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=40960,
        tie_word_embeddings=True, eos_token_id=(151645,),
    ),
    "qwen3_4b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=40960,
        tie_word_embeddings=True, eos_token_id=(151645,),
    ),
    "qwen3_8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=40960,
        tie_word_embeddings=False, eos_token_id=(151645,),
    ),
    "llama3_1_8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=_llama3_rope(), max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
    ),
    "llama3_3_70b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=_llama3_rope(), max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
    ),
}
# Qwen3-30B-A3B (its config.json's keys that we read): 48 layers, each a mixture of 128 experts,
# 8 per token, renormalised.
PRESETS["qwen3_30b_a3b"] = ModelConfig.from_hf({
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "eos_token_id": 151645, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})

# gpt-oss-20b / -120b (their config.json's keys that we read; the hub files store the experts in MXFP4,
# dequantised on load): 24 / 36 layers alternating a 128-position window and full attention, each a
# mixture of 32 / 128 experts, 4 per token.
_GPT_OSS = {
    "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "truncate": False,
                                           "original_max_position_embeddings": 4096},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": True,
    "sliding_window": 128, "num_experts_per_tok": 4, "swiglu_limit": 7.0, "eos_token_id": 200002,
    "pad_token_id": 199999, "quantization_config": {"quant_method": "mxfp4"}}
for _name, _layers, _experts in (("gpt_oss_20b", 24, 32), ("gpt_oss_120b", 36, 128)):
    PRESETS[_name] = ModelConfig.from_hf({
        **_GPT_OSS, "num_hidden_layers": _layers, "num_local_experts": _experts,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(_layers)]})


# Hybrid targets, from their config.json keys that we read (found through public copies of the hub
# files; the hub itself was not reachable): every 4th layer gated attention (RoPE on 64 of 256
# channels, theta 1e7), the others Gated DeltaNet with 16 key heads and 128-wide heads; untied
# embeddings, 262144 positions. Qwen3.5 / 3.6 checkpoints are Qwen3_5(Moe)ForConditionalGeneration
# wrappers: these are their text_config. eos 248044 is the text_config value of the published
# Qwen3.6-27B and Qwen3.5-0.8B files (the family's one tokenizer); 9B / 35B-A3B's own files were not
# seen with it. bos: only Qwen3.6-27B's file was seen with one (248044).
_QWEN3_5 = {"vocab_size": 248320, "head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
            "tie_word_embeddings": False, "eos_token_id": 248044, "full_attention_interval": 4,
            "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}}
PRESETS["qwen3_5_9b"] = ModelConfig.from_hf({  # Qwen/Qwen3.5-9B: 24 GDN + 8 attention layers
    **_QWEN3_5, "model_type": "qwen3_5_text", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
    "linear_num_value_heads": 32})
PRESETS["qwen3_6_27b"] = ModelConfig.from_hf({  # Qwen/Qwen3.6-27B: 48 GDN + 16 attention layers
    **_QWEN3_5, "model_type": "qwen3_5_text", "hidden_size": 5120, "intermediate_size": 17408,
    "num_hidden_layers": 64, "num_attention_heads": 24, "num_key_value_heads": 4,
    "linear_num_value_heads": 48, "bos_token_id": 248044})
PRESETS["qwen3_5_35b_a3b"] = ModelConfig.from_hf({  # Qwen/Qwen3.5-35B-A3B: 256 experts, 8 per token + shared
    **_QWEN3_5, "model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40,
    "num_attention_heads": 16, "num_key_value_heads": 2, "linear_num_value_heads": 32, "num_experts": 256,
    "num_experts_per_tok": 8, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512})
# Qwen/Qwen3-Next-80B-A3B-Instruct (model card: 48 layers, 12 x (3 x GDN, 1 x attention), each a mixture of
# 512 experts, 10 per token + 1 shared; the Qwen3 tokenizer: vocabulary 151936, eos <|im_end|> 151645).
PRESETS["qwen3_next_80b_a3b"] = ModelConfig.from_hf({
    "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
    "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 10000000, "partial_rotary_factor": 0.25,
    "max_position_embeddings": 262144, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "full_attention_interval": 4, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": []})

# Gemma 4 (their config.json text_config keys that we read). The hub files were not reachable from
# here; these values agree across public copies of them (AI-Hypercomputer-style model tables,
# vLLM-metal / SGLang / llama.cpp-port tests quoting "gemma-4-31B" and a 26B-A4B-based
# diffusion_gemma config.json; transformers' Gemma4TextConfig notes gemma-4-26B-A4B-it's
# num_global_key_value_heads=2). Unconfirmed: eos/bos (the class defaults 1 / 2 here; the -it
# chat turn ends with <end_of_turn>, which the generation config lists) and max_position_embeddings.
_GEMMA4 = {"model_type": "gemma4_text", "vocab_size": 262144, "vocab_size_per_layer_input": 262144,
           "head_dim": 256, "global_head_dim": 512, "attention_k_eq_v": True, "sliding_window": 1024,
           "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
           "tie_word_embeddings": True, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
           "hidden_activation": "gelu_pytorch_tanh", "eos_token_id": 1, "bos_token_id": 2,
           "rope_parameters": HF_DEFAULTS["gemma4"]["rope_parameters"]}
PRESETS["gemma4_31b"] = ModelConfig.from_hf({  # google/gemma-4-31B(-it): 50 sliding + 10 full layers
    **_GEMMA4, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60,
    "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4,
    "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(60)]})
PRESETS["gemma4_26b_a4b"] = ModelConfig.from_hf({  # google/gemma-4-26B-A4B(-it): 128 experts, 8 per token
    **_GEMMA4, "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30,
    "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
    "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
    "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(30)]})


def preset(name: str) -> ModelConfig:
    """Named full-size architecture preset (``qwen3_8b`` ...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def llama3_inv_freq_scale(rope: RopeConfig, inv_freq: Any) -> Any:
    """Applies llama3 frequency scaling to ``inv_freq`` (numpy or jax array)."""
    import numpy as np

    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


# Hub ids whose architecture we know without downloading (used to validate real presets).
HUB_PRESETS = {
    "Qwen/Qwen3-0.6B": "qwen3_0_6b",
    "Qwen/Qwen3-4B": "qwen3_4b",
    "Qwen/Qwen3-8B": "qwen3_8b",
    "Qwen/Qwen3-30B-A3B": "qwen3_30b_a3b",
    "Qwen/Qwen3.5-9B": "qwen3_5_9b",
    "Qwen/Qwen3.6-27B": "qwen3_6_27b",
    "Qwen/Qwen3.5-35B-A3B": "qwen3_5_35b_a3b",
    "Qwen/Qwen3-Next-80B-A3B-Instruct": "qwen3_next_80b_a3b",
    "google/gemma-4-31B-it": "gemma4_31b",
    "google/gemma-4-31B": "gemma4_31b",
    "google/gemma-4-26B-A4B-it": "gemma4_26b_a4b",
    "google/gemma-4-26B-A4B": "gemma4_26b_a4b",
    "openai/gpt-oss-20b": "gpt_oss_20b",
    "openai/gpt-oss-120b": "gpt_oss_120b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_1_8b",
    "meta-llama/Llama-3.1-8B": "llama3_1_8b",
    "meta-llama/Llama-3.3-70B-Instruct": "llama3_3_70b",
}


def preset_for_hub_id(hub_id: str) -> ModelConfig:
    if hub_id not in HUB_PRESETS:
        raise ConfigError(f"no architecture preset for {hub_id!r}; known: {', '.join(sorted(HUB_PRESETS))}")
    return PRESETS[HUB_PRESETS[hub_id]]
