"""EAGLE-3 drafters as the ``LlamaForCausalLMEagle3`` directories vLLM and SGLang load.

config.json: a one-layer Llama config plus ``draft_vocab_size``, ``target_hidden_size`` and the
auxiliary layer ids at the top level and in ``eagle_config`` (``eagle_aux_hidden_state_layer_ids``:
vLLM counts the hidden state *entering* a layer, so each id is ours + 1). model.safetensors:
``embed_tokens``, ``fc``, ``midlayer.*`` (vLLM maps it to ``layers.0``), ``norm``, ``lm_head``
``[W, D]``, ``d2t`` int64 ``[W]`` and ``t2d`` bool ``[V]``. What vLLM does not read
(``dflash_eagle3``: target depth, block size, TTT steps, target fingerprint) makes the import exact.
A file without ``embed_tokens`` (many published drafters: the draft shares its target's embedding)
loads with the target's embedding, as vLLM's ``load_eagle_model`` shares it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from dflash.config import ConfigError, ModelConfig, RopeConfig
from dflash.drafters.dflash.hf import target_fingerprint
from dflash.drafters.dflash.model import layer_config
from dflash.drafters.eagle3.model import LLAMA_LAYER, Eagle3Config, Eagle3Drafter, VocabMap, check_vocab_map
from dflash.errors import CheckpointError
from dflash.io.loading import checkpoint_keys, load_params_into, read_config_json, save_params, world_readable
from dflash.models import kinds
from dflash.models.kinds import WeightRow
from dflash.sharding import param_spec

ARCHITECTURE = "LlamaForCausalLMEagle3"
EMBED = "embed_tokens.weight"
_RENAMES = (("layers.0.input_layernorm.", "midlayer.hidden_norm."), ("layers.0.", "midlayer."))


def _hf_name(ours: str) -> str:
    for old, new in _RENAMES:
        if ours.startswith(old):
            return new + ours[len(old):]
    return ours


def drafter_rows(cfg: Eagle3Config) -> tuple[WeightRow, ...]:
    """Every float tensor of the export and the parameter it fills (``d2t``/``t2d`` are apart)."""
    layer = tuple(dataclasses.replace(row, hf=_hf_name(row.hf)) for row in kinds.layer_weights(cfg.layers, 0))
    return (WeightRow(EMBED, "embed_tokens"),
            WeightRow("fc.weight", "fc.kernel", transpose=True),
            WeightRow("midlayer.input_layernorm.weight", "embed_norm.weight"), *layer,
            WeightRow("norm.weight", "norm.weight"),
            WeightRow("lm_head.weight", "lm_head.kernel", transpose=True))


def aux_layer_ids(cfg: Eagle3Config) -> list[int]:
    return [i + 1 for i in cfg.target_layer_ids]


def hf_config(cfg: Eagle3Config, target_name: str = "", target_cfg: ModelConfig | None = None,
              dtype: str = "float32") -> dict[str, Any]:
    lc = cfg.layers
    aux = aux_layer_ids(cfg)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": lc.hidden_size, "intermediate_size": lc.intermediate_size,
        "num_attention_heads": lc.num_heads, "num_key_value_heads": lc.num_kv_heads, "head_dim": lc.head_dim,
        "num_hidden_layers": 1, "rms_norm_eps": lc.rms_norm_eps, "rope_theta": lc.rope.theta,
        "max_position_embeddings": lc.max_position_embeddings, "vocab_size": lc.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": lc.hidden_size,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "eagle_aux_hidden_state_layer_ids": aux,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
        "torch_dtype": dtype,
        "dflash_eagle3": {"num_target_layers": cfg.num_target_layers, "block_size": cfg.block_size,
                          "ttt_steps": cfg.ttt_steps},
    }
    if lc.rope.rope_type != "default":
        out["rope_scaling"] = lc.rope.scaling_to_hf()
    if target_cfg is not None:
        out["dflash_eagle3"]["target"] = {"name_or_path": str(target_name),
                                          "fingerprint": target_fingerprint(target_cfg)}
    return out


def is_eagle3_config(hf: dict[str, Any]) -> bool:
    return ARCHITECTURE in (hf.get("architectures") or [])


def config_from_hf(hf: dict[str, Any], num_target_layers: int | None = None) -> Eagle3Config:
    """Reads an ``LlamaForCausalLMEagle3`` config.json (ours, or a published one given the target's depth)."""
    if not is_eagle3_config(hf):
        raise CheckpointError(f"not an EAGLE-3 drafter: config.json architectures="
                              f"{hf.get('architectures')!r} "
                              f"(expected [{ARCHITECTURE!r}])")
    ours = hf.get("dflash_eagle3") or {}
    try:
        if int(hf.get("num_hidden_layers", 1)) != 1:
            raise CheckpointError(f"EAGLE-3 config.json has num_hidden_layers={hf['num_hidden_layers']}; "
                                  "only one-layer drafters are supported")
        depth = int(ours.get("num_target_layers") or num_target_layers or 0)
        if not depth:
            raise CheckpointError("EAGLE-3 config.json lacks dflash_eagle3.num_target_layers; load it "
                                  "against its target")
        aux = hf.get("eagle_aux_hidden_state_layer_ids") or (hf.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids") or (2, depth // 2, depth - 3)  # vLLM's default
        if int(hf.get("target_hidden_size", hf["hidden_size"])) != int(hf["hidden_size"]):
            raise CheckpointError("EAGLE-3 config.json: target_hidden_size != hidden_size is not supported")
        shape = types.SimpleNamespace(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf["num_key_value_heads"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=RopeConfig.from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)))
        return Eagle3Config(layers=layer_config(shape, 1, (LLAMA_LAYER,)), num_target_layers=depth,
                            target_layer_ids=tuple(int(i) - 1 for i in aux),
                            draft_vocab_size=int(hf.get("draft_vocab_size") or hf["vocab_size"]),
                            block_size=int(ours.get("block_size", 8)),
                            ttt_steps=int(ours.get("ttt_steps", 7)))
    except KeyError as err:
        raise CheckpointError(f"EAGLE-3 config.json lacks required key {err.args[0]!r}") from err
    except ConfigError as err:
        raise CheckpointError(f"EAGLE-3 config.json: {err}") from err


def save_drafter(drafter: Eagle3Drafter, directory: str | os.PathLike, *, target_name: str = "",
                 target_cfg: ModelConfig | None = None, dtype: Any = None) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    save_params(drafter, drafter_rows(drafter.cfg), path, dtype)
    tensors = load_file(str(path))  # plus the vocabulary maps, exact (int64 / bool)
    tensors["d2t"] = np.asarray(jax.device_get(drafter.d2t[...]), np.int64)
    tensors["t2d"] = np.asarray(jax.device_get(drafter.t2d[...]), bool)
    save_file(tensors, str(path), metadata={"format": "pt"})
    world_readable(path)
    name = jnp.dtype(dtype).name if dtype is not None else jnp.dtype(drafter.fc.kernel[...].dtype).name
    with open(out / "config.json", "w") as f:
        json.dump(hf_config(drafter.cfg, target_name, target_cfg, name), f, indent=2)
    return out


def load_drafter(directory: Path, target_cfg: ModelConfig | None = None, *, dtype: Any = jnp.float32,
                 attention_impl: str = "auto", mesh: Mesh | None = None, replicate_indivisible: bool = False,
                 target_embed_VD: jax.Array | None = None) -> Eagle3Drafter:
    """Loads an export (into its shards on ``mesh``); with ``target_cfg``, checks it fits. A file
    without ``d2t``/``t2d`` drafts over the whole target vocabulary (vLLM's reading too); one without
    ``embed_tokens`` takes the target's (``target_embed_VD``), as vLLM shares it."""
    hf = read_config_json(directory)
    cfg = config_from_hf(hf, target_cfg.num_layers if target_cfg is not None else None)
    if target_cfg is not None:
        try:
            cfg.check_target(target_cfg)
        except ConfigError as err:
            raise CheckpointError(f"drafter {directory} does not match the target: {err}") from err
        recorded = ((hf.get("dflash_eagle3") or {}).get("target") or {}).get("fingerprint")
        if recorded and recorded != target_fingerprint(target_cfg):
            warnings.warn(f"EAGLE-3 drafter {directory} was trained against another target (fingerprint "
                          "mismatch); shapes fit, but acceptance may be poor", stacklevel=2)
    abstract = nnx.eval_shape(lambda: Eagle3Drafter(cfg, dtype=dtype, attention_impl=attention_impl,
                                                    rngs=nnx.Rngs(0)))
    abstract.d2t = abstract.t2d = None  # read exactly below, not through the float rows
    rows = drafter_rows(cfg)
    shared = EMBED not in checkpoint_keys(directory)
    if shared:
        if target_embed_VD is None:
            raise ConfigError(f"EAGLE-3 drafter {directory} has no {EMBED!r} (it shares its target's "
                              "embedding, as vLLM serves it): load it against a loaded target")
        abstract.embed_tokens = None  # the target's, placed below
        rows = tuple(row for row in rows if row.hf != EMBED)
    drafter = load_params_into(abstract, directory, rows, dtype, ignorable=("d2t", "t2d"),
                               mesh=mesh, replicate_indivisible=replicate_indivisible)
    if shared:
        embed_VD = jnp.asarray(target_embed_VD, dtype)
        if mesh is not None:
            embed_VD = jax.device_put(embed_VD, NamedSharding(mesh, param_spec(
                "embed_tokens", embed_VD.shape, mesh, replicate_indivisible=replicate_indivisible)))
        drafter.embed_tokens = nnx.Param(embed_VD)
    single = directory / "model.safetensors"
    tensors = load_file(str(single)) if single.exists() else {}
    if "d2t" in tensors:
        d2t, t2d = tensors["d2t"], tensors.get("t2d")
        if t2d is None:
            t2d = np.zeros(cfg.vocab_size, bool)
            t2d[np.arange(len(d2t)) + d2t] = True
        if d2t.shape != (cfg.draft_vocab_size,) or t2d.shape != (cfg.vocab_size,):
            raise CheckpointError(f"d2t {d2t.shape} / t2d {t2d.shape} do not fit draft_vocab_size="
                                  f"{cfg.draft_vocab_size}, vocab_size={cfg.vocab_size}")
    elif cfg.draft_vocab_size == cfg.vocab_size:
        d2t, t2d = np.zeros(cfg.vocab_size, np.int64), np.ones(cfg.vocab_size, bool)
    else:
        raise CheckpointError(f"{directory}: draft_vocab_size={cfg.draft_vocab_size} < vocab_size "
                              "but no d2t tensor")
    try:
        check_vocab_map(d2t, t2d)
    except ConfigError as err:
        raise CheckpointError(f"{directory}: {err}") from err
    place = (lambda x: jax.device_put(x, NamedSharding(mesh, P()))) if mesh is not None else (lambda x: x)
    drafter.d2t = VocabMap(place(jnp.asarray(d2t, jnp.int32)))
    drafter.t2d = VocabMap(place(jnp.asarray(t2d, bool)))
    return drafter
