"""MTP heads on disk: a target checkpoint's own ``mtp.*`` tensors (Qwen3-Next, Qwen3.5), or our
export of a trained head (``config.json`` naming the target + ``model.safetensors`` with the head's
``mtp.*`` tensors only, the names vLLM reads from a target checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ModelConfig
from dflash.drafters.mtp.model import PREFIX, MTPConfig, MTPHead, mtp_rows
from dflash.errors import CheckpointError
from dflash.io.loading import checkpoint_keys, load_params_into, read_config_json, save_params, world_readable
from dflash.models import kinds

ARCHITECTURE = "MTPDraftModel"  # our exports of trained heads
LAYER_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")  # Qwen3-Next / DeepSeek-V3; Qwen3.5


def declared_layers(hf: dict[str, Any]) -> int:
    """MTP layers a ``config.json`` declares (a multimodal one in its ``text_config``); 0: none."""
    for cfg in (hf, hf.get("text_config") or {}):
        for key in LAYER_KEYS:
            if cfg.get(key):
                return int(cfg[key])
    return 0


def config_from_hf(hf: dict[str, Any], *, block_size: int | None = None) -> MTPConfig:
    """The head of a target's (or our export's) ``config.json``: the target family's own layers,
    ``declared_layers`` deep (1 when the config says nothing)."""
    target = kinds.check(ModelConfig.from_hf(hf))
    bs = block_size or hf.get("dflash_block_size")
    extra = {"block_size": int(bs)} if bs else {}
    return MTPConfig.for_target(target, num_layers=declared_layers(hf) or 1, **extra)


def load_head(
    directory: Path,
    target_cfg: ModelConfig | None,
    *,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    mesh: Mesh | None = None,
    replicate_indivisible: bool = False,
) -> MTPHead:
    """A head read from ``directory``'s ``mtp.*`` tensors (a target checkpoint or our export)."""
    cfg = config_from_hf(read_config_json(directory))
    if target_cfg is not None:
        cfg.check_target(target_cfg)
    rows = mtp_rows(cfg)
    if not any(k.startswith(PREFIX) for k in checkpoint_keys(directory)):
        raise CheckpointError(
            f"{directory} has no MTP head: its checkpoint holds no {PREFIX}* tensors (an MTP "
            f"drafter reads {', '.join(r.hf for r in rows[:4])}, {PREFIX}layers.0.*)"
        )
    head = nnx.eval_shape(lambda: MTPHead(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0)))
    return load_params_into(
        head, directory, rows, dtype, mesh=mesh, replicate_indivisible=replicate_indivisible
    )


def save_head(
    head: MTPHead, out: Path, *, target_name: str, target_cfg: ModelConfig, dtype: Any = None
) -> Path:
    """``config.json`` (the target's own, plus the head's layer count, its block size, the target's
    name and ``MTPDraftModel``) and ``model.safetensors`` with the ``mtp.*`` tensors."""
    out.mkdir(parents=True, exist_ok=True)
    save_params(head, mtp_rows(head.cfg), out / "model.safetensors", dtype)
    hf = {
        **target_cfg.to_hf(),
        "architectures": [ARCHITECTURE],
        "num_nextn_predict_layers": head.cfg.num_layers,
        "dflash_block_size": head.cfg.block_size,
        "dflash_mtp_target": target_name,
    }
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    world_readable(out / "config.json")
    return out
