"""Loading and saving targets in the Hugging Face checkpoint format.

The HF key -> our parameter mapping is the single table ``WEIGHT_TABLE``; loading and
saving both read it, so the two directions cannot drift apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from dflash.config import ModelConfig
from dflash.errors import CheckpointError
from dflash.files import open_safetensors
from dflash.models.transformer import Transformer, abstract
from dflash.sharding import param_spec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Short names of checkpoints that ship inside the package.
SHIPPED = {"tiny-code": ASSETS / "tiny-code"}


# (HF key template, our state path template, transpose?) — ``{i}`` is the layer index.
# Rows whose parameter the model lacks (bias, q/k norm, lm_head) are skipped. Decoder-layer
# rows are shared by the target and the DFlash drafter (which has no ``model.`` prefix).
LAYER_TABLE: tuple[tuple[str, str, bool], ...] = tuple(
    (f"layers.{{i}}.{hf}", f"layers.{{i}}.{ours}", transpose)
    for hf, ours, transpose in (
        ("input_layernorm.weight", "input_layernorm.weight", False),
        ("post_attention_layernorm.weight", "post_attention_layernorm.weight", False),
        *((f"self_attn.{p}_proj.weight", f"self_attn.{p}_proj.kernel", True) for p in "qkvo"),
        *((f"self_attn.{p}_proj.bias", f"self_attn.{p}_proj.bias", False) for p in "qkvo"),
        ("self_attn.q_norm.weight", "self_attn.q_norm.weight", False),
        ("self_attn.k_norm.weight", "self_attn.k_norm.weight", False),
        *((f"mlp.{p}_proj.weight", f"mlp.{p}_proj.kernel", True) for p in ("gate", "up", "down")),
        *((f"mlp.{p}_proj.bias", f"mlp.{p}_proj.bias", False) for p in ("gate", "up", "down")),
    )
)
WEIGHT_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head", True),
    *((f"model.{hf}", ours, t) for hf, ours, t in LAYER_TABLE),
)


def _path_key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def weight_pairs(table: tuple[tuple[str, str, bool], ...], num_layers: int,
                 present: set[str]) -> Iterator[tuple[str, str, bool]]:
    """Expands ``table`` to concrete (hf_key, our_path, transpose) rows for ``present`` paths."""
    for hf, ours, transpose in table:
        layers = range(num_layers) if "{i}" in hf else [None]
        for i in layers:
            our = ours.format(i=i)
            if our in present:
                yield hf.format(i=i), our, transpose


# ----------------------------------------------------------------------------- resolving
def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local dir, a shipped short name (``tiny-code``), or a hub id found in / fetched to the cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in SHIPPED:
        shipped = SHIPPED[str(name_or_path)]
        if not (shipped / "config.json").exists():
            raise CheckpointError(f"shipped checkpoint {name_or_path!r} is missing at {shipped}")
        return shipped
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise CheckpointError(
            f"{name!r} is not a checkpoint directory (looked for {path.absolute()}), a shipped name "
            f"({', '.join(SHIPPED)}), or a hub id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download  # deferred: only hub ids need the hub client
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        pass  # not cached (or not a valid id): the download below tries, and reports why it cannot
    # A local directory wins over a hub id; when neither exists, say where both were looked for.
    local = f"{name!r} is not a local directory (looked for {path.absolute()})"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(
            f"{local}, and as a hub id it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:  # network errors, missing repos, gated repos
        raise CheckpointError(
            f"{local}, and as a hub id it is not in the local Hugging Face cache and could not be "
            f"downloaded (offline or unreachable?): {type(err).__name__}: {err}"
        ) from err


def read_config(directory: Path) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"missing file: {cfg_path}")
    with open(cfg_path) as f:
        return ModelConfig.from_hf(json.load(f))


class _TensorSource:
    """Reads tensors by HF key from one or several (indexed) safetensors files."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).exists():
                    raise CheckpointError(f"missing shard {directory / name} listed in {index}")
            self.key_to_file = {k: directory / v for k, v in weight_map.items()}
        elif single.exists():
            with open_safetensors(single) as f:
                self.key_to_file = {k: single for k in f.keys()}
        else:
            raise CheckpointError(
                f"missing file: neither {single} nor {index} exists"
            )
        self._handles: dict[Path, Any] = {}

    def _handle(self, key: str) -> Any:
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        return self._handles[file]

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def slice(self, key: str) -> Any:
        """A lazy view: indexing it reads only that part of the file."""
        return self._handle(key).get_slice(key)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> set[str]:
        return set(self.key_to_file)


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# Names of the dtypes a model can be loaded or computed in (configs and CLIs take these names).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_dtype(hf_key: str, array: np.ndarray) -> None:
    if np.dtype(array.dtype).name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"tensor {hf_key!r} has dtype {np.dtype(array.dtype).name}, which is not "
                              f"supported (supported: {', '.join(SUPPORTED_DTYPES)}; quantized "
                              "checkpoints must be dequantized first)")


