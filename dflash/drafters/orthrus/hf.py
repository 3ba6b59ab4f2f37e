"""Orthrus drafters in a Hugging Face layout: a full model or a delta against its target.

Both forms have a ``config.json`` = the target's own HF config plus ``block_size``,
``mask_token_id`` and an ``orthrus_config`` section (form, target reference). Tensor names are
the target's (``model.layers.{i}.self_attn.q_proj.weight`` ...) plus, per layer,
``model.layers.{i}.self_attn.{q,k,v,o}_proj_diff.weight`` (and ``.bias`` where the target's
projections have one) and ``model.layers.{i}.self_attn.{q,k}_norm_diff.weight``.

- **full** (``architectures: ["OrthrusForCausalLM"]``): target tensors and diffusion tensors as
  an indexed two-shard checkpoint (``model.safetensors.index.json``), self-contained: the
  target loads from the same directory.
- **delta** (``architectures: ["OrthrusDeltaModel"]``): only the diffusion tensors in
  ``model.safetensors`` plus a reference to the target (name or path, an architecture
  fingerprint and a weights fingerprint). Small: what ships as ``tiny-code-orthrus``.

Loading checks a given target against the recorded fingerprints and refuses a wrong one with
an error that names both; the diffusion view reuses the target's frozen MLPs and norms, so a
drafter only makes sense on the exact weights it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ConfigError, ModelConfig
from dflash.drafters.dflash.hf import target_fingerprint
from dflash.drafters.orthrus.model import OrthrusConfig, OrthrusDrafter
from dflash.errors import CheckpointError
from dflash.io.host import to_host
from dflash.io.loading import ASSETS, load_params_into, read_config_json, save_params, target_rows
from dflash.models import kinds
from dflash.models.kinds import WeightRow
from dflash.models.transformer import Transformer

FULL_ARCH = "OrthrusForCausalLM"
DELTA_ARCH = "OrthrusDeltaModel"
ARCHITECTURES = (FULL_ARCH, DELTA_ARCH)
SHIPPED_ORTHRUS = {"tiny-code-orthrus": ASSETS / "tiny-code-orthrus"}



def _diff(name: str) -> str:
    """``q_proj.weight`` -> ``q_proj_diff.weight``: the diffusion twin of an attention tensor."""
    head, dot, rest = name.partition(".")
    return f"{head}_diff{dot}{rest}"


def diff_rows(cfg: OrthrusConfig) -> tuple[WeightRow, ...]:
    """Per layer, the diffusion twin of every tensor of the target's attention (same shapes)."""
    rows = []
    for i, spec in enumerate(cfg.target.layers):
        attn = kinds.mixer_kind(spec)
        for row in attn.weights(cfg.target, spec):
            rows.append(WeightRow(f"model.layers.{i}.{attn.attr}.{_diff(row.hf)}",
                                  f"layers.{i}.{_diff(row.ours)}",
                                  row.transpose, row.experts))
    return tuple(rows)


_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")  # target, diffusion


def target_weights_fingerprint(target: Transformer, samples: int = 256) -> str:
    """Short hash of a strided sample of every target tensor (cheap even for 8B targets).

    On a target sharded over several processes every process must call it (the sample is gathered).

    Values are rounded to bfloat16 first, so a bf16 checkpoint loaded in fp32 or bf16 gives
    the same fingerprint; a different checkpoint of the same architecture does not.
    """
    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(target, nnx.Param)), key=lambda pv: str(pv[0])):
        flat = jnp.ravel(var[...])
        sample = flat[:: max(1, flat.shape[0] // samples)][:samples]
        values = to_host(sample.astype(jnp.bfloat16).astype(jnp.float32))  # gathered if sharded over hosts
        digest.update(".".join(map(str, path)).encode())
        digest.update(str(tuple(var.shape)).encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def orthrus_hf_config(cfg: OrthrusConfig, target: Transformer, form: Literal["full", "delta"],
                      target_name: str = "", dtype: str = "float32",
                      weights_fingerprint: str | None = None) -> dict[str, Any]:
    out = target.cfg.to_hf()
    out.update({
        "architectures": [FULL_ARCH if form == "full" else DELTA_ARCH],
        "block_size": cfg.block_size,
        "mask_token_id": cfg.mask_token_id,
        "torch_dtype": dtype,
        "orthrus_config": {
            "form": form, "block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id,
            "target_architectures": target.cfg.to_hf()["architectures"],
            "target": {"name_or_path": str(target_name), "fingerprint": target_fingerprint(target.cfg),
                       "weights_fingerprint": weights_fingerprint or target_weights_fingerprint(target)},
        },
    })
    return out


def save_orthrus(drafter: OrthrusDrafter, target: Transformer, directory: str | os.PathLike, *,
                 form: Literal["full", "delta"] = "delta", target_name: str = "", dtype: Any = None,
                 weights_fingerprint: str | None = None) -> Path:
    """Writes the drafter (``delta``: diffusion tensors only; ``full``: target + diffusion).

    ``weights_fingerprint``: the target's, computed beforehand (a multi-process trainer computes it
    on every process, then process 0 exports with a target whose shards it does not all hold)."""
    if form not in ("full", "delta"):
        raise ConfigError(f"form must be 'full' or 'delta', got {form!r}")
    drafter.cfg.check_target(target.cfg)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if form == "delta":
        save_params(drafter, diff_rows(drafter.cfg), out / "model.safetensors", dtype)
    else:
        from safetensors import safe_open

        save_params(target, target_rows(target.cfg), out / _SHARDS[0], dtype)
        save_params(drafter, diff_rows(drafter.cfg), out / _SHARDS[1], dtype)
        weight_map = {}
        for shard in _SHARDS:
            with safe_open(out / shard, framework="numpy") as f:
                weight_map.update({k: shard for k in f.keys()})
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"format": "pt"}, "weight_map": weight_map}, f, indent=2)
    name = jnp.dtype(dtype).name if dtype is not None else jnp.dtype(
        drafter.layers[0].q_proj_diff.kernel[...].dtype).name
    with open(out / "config.json", "w") as f:
        json.dump(orthrus_hf_config(drafter.cfg, target, form, target_name, name, weights_fingerprint), f,
                  indent=2)
    return out


