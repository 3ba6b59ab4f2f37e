"""MTP heads on disk: a target checkpoint's own ``mtp.*`` tensors (Qwen3-Next, Qwen3.5), or our
export of a trained head: ``MTPDraftModel`` (``config.json`` naming the target + ``model.safetensors``
with the head's ``mtp.*`` tensors only, the names vLLM reads from a target checkpoint; dflash loads
it), or, for the targets vLLM serves an MTP head of, the target's checkpoint with the head as its
own (``save_in_target``: what ``vllm serve`` takes with ``--speculative-config '{"method": "mtp"}'``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ModelConfig
from dflash.drafters.mtp.model import PREFIX, MTPConfig, MTPHead, mtp_rows
from dflash.errors import CheckpointError, ConfigError
from dflash.io.loading import (
    checkpoint_keys,
    load_params_into,
    read_config_json,
    save_params,
    weight_map,
    world_readable,
)
from dflash.models import kinds

ARCHITECTURE = "MTPDraftModel"  # our exports of trained heads
LAYER_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")  # Qwen3-Next / DeepSeek-V3; Qwen3.5
VLLM_MTP_KEYS = {"qwen3_next": "num_nextn_predict_layers", "qwen3_5": "mtp_num_hidden_layers",
                 "qwen3_5_moe": "mtp_num_hidden_layers"}
"""Target ``config.json`` model types whose MTP head vLLM serves (its speculative config routes them to
``Qwen3NextMTP`` / ``Qwen3_5MTP`` / ``Qwen3_5MoeMTP``, which read ``mtp.*`` from the target's own
checkpoint) -> the key of the head's depth (Qwen3.5: in ``text_config``, which vLLM's head reads)."""
HEAD_FILE = "mtp.safetensors"
INDEX = "model.safetensors.index.json"


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


def _link(src: Path, dst: Path) -> None:
    """``dst`` names ``src``'s bytes: a hard link, or a symbolic link across file systems."""
    real = src.resolve()  # a hub cache's files are symbolic links into its blobs
    try:
        os.link(real, dst)
    except OSError:
        os.symlink(real, dst)


def save_in_target(head: MTPHead, target_dir: Path, out: Path, *, dtype: Any = None) -> Path:
    """The target's checkpoint with ``head`` as its own MTP head, in ``out``: what vLLM serves with
    ``--speculative-config '{"method": "mtp", ...}'`` and what ``--drafter mtp:OUT`` reads back.

    The target's files are linked, not copied; ``config.json`` is the target's with the head's depth
    under the family's key (``VLLM_MTP_KEYS``) and its block size; ``mtp.safetensors`` holds the head
    under the target's ``mtp.*`` names; the index maps every tensor to its file."""
    hf = read_config_json(target_dir)
    key = VLLM_MTP_KEYS.get(hf.get("model_type"))
    if key is None:
        raise ConfigError(
            f"vLLM serves an MTP head only from a Qwen3-Next / Qwen3.5 checkpoint (config.json model_type "
            f"{', '.join(VLLM_MTP_KEYS)}); target {target_dir} is {hf.get('model_type')!r}: export the "
            "MTPDraftModel directory (--form delta), which dflash loads"
        )
    head.cfg.check_target(kinds.check(ModelConfig.from_hf(hf)))
    tensors = weight_map(target_dir)
    if any(k.startswith(PREFIX) for k in tensors):
        raise ConfigError(f"target {target_dir} already ships an MTP head ({PREFIX}* tensors); export this "
                          "one as an MTPDraftModel directory (--form delta)")
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(target_dir.iterdir()):
        if file.is_file() and file.name not in ("config.json", INDEX):
            _link(file, out / file.name)
    rows = mtp_rows(head.cfg)
    save_params(head, rows, out / HEAD_FILE, dtype)
    world_readable(out / HEAD_FILE)
    (hf.get("text_config") or hf)[key] = head.cfg.num_layers
    hf["dflash_block_size"] = head.cfg.block_size
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    index = {"metadata": {"format": "pt"},
             "weight_map": {**tensors, **{k: HEAD_FILE for row in rows for k in row.hf_keys()}}}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    for name in ("config.json", INDEX):
        world_readable(out / name)
    return out