def _read_sharded(source: _TensorSource, hf_key: str, transpose: bool, shape: tuple[int, ...],
                  dtype: jnp.dtype, sharding: NamedSharding) -> jax.Array:
    """One parameter read slice by slice straight into its shards (at most one copy on the host)."""
    view, parts = source.slice(hf_key), {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in parts:  # devices that replicate a shard share one read
            part = view[index[::-1] if transpose else index]
            _check_dtype(hf_key, part)
            parts[key] = np.ascontiguousarray(part.T if transpose else part).astype(dtype)
        return parts[key]

    return jax.make_array_from_callback(shape, sharding, read)


def load_params_into(model: nnx.Module, directory: Path, table: tuple[tuple[str, str, bool], ...],
                     num_layers: int, dtype: jnp.dtype, *,
                     ignorable: tuple[str, ...] | None = None, mesh: Mesh | None = None,
                     replicate_indivisible: bool = False) -> nnx.Module:
    """Fills an abstract (``eval_shape``) module from safetensors via a weight ``table``.

    With ``ignorable`` set, any tensor in the files that the table does not read and that is
    not listed there is an error (a foreign checkpoint is refused instead of half-loaded).
    With a ``mesh``, each device's slice of each tensor is read from the file into that
    device (``dflash.sharding`` rules); no tensor is ever whole on one device.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    by_key = {_path_key(p): p for p in flat}
    source = _TensorSource(directory)
    filled: dict[tuple[Any, ...], Any] = {}
    for hf_key, our, transpose in weight_pairs(table, num_layers, set(by_key)):
        if hf_key not in source:
            raise CheckpointError(f"checkpoint {directory} is missing tensor {hf_key!r}")
        var = flat[by_key[our]]
        expected = tuple(var.shape)[::-1] if transpose else tuple(var.shape)  # in the file's layout
        found = tuple(source.slice(hf_key).get_shape())
        if found != expected:
            raise CheckpointError(f"tensor {hf_key!r} has shape {found} but the config expects {expected}")
        if mesh is not None:
            sharding = NamedSharding(mesh, param_spec(our, var.shape, mesh,
                                                      replicate_indivisible=replicate_indivisible))
            value = _read_sharded(source, hf_key, transpose, tuple(var.shape), dtype, sharding)
        else:
            array = source.get(hf_key)
            _check_dtype(hf_key, array)
            value = jnp.asarray(array.T if transpose else array, dtype=dtype)
        filled[by_key[our]] = var.replace(value)
    unfilled = set(flat) - set(filled)
    if unfilled:
        raise CheckpointError(f"no table row fills parameters {sorted(map(_path_key, unfilled))}")
    if ignorable is not None:
        used = {hf for hf, _, _ in weight_pairs(table, num_layers, set(by_key))}
        extra = sorted(source.keys() - used - set(ignorable))
        if extra:
            raise CheckpointError(f"checkpoint {directory} has tensors this model does not have: "
                                  f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_target(name_or_path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32,
                attention_impl: str = "auto", mesh: Mesh | None = None,
                replicate_indivisible: bool = False) -> Transformer:
    """Loads a target from a HF directory / shipped name / hub id (single or sharded safetensors).

    With ``mesh``, every tensor is read slice by slice into its shards (``dflash.sharding``).
    """
    directory = resolve(name_or_path)
    cfg = read_config(directory)
    model = abstract(cfg, dtype=dtype, attention_impl=attention_impl)
    return load_params_into(model, directory, WEIGHT_TABLE, cfg.num_layers, dtype, mesh=mesh,
                            replicate_indivisible=replicate_indivisible)


def save_params(model: nnx.Module, table: tuple[tuple[str, str, bool], ...], num_layers: int,
                path: Path, dtype: Any = None) -> None:
    """Writes ``model``'s parameters as safetensors under their HF names (``[out, in]`` layout)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_key = {_path_key(p): v for p, v in flat.items()}
    tensors: dict[str, np.ndarray] = {}
    for hf_key, our, transpose in weight_pairs(table, num_layers, set(by_key)):
        array = np.asarray(jax.device_get(by_key[our][...]))
        if dtype is not None:
            array = array.astype(dtype)
        tensors[hf_key] = np.ascontiguousarray(array.T if transpose else array)
    missing = set(by_key) - {our for _, our, _ in weight_pairs(table, num_layers, set(by_key))}
    if missing:
        raise CheckpointError(f"no table row names parameters {sorted(missing)}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    world_readable(path)


def world_readable(path: str | os.PathLike) -> None:
    """Gives ``path`` the mode ``open()`` would (0644 under the usual umask 022).

    safetensors writes its files 0600, which a serving container running as another user
    cannot read; ``save_pretrained`` outputs are world-readable and exports should be too.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_target(model: Transformer, directory: str | os.PathLike, *, dtype: Any = None,
                extra_config: dict[str, Any] | None = None) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` in the layout ``transformers`` loads."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_params(model, WEIGHT_TABLE, model.cfg.num_layers, out / "model.safetensors", dtype)
    hf_cfg = model.cfg.to_hf()
    if dtype is not None:
        hf_cfg["torch_dtype"] = np.dtype(dtype).name
    hf_cfg.update(extra_config or {})
    with open(out / "config.json", "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return out