# ----------------------------------------------------------------------------- loading
def is_orthrus_config(hf: dict[str, Any]) -> bool:
    return any(a in ARCHITECTURES for a in hf.get("architectures") or [])


def _target_config(hf: dict[str, Any]) -> ModelConfig:
    base = dict(hf)
    base["architectures"] = (hf.get("orthrus_config") or {}).get("target_architectures")
    try:
        return kinds.check(ModelConfig.from_hf(base))
    except ConfigError as err:
        raise CheckpointError(f"Orthrus config.json does not describe a supported target: {err}") from err


def read_orthrus_config(directory: Path) -> tuple[OrthrusConfig, ModelConfig, dict[str, Any]]:
    """(drafter config, the target's architecture, the raw config.json) of an Orthrus export."""
    hf = read_config_json(directory)
    if not is_orthrus_config(hf):
        raise CheckpointError(f"not an Orthrus drafter: {directory}/config.json architectures="
                              f"{hf.get('architectures')!r} (expected one of {list(ARCHITECTURES)})")
    ocfg = hf.get("orthrus_config") or {}
    for key in ("form", "block_size", "mask_token_id"):
        if key not in ocfg:
            raise CheckpointError(f"Orthrus config.json lacks orthrus_config.{key}")
    tcfg = _target_config(hf)
    try:
        cfg = OrthrusConfig(target=tcfg, mask_token_id=int(ocfg["mask_token_id"]),
                            block_size=int(ocfg["block_size"]))
    except ConfigError as err:
        raise CheckpointError(f"Orthrus config.json in {directory} is invalid: {err}") from err
    return cfg, tcfg, hf


def _check_target(directory: Path, hf: dict[str, Any], cfg: OrthrusConfig, target_cfg: ModelConfig,
                  target: Transformer | None) -> None:
    ref = (hf.get("orthrus_config") or {}).get("target") or {}
    name = ref.get("name_or_path") or "?"
    try:
        cfg.check_target(target_cfg)
    except ConfigError as err:
        raise CheckpointError(f"Orthrus drafter {directory} (made for target {name!r}) does not fit this "
                              f"target: {err}") from err
    if ref.get("fingerprint") and ref["fingerprint"] != target_fingerprint(target_cfg):
        raise CheckpointError(
            f"Orthrus drafter {directory} was made for target {name!r} with architecture fingerprint "
            f"{ref['fingerprint']}, but this target's is {target_fingerprint(target_cfg)} (its config.json "
            "differs: rope, vocabulary or norms); load it with the target it was trained on")
    if target is not None and ref.get("weights_fingerprint"):
        got = target_weights_fingerprint(target)
        if got != ref["weights_fingerprint"]:
            raise CheckpointError(
                f"Orthrus drafter {directory} was made for target {name!r} with weights fingerprint "
                f"{ref['weights_fingerprint']}, but this target's weights give {got}: same architecture, "
                "different checkpoint. The diffusion view runs the target's own frozen layers, so it only "
                "works with the exact target it was trained on")


def load_orthrus(directory: Path, target: Transformer | None = None, *,
                 target_cfg: ModelConfig | None = None, dtype: jnp.dtype = jnp.float32,
                 attention_impl: str = "auto", mesh: Mesh | None = None,
                 replicate_indivisible: bool = False) -> OrthrusDrafter:
    """Loads the diffusion attentions of a full or delta export (into their shards on ``mesh``).

    With ``target`` (a loaded model) the recorded architecture *and* weights fingerprints are
    checked; with only ``target_cfg``, the architecture.
    """
    cfg, tcfg, hf = read_orthrus_config(directory)
    if target is not None or target_cfg is not None:
        _check_target(directory, hf, cfg, target.cfg if target is not None else target_cfg, target)
    shapes = nnx.eval_shape(lambda: OrthrusDrafter(cfg, dtype=dtype, attention_impl=attention_impl,
                                                   rngs=nnx.Rngs(0)))
    # Like a DFlash export, a tensor that is neither ours nor expected is refused: a full export
    # also holds its target's tensors, a delta export nothing else.
    target_keys = tuple(k for row in target_rows(tcfg) for k in row.hf_keys())
    ignorable = target_keys if hf["orthrus_config"]["form"] == "full" else ()
    return load_params_into(shapes, directory, diff_rows(cfg), dtype, ignorable=ignorable,
                            mesh=mesh, replicate_indivisible=replicate_indivisible)
