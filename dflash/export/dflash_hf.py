"""DFlash drafters as HF "DFlashDraftModel" directories (config.json + model.safetensors).

The layout is the one vLLM, SGLang and the PyTorch reference load: PyTorch ``[out, in]``
weights named ``fc.weight``, ``hidden_norm.weight``, ``norm.weight`` and ``layers.{i}.*``, no
embedding or LM head (the target's are used).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dflash.config import ConfigError, ModelConfig, RopeConfig
from dflash.drafters.dflash import DFlashConfig, DFlashDrafter
from dflash.models.loading import (
    ASSETS,
    LAYER_TABLE,
    CheckpointError,
    load_params_into,
    resolve,
    save_params,
)

DRAFTER_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("fc.weight", "fc.kernel", True),
    ("hidden_norm.weight", "hidden_norm.weight", False),
    ("norm.weight", "norm.weight", False),
    *LAYER_TABLE,
)
SHIPPED_DRAFTERS = {"tiny-code-dflash": ASSETS / "tiny-code-dflash"}


def target_fingerprint(cfg: ModelConfig) -> str:
    """Short hash of the target's architecture: a drafter is only valid for its own target."""
    blob = json.dumps(cfg.to_hf(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def drafter_hf_config(cfg: DFlashConfig, target_name: str = "", target_cfg: ModelConfig | None = None,
                      dtype: str = "float32") -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"],
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
        "layer_types": ["full_attention"] * cfg.num_layers,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": dtype,
    }
    if cfg.rope.rope_type != "default":
        out["rope_scaling"] = {
            "rope_type": cfg.rope.rope_type, "factor": cfg.rope.factor,
            "low_freq_factor": cfg.rope.low_freq_factor, "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
        }
    if target_cfg is not None:
        out["dflash_target"] = {"name_or_path": str(target_name),
                                "fingerprint": target_fingerprint(target_cfg)}
    return out


def config_from_hf(hf: dict[str, Any]) -> DFlashConfig:
    """Reads a DFlashDraftModel ``config.json``; anything else is a clear error."""
    if "DFlashDraftModel" not in (hf.get("architectures") or []):
        raise CheckpointError(
            f"not a DFlash drafter: config.json architectures={hf.get('architectures')!r} "
            "(expected ['DFlashDraftModel'])")
    dcfg = hf.get("dflash_config") or {}
    for key in ("mask_token_id", "target_layer_ids"):
        if key not in dcfg:
            raise CheckpointError(f"DFlash config.json lacks dflash_config.{key}")
    windowed = [t for t in (hf.get("layer_types") or []) if t != "full_attention"]
    if hf.get("use_sliding_window") or windowed:
        raise CheckpointError(f"DFlash drafter config.json asks for sliding-window attention "
                              f"(use_sliding_window={hf.get('use_sliding_window')!r}, layer_types "
                              f"{sorted(set(windowed))}); only full attention is supported")
    rope = RopeConfig.from_hf(hf)
    try:
        return DFlashConfig(
            num_target_layers=int(hf["num_target_layers"]),
            target_layer_ids=tuple(int(i) for i in dcfg["target_layer_ids"]),
            mask_token_id=int(dcfg["mask_token_id"]), vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
            num_heads=int(hf["num_attention_heads"]), num_kv_heads=int(hf["num_key_value_heads"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            num_layers=int(hf["num_hidden_layers"]), block_size=int(hf["block_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            model_type=str(hf.get("model_type", "qwen3")),
        )
    except KeyError as err:
        raise CheckpointError(f"DFlash config.json lacks required key {err.args[0]!r}") from err


def save_drafter(drafter: DFlashDrafter, directory: str | os.PathLike, *, target_name: str = "",
                 target_cfg: ModelConfig | None = None, dtype: Any = None) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_params(drafter, DRAFTER_TABLE, drafter.cfg.num_layers, out / "model.safetensors", dtype)
    name = jnp.dtype(dtype).name if dtype is not None else jnp.dtype(drafter.fc.kernel[...].dtype).name
    with open(out / "config.json", "w") as f:
        json.dump(drafter_hf_config(drafter.cfg, target_name, target_cfg, name), f, indent=2)
    return out


def export_of_run(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A ``dflash-train`` run directory stands for its final export (``RUN/export``).

    Anything else is returned unchanged. A run without an export yet (still training, or
    stopped early) is an error that says how to export one of its checkpoints.
    """
    run = Path(name_or_path)
    if not ((run / "config.yaml").is_file() and not (run / "config.json").exists()):
        return name_or_path
    if (run / "export" / "config.json").is_file():
        return run / "export"
    raise CheckpointError(
        f"{run} is a dflash-train run directory without a final export ({run / 'export'} is written "
        f"when the run finishes); export one of its checkpoints with `dflash-export --run {run} "
        f"--step latest --out DIR` (or --step best) and pass that DIR as the drafter")


def resolve_drafter(name_or_path: str | os.PathLike) -> Path:
    name_or_path = export_of_run(name_or_path)
    if str(name_or_path) in SHIPPED_DRAFTERS:
        path = SHIPPED_DRAFTERS[str(name_or_path)]
        if not (path / "config.json").exists():
            raise CheckpointError(f"shipped drafter {name_or_path!r} is missing at {path}")
        return path
    return resolve(name_or_path)


def load_drafter(name_or_path: str | os.PathLike, target_cfg: ModelConfig | None = None, *,
                 dtype: jnp.dtype = jnp.float32, attention_impl: str = "auto") -> DFlashDrafter:
    """Loads an exported drafter; with ``target_cfg``, checks it fits that target."""
    directory = resolve_drafter(name_or_path)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"missing file: {cfg_path}")
    with open(cfg_path) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf)
    if target_cfg is not None:
        try:
            cfg.check_target(target_cfg)
        except ConfigError as err:
            raise CheckpointError(f"drafter {directory} does not match the target: {err}") from err
        recorded = (hf.get("dflash_target") or {}).get("fingerprint")
        if recorded and recorded != target_fingerprint(target_cfg):
            warnings.warn(f"drafter {directory} was trained against target "
                          f"{hf['dflash_target'].get('name_or_path')!r} whose config differs from this "
                          "target's (fingerprint mismatch); shapes fit, but acceptance may be poor",
                          stacklevel=2)
    abstract = nnx.eval_shape(lambda: DFlashDrafter(cfg, dtype=dtype, attention_impl=attention_impl,
                                                    rngs=nnx.Rngs(0)))
    # The drafter uses the target's embedding and LM head; a copy in the file is not an error.
    return load_params_into(abstract, directory, DRAFTER_TABLE, cfg.num_layers, dtype,
                            ignorable=("embed_tokens.weight", "lm_head.weight"))
