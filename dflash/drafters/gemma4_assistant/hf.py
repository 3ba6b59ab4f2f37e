"""Gemma 4 assistants on disk, as ``Gemma4AssistantForCausalLM.save_pretrained`` writes them:
``config.json`` (``model_type: gemma4_assistant``, the assistant's ``text_config``, the head's
fields) and safetensors with ``model.layers.*`` (queries and outputs only: the layers own no keys
or values), ``model.norm``, ``model.embed_tokens`` (the tied LM head; ``lm_head`` when untied),
``pre_projection`` / ``post_projection`` and ``masked_embedding.{centroids, token_ordering}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dflash.config import ModelConfig
from dflash.drafters.gemma4_assistant.model import AssistantConfig, Gemma4Assistant, TokenOrdering
from dflash.errors import CheckpointError
from dflash.io.loading import load_params_into, read_config_json, save_params, world_readable
from dflash.models import kinds
from dflash.models.kinds import WeightRow

ARCHITECTURE = "Gemma4AssistantForCausalLM"
MODEL_TYPE = "gemma4_assistant"
ORDERING = "masked_embedding.token_ordering"


def claims(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == MODEL_TYPE or ARCHITECTURE in (hf.get("architectures") or [])


def assistant_rows(cfg: AssistantConfig) -> tuple[WeightRow, ...]:
    """Every parameter's tensor (the token ordering, an integer buffer, is read on its own)."""
    rows = [
        WeightRow(f"{p}.weight", f"{p}.kernel", transpose=True) for p in ("pre_projection", "post_projection")
    ]
    rows.append(WeightRow("model.norm.weight", "norm.weight"))
    rows.append(WeightRow("model.embed_tokens.weight", "embed_tokens"))
    if not cfg.tie_word_embeddings:
        rows.append(WeightRow("lm_head.weight", "lm_head", transpose=True))
    if cfg.num_centroids:
        rows.append(WeightRow("masked_embedding.centroids.weight", "centroids.kernel", transpose=True))
    for i in range(cfg.num_layers):
        rows += kinds.layer_weights(cfg.layers, i, prefix="model.")
    return tuple(rows)


def _ordering(directory: Path, cfg: AssistantConfig) -> np.ndarray:
    """``token_ordering`` from whichever safetensors file holds it, checked to be a permutation."""
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            if ORDERING in f.keys():
                order = np.asarray(f.get_tensor(ORDERING)).astype(np.int64)
                if sorted(order.tolist()) != list(range(cfg.vocab_size)):
                    raise CheckpointError(
                        f"{file}: {ORDERING} is not a permutation of the {cfg.vocab_size} token ids"
                    )
                return order.astype(np.int32)
    raise CheckpointError(f"{directory} lacks {ORDERING} (config.json use_ordered_embeddings is true)")


def load_assistant(
    directory: Path,
    target_cfg: ModelConfig | None,
    *,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    mesh: Mesh | None = None,
    block_size: int | None = None,
    replicate_indivisible: bool = False,
) -> Gemma4Assistant:
    """The assistant in ``directory``, checked against the target it will read when given."""
    cfg = AssistantConfig.from_hf(read_config_json(directory), block_size=block_size)
    if target_cfg is not None:
        cfg.check_target(target_cfg)
    order = _ordering(directory, cfg) if cfg.num_centroids else None
    model = nnx.eval_shape(
        lambda: Gemma4Assistant(cfg, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0))
    )
    if order is not None:
        model.token_ordering = None  # read on its own below (an integer buffer, not a float parameter)
    model = load_params_into(
        model,
        directory,
        assistant_rows(cfg),
        dtype,
        ignorable=(ORDERING,),
        mesh=mesh,
        replicate_indivisible=replicate_indivisible,
    )
    if order is not None:
        value = jnp.asarray(order)
        if mesh is not None:
            value = jax.device_put(value, NamedSharding(mesh, PartitionSpec()))
        model.token_ordering = TokenOrdering(value)
    return model


def save_assistant(model: Gemma4Assistant, out: Path, *, dtype: Any = None) -> Path:
    """``config.json`` (``AssistantConfig.to_hf``) and ``model.safetensors`` under the names
    ``load_assistant`` reads (the token ordering, with a centroid head, as the int64 buffer
    transformers saves): the layout ``save_pretrained`` writes."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / "model.safetensors"
    save_params(model, assistant_rows(model.cfg), file, dtype)
    if model.token_ordering is not None:
        order = np.asarray(jax.device_get(model.token_ordering[...])).astype(np.int64)
        save_file({**load_file(file), ORDERING: order}, str(file), metadata={"format": "pt"})
        world_readable(file)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    world_readable(out / "config.json")
    return out
