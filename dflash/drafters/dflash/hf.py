"""DFlash drafters as HF "DFlashDraftModel" directories (config.json + model.safetensors).

The layout is the one vLLM, SGLang and the PyTorch reference load: PyTorch ``[out, in]``
weights named ``fc.weight``, ``hidden_norm.weight``, ``norm.weight`` and ``layers.{i}.*``, no
embedding or LM head (the target's are used).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ConfigError, LayerSpec, ModelConfig, RopeConfig
from dflash.drafters.dflash.model import (
    FULL,
    SLIDING,
    DFlashConfig,
    DFlashDrafter,
    drafter_layers,
    layer_config,
)
from dflash.errors import CheckpointError
from dflash.io.host import to_host
from dflash.io.loading import ASSETS, load_params_into, read_config_json, save_params
from dflash.models import kinds
from dflash.models.kinds import WeightRow
from dflash.models.transformer import embed_scale

ARCHITECTURE = "DFlashDraftModel"
SHIPPED_DRAFTERS = {"tiny-code-dflash": ASSETS / "tiny-code-dflash"}


def drafter_rows(cfg: DFlashConfig) -> tuple[WeightRow, ...]:
    """Every tensor of a DFlash export and the parameter it fills (no embedding, no LM head)."""
    return (WeightRow("fc.weight", "fc.kernel", transpose=True), WeightRow("hidden_norm.weight",
                                                                           "hidden_norm.weight"),
            WeightRow("norm.weight", "norm.weight"),
            *(row for i in range(cfg.num_layers) for row in kinds.layer_weights(cfg.layers, i)))


def target_fingerprint(cfg: ModelConfig) -> str:
    """Short hash of the target's architecture: a drafter is only valid for its own target."""
    blob = json.dumps(cfg.to_hf(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# dflash_config keys for a target whose embedding and LM head are not a plain lookup / matmul, as
# the reference DFlash code applies them around the target's shared table and head (and vLLM's
# DFlash2 reader; its DFlash reader does not: see scaled_embedding), and the value that means
# "plain" when a key is absent.
TARGET_IO_DEFAULTS = {"input_embedding_scale": 1.0, "final_logit_softcapping": 0.0}


def target_io(cfg: ModelConfig) -> dict[str, float]:
    """``dflash_config`` keys for ``cfg``'s target: ``input_embedding_scale`` (block rows are the raw
    embedding rows times it: Gemma's ``sqrt(D)``, what ``Transformer.embed`` applies) and
    ``final_logit_softcapping`` (the drafter's logits capped as the target's); only those not plain."""
    io = {"input_embedding_scale": embed_scale(cfg) or 1.0,
          "final_logit_softcapping": float(cfg.final_logit_softcapping)}
    return {key: value for key, value in io.items() if value != TARGET_IO_DEFAULTS[key]}


def check_target_io(dcfg: dict[str, Any], target_cfg: ModelConfig, directory: Any) -> None:
    """A drafter whose recorded ``target_io`` differs from the target's is refused (our drafter always
    embeds and unembeds as the target does); an absent key is the target's own."""
    want = {**TARGET_IO_DEFAULTS, **target_io(target_cfg)}
    for key, value in want.items():
        got = dcfg.get(key)
        # rel 2^-8: a scale recorded in bfloat16 (transformers multiplies by sqrt(D) rounded so)
        if got is not None and not math.isclose(float(got or 0.0), value, rel_tol=2 ** -8):
            raise CheckpointError(f"drafter {directory}: config.json dflash_config.{key}={got!r}, but this "
                                  f"target's is {value!r}")


def drafter_hf_config(cfg: DFlashConfig, target_name: str = "", target_cfg: ModelConfig | None = None,
                      dtype: str = "float32") -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": cfg.model_type,
        "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": list(cfg.target_layer_ids)},
        "num_target_layers": cfg.num_target_layers,
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False,
        # As the reference trainer writes them and vLLM reads them: the sliding layers' window in
        # ``sliding_window``, ``use_sliding_window`` for transformers' Qwen3Config (which drops the
        # window without it).
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window or None,
        "use_sliding_window": bool(cfg.sliding_window),
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": dtype,
    }
    if cfg.rope.rope_type != "default":  # the target's (llama3, YaRN): the fields of its type
        out["rope_scaling"] = cfg.rope.scaling_to_hf()
    if target_cfg is not None:
        out["dflash_config"].update(target_io(target_cfg))
        out["dflash_target"] = {"name_or_path": str(target_name),
                                "fingerprint": target_fingerprint(target_cfg)}
    return out


def config_from_hf(hf: dict[str, Any]) -> DFlashConfig:
    """Reads a DFlashDraftModel ``config.json``; anything else is a clear error."""
    if ARCHITECTURE not in (hf.get("architectures") or []):
        raise CheckpointError(
            f"not a DFlash drafter: config.json architectures={hf.get('architectures')!r} "
            "(expected ['DFlashDraftModel'])")
    dcfg = hf.get("dflash_config") or {}
    for key in ("mask_token_id", "target_layer_ids"):
        if key not in dcfg:
            raise CheckpointError(f"DFlash config.json lacks dflash_config.{key}")
    rope = RopeConfig.from_hf(hf)
    try:
        shape = types.SimpleNamespace(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf["num_key_value_heads"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)))
        n = int(hf["num_hidden_layers"])
        return DFlashConfig(
            layers=layer_config(shape, n, _layers_from_hf(hf, n)),
            num_target_layers=int(hf["num_target_layers"]),
            target_layer_ids=tuple(int(i) for i in dcfg["target_layer_ids"]),
            mask_token_id=int(dcfg["mask_token_id"]), block_size=int(hf["block_size"]),
            model_type=str(hf.get("model_type", "qwen3")))
    except KeyError as err:
        raise CheckpointError(f"DFlash config.json lacks required key {err.args[0]!r}") from err


def _layers_from_hf(hf: dict[str, Any], n: int) -> tuple[LayerSpec, ...]:
    """The layer specs a DFlash config.json names, read as vLLM reads them: ``layer_types`` (absent:
    all full), the sliding layers' window from ``dflash_config.swa_window_size`` or ``sliding_window``;
    sliding layers causal, full ones not. Other attention forms are refused, naming the key."""
    dcfg = hf.get("dflash_config") or {}
    for key, value in (("dflash_config.use_swa", dcfg.get("use_swa")),
                       ("dflash_config.attention_sink_bias", dcfg.get("attention_sink_bias"))):
        if value:
            raise CheckpointError(f"DFlash config.json sets {key}={value!r}; supported: layer_types of "
                                  f"{FULL!r} (bidirectional block) and {SLIDING!r} (causal, windowed)")
    types = tuple(hf.get("layer_types") or (FULL,) * n)
    for key, value in (("is_causal", hf.get("is_causal")), ("dflash_config.causal", dcfg.get("causal"))):
        if value is not None and any(bool(value) != (t == SLIDING) for t in types):
            raise CheckpointError(f"DFlash config.json sets {key}={value!r}, but here full_attention layers "
                                  "see their block both ways and sliding_attention layers causally")
    window = dcfg.get("swa_window_size") or hf.get("sliding_window") or 0
    try:
        return drafter_layers(n, types, int(window) if SLIDING in types else 0)
    except ConfigError as err:
        raise CheckpointError(f"DFlash config.json: {err}") from err


def scaled_embedding(table_VD: jax.Array, cfg: ModelConfig) -> np.ndarray:
    """The block rows' embedding table ``[V, D]`` of a target that scales its embeddings (Gemma's
    ``sqrt(D)``): its table (``Transformer.embed_tokens``, or ``read_embedding`` of its checkpoint)
    times the scale, in its dtype, as ``Transformer.embed`` computes each row; gathered when sharded
    over processes (a collective).

    A DFlash export for such a target ships it as ``embed_tokens.weight``: vLLM's DFlash reader
    (``DFlashDraftModel``, 0.32) embeds the block with the target's raw table and ignores
    ``dflash_config.input_embedding_scale``, but takes a drafter's own table when the file has one
    (and ours, and the reference, read the target's and the scale; the copy is not read back)."""
    return to_host(table_VD * jnp.asarray(embed_scale(cfg), table_VD.dtype))


def save_drafter(drafter: DFlashDrafter, directory: str | os.PathLike, *, target_name: str = "",
                 target_cfg: ModelConfig | None = None, dtype: Any = None,
                 embed_tokens: np.ndarray | None = None) -> Path:
    """The export; ``embed_tokens``: the scaled table a target that scales its embeddings ships
    with (``scaled_embedding``), written as ``embed_tokens.weight``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if target_cfg is not None and embed_scale(target_cfg) and embed_tokens is None:
        raise CheckpointError("a DFlash export for a target that scales its embeddings needs the scaled "
                              "table (hf.scaled_embedding), which vLLM's DFlash reader takes from the file")
    extra = {} if embed_tokens is None else {"embed_tokens.weight": np.asarray(embed_tokens)}
    save_params(drafter, drafter_rows(drafter.cfg), out / "model.safetensors", dtype, extra=extra)
    name = jnp.dtype(dtype).name if dtype is not None else jnp.dtype(drafter.fc.kernel[...].dtype).name
    with open(out / "config.json", "w") as f:
        json.dump(drafter_hf_config(drafter.cfg, target_name, target_cfg, name), f, indent=2)
    return out


def load_drafter(directory: Path, target_cfg: ModelConfig | None = None, *, dtype: jnp.dtype = jnp.float32,
                 attention_impl: str = "auto", mesh: Mesh | None = None,
                 replicate_indivisible: bool = False) -> DFlashDrafter:
    """Loads an exported drafter (into its shards on ``mesh``); with ``target_cfg``, checks it fits."""
    hf = read_config_json(directory)
    cfg = config_from_hf(hf)
    if target_cfg is not None:
        try:
            cfg.check_target(target_cfg)
        except ConfigError as err:
            raise CheckpointError(f"drafter {directory} does not match the target: {err}") from err
        check_target_io(hf.get("dflash_config") or {}, target_cfg, directory)
        recorded = (hf.get("dflash_target") or {}).get("fingerprint")
        if recorded and recorded != target_fingerprint(target_cfg):
            warnings.warn(f"drafter {directory} was trained against target "
                          f"{hf['dflash_target'].get('name_or_path')!r} whose config differs from this "
                          "target's (fingerprint mismatch); shapes fit, but acceptance may be poor",
                          stacklevel=2)
    abstract = nnx.eval_shape(lambda: DFlashDrafter(cfg, dtype=dtype, attention_impl=attention_impl,
                                                    rngs=nnx.Rngs(0)))
    # The drafter uses the target's embedding and LM head; a copy in the file is not an error.
    return load_params_into(abstract, directory, drafter_rows(cfg), dtype,
                            ignorable=("embed_tokens.weight", "lm_head.weight"), mesh=mesh,
                            replicate_indivisible=replicate_indivisible)
