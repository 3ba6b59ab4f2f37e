"""Loading and saving targets in the Hugging Face checkpoint format.

The HF key <-> parameter mapping is a list of ``WeightRow`` made from the layer kinds
(``target_rows``); loading and saving both read it, so the two directions cannot drift apart.
"""

from __future__ import annotations

import json
import os
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
from dflash.io.mxfp4 import Mxfp4View
from dflash.models import kinds
from dflash.models.kinds import WeightRow
from dflash.models.transformer import Transformer, abstract
from dflash.sharding import param_spec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Short names of checkpoints that ship inside the package: the tiny code target (Qwen3 architecture)
# and its Gemma 4 twin (same sizes, tokenizer and corpus; issue 34's comparison on the tiny scale).
SHIPPED = {"tiny-code": ASSETS / "tiny-code", "tiny-gemma4": ASSETS / "tiny-gemma4"}


TEXT_MODEL = "model."
# Where a multimodal checkpoint (Qwen3.5's ``*ForConditionalGeneration``) keeps its text decoder;
# its ``model.visual.*`` and a target's ``mtp.*`` head are tensors no row reads (not loaded).
WRAPPED_TEXT_MODEL = "model.language_model."


def target_rows(cfg: ModelConfig, prefix: str = TEXT_MODEL) -> tuple[WeightRow, ...]:
    """Every tensor of a target checkpoint and the parameter it fills (what the layer kinds say);
    the decoder's tensors under ``prefix`` (``lm_head.weight`` is top-level either way)."""
    rows = [WeightRow(f"{prefix}embed_tokens.weight", "embed_tokens"), WeightRow(f"{prefix}norm.weight",
                                                                                 "norm.weight")]
    if not cfg.tie_word_embeddings:
        rows.append(WeightRow("lm_head.weight", "lm_head", transpose=True))
    if cfg.per_layer_input_size:  # Gemma 4's per-layer inputs
        rows += [WeightRow(f"{prefix}embed_tokens_per_layer.weight", "embed_tokens_per_layer"),
                 WeightRow(f"{prefix}per_layer_model_projection.weight", "per_layer_model_projection.kernel",
                           transpose=True),
                 WeightRow(f"{prefix}per_layer_projection_norm.weight", "per_layer_projection_norm.weight")]
    for i in range(cfg.num_layers):
        rows += kinds.layer_weights(cfg, i, prefix=prefix)
    return tuple(rows)


def _path_key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


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
    if path.parent.is_dir():  # `runs/tiny_code` where runs/ exists: a path that is not there, not a hub id
        held = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        listed = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "")
        raise CheckpointError(f"{path.absolute()} does not exist ({path.parent}/ holds "
                              f"{listed or 'no directory'})")
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


def read_config_json(directory: Path) -> dict[str, Any]:
    """A checkpoint directory's ``config.json`` as a dict (a missing or unreadable one is named)."""
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"missing file: {cfg_path}")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON (line {err.lineno}: {err.msg})") from err


def read_config(directory: Path) -> ModelConfig:
    return kinds.check(ModelConfig.from_hf(read_config_json(directory)))


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
        # MXFP4 tensors (gpt-oss experts): ``{key}_blocks`` + ``{key}_scales`` read as ``key``.
        self.mxfp4 = {k.removesuffix("_blocks") for k in self.key_to_file
                      if k.endswith("_blocks") and k.removesuffix("_blocks") + "_scales" in self.key_to_file}

    def _handle(self, key: str) -> Any:
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        return self._handles[file]

    def get(self, key: str) -> np.ndarray:
        if key in self.mxfp4:
            return self.slice(key)[tuple(slice(None) for _ in self.slice(key).get_shape())]
        return self._handle(key).get_tensor(key)

    def slice(self, key: str) -> Any:
        """A lazy view: indexing it reads only that part of the file (MXFP4: dequantised)."""
        if key in self.mxfp4:
            return Mxfp4View(*(self._handle(key + s).get_slice(key + s) for s in ("_blocks", "_scales")))
        return self._handle(key).get_slice(key)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file or key in self.mxfp4

    def keys(self) -> set[str]:
        packed = {k + s for k in self.mxfp4 for s in ("_blocks", "_scales")}
        return (set(self.key_to_file) - packed) | self.mxfp4


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # tensor dtypes a checkpoint may hold


def _check_dtype(hf_key: str, array: np.ndarray) -> None:
    if np.dtype(array.dtype).name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"tensor {hf_key!r} has dtype {np.dtype(array.dtype).name}, which is not "
                              f"supported (supported: {', '.join(SUPPORTED_DTYPES)}; quantized "
                              "checkpoints must be dequantized first)")


def _file_read(row: WeightRow, index: tuple[slice, ...], each: tuple[int, ...], read: Any) -> np.ndarray:
    """``index`` of our per-tensor shape ``each`` from one HF tensor of ``row`` (``read(slices)``
    reads a block of the file): the last two axes swapped when transposed, the row's part of a
    fused tensor (``WeightRow.columns``: the file block spanning them is read, then picked)."""
    out = [slice(*s.indices(d)[:2]) for s, d in zip(index, each, strict=True)]
    if row.transpose:
        out[-2], out[-1] = out[-1], out[-2]
    if not row.fused:
        return read(tuple(out))
    axis, ours = row.out_axis, out[row.out_axis]
    cols = row.columns(each[row.our_axis])[ours.start:ours.stop]
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    out[axis] = slice(lo, hi)
    block = read(tuple(out))
    return block if hi - lo == len(cols) else np.take(block, cols - lo, axis=axis)


def _ours(row: WeightRow, hf_key: str, part: np.ndarray) -> np.ndarray:
    _check_dtype(hf_key, part)
    return np.ascontiguousarray(np.swapaxes(part, -1, -2) if row.transpose else part)


def _read_sharded(source: _TensorSource, row: WeightRow, shape: tuple[int, ...], dtype: jnp.dtype,
                  sharding: NamedSharding) -> jax.Array:
    """One parameter read slice by slice straight into its shards (at most one copy on the host)."""
    parts: dict[Any, np.ndarray] = {}
    each = shape[1:] if row.experts else shape

    def one(hf_key: str, index: tuple[slice, ...]) -> np.ndarray:
        part = _file_read(row, index, each, source.slice(hf_key).__getitem__)
        return _ours(row, hf_key, part).astype(dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in parts:  # devices that replicate a shard share one read
            if row.experts:  # axis 0 runs over the experts' tensors
                experts = range(row.experts)[index[0]]
                parts[key] = np.stack([one(row.hf.format(e=e), index[1:]) for e in experts])
            else:
                parts[key] = one(row.hf, index)
        return parts[key]

    return jax.make_array_from_callback(shape, sharding, read)


def _read_whole(source: _TensorSource, row: WeightRow, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    each = shape[1:] if row.experts else shape
    whole = tuple(slice(None) for _ in each)

    def one(hf_key: str) -> np.ndarray:
        return _ours(row, hf_key, _file_read(row, whole, each, source.get(hf_key).__getitem__))

    if row.experts:
        return jnp.asarray(np.stack([one(k) for k in row.hf_keys()]), dtype=dtype)
    return jnp.asarray(one(row.hf), dtype=dtype)


def _present(row: WeightRow, source: _TensorSource, directory: Path) -> WeightRow:
    """``row``, or its alternative layout when the checkpoint has that one instead."""
    if all(k in source for k in row.hf_keys()):
        return row
    alt = row.alternative
    if alt is not None and all(k in source for k in alt.hf_keys()):
        return alt
    missing = next(k for k in row.hf_keys() if k not in source)
    also = f" (or {alt.hf_keys()[0]!r})" if alt is not None else ""
    raise CheckpointError(f"checkpoint {directory} is missing tensor {missing!r}{also}")


def load_params_into(model: nnx.Module, directory: Path, rows: tuple[WeightRow, ...], dtype: jnp.dtype, *,
                     ignorable: tuple[str, ...] | None = None, mesh: Mesh | None = None,
                     replicate_indivisible: bool = False) -> nnx.Module:
    """Fills an abstract (``eval_shape``) module from safetensors via its weight ``rows``.

    With ``ignorable`` set, any tensor in the files that no row reads and that is not listed
    there is an error (a foreign checkpoint is refused instead of half-loaded). With a ``mesh``,
    each device's slice of each tensor is read from the file into that device
    (``dflash.sharding`` rules); no tensor is ever whole on one device.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    by_key = {_path_key(p): p for p in flat}
    source = _TensorSource(directory)
    filled: dict[tuple[Any, ...], Any] = {}
    used: set[str] = set()
    for row in rows:
        if row.ours not in by_key:
            raise CheckpointError(f"weight row {row.hf!r} names parameter {row.ours!r}, which the model "
                                  "lacks")
        var = flat[by_key[row.ours]]
        row = _present(row, source, directory)
        expected = row.file_shape(tuple(var.shape))  # in the file's layout
        used.update(row.hf_keys())
        for hf_key in row.hf_keys():
            found = tuple(source.slice(hf_key).get_shape())
            if found != expected:
                raise CheckpointError(f"tensor {hf_key!r} has shape {found} but the config expects "
                                      f"{expected}")
        if mesh is not None:
            sharding = NamedSharding(mesh, param_spec(row.ours, var.shape, mesh,
                                                      replicate_indivisible=replicate_indivisible))
            value = _read_sharded(source, row, tuple(var.shape), dtype, sharding)
        else:
            value = _read_whole(source, row, tuple(var.shape), dtype)
        filled[by_key[row.ours]] = var.replace(value)
    unfilled = set(flat) - set(filled)
    if unfilled:
        raise CheckpointError(f"no table row fills parameters {sorted(map(_path_key, unfilled))}")
    if ignorable is not None:
        extra = sorted(source.keys() - used - set(ignorable))
        if extra:
            raise CheckpointError(f"checkpoint {directory} has tensors this model does not have: "
                                  f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def checkpoint_keys(directory: Path) -> set[str]:
    """The tensor names of a checkpoint directory (single or indexed safetensors)."""
    return _TensorSource(directory).keys()


def weight_map(directory: Path) -> dict[str, str]:
    """Every tensor of a checkpoint directory -> its file there, as an index's ``weight_map``."""
    return {k: str(f.relative_to(directory)) for k, f in _TensorSource(directory).key_to_file.items()}


def load_target(name_or_path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32,
                attention_impl: str = "auto", mesh: Mesh | None = None,
                replicate_indivisible: bool = False) -> Transformer:
    """Loads a target from a HF directory / shipped name / hub id (single or sharded safetensors).

    With ``mesh``, every tensor is read slice by slice into its shards (``dflash.sharding``).
    """
    directory = resolve(name_or_path)
    cfg = read_config(directory)
    model = abstract(cfg, dtype=dtype, attention_impl=attention_impl)
    wrapped = f"{WRAPPED_TEXT_MODEL}embed_tokens.weight" in _TensorSource(directory)
    return load_params_into(model, directory, target_rows(cfg, WRAPPED_TEXT_MODEL if wrapped else TEXT_MODEL),
                            dtype, mesh=mesh, replicate_indivisible=replicate_indivisible)


def read_embedding(name_or_path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """A target checkpoint's word-embedding table ``[V, D]`` alone, as ``load_target`` holds it (in
    ``dtype``), without reading any other tensor (an export that needs only it, of a 31B target)."""
    directory = resolve(name_or_path)
    source = _TensorSource(directory)
    for key in (f"{WRAPPED_TEXT_MODEL}embed_tokens.weight", f"{TEXT_MODEL}embed_tokens.weight"):
        if key in source:
            array = source.get(key)
            _check_dtype(key, array)
            return jnp.asarray(array, dtype=dtype)
    raise CheckpointError(f"checkpoint {directory} has no {TEXT_MODEL}embed_tokens.weight")


def save_params(model: nnx.Module, rows: tuple[WeightRow, ...], path: Path, dtype: Any = None,
                extra: dict[str, np.ndarray] | None = None) -> None:
    """Writes ``model``'s parameters as safetensors under their HF names (``[out, in]`` layout), and
    the ``extra`` tensors (HF name -> array, cast to ``dtype``) beside them."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_key = {_path_key(p): v for p, v in flat.items()}
    tensors: dict[str, np.ndarray] = {}
    for row in rows:
        array = np.asarray(jax.device_get(by_key[row.ours][...]))
        if dtype is not None:
            array = array.astype(dtype)
        for hf_key, part in zip(row.hf_keys(), array if row.experts else [array], strict=True):
            value = np.swapaxes(part, -1, -2) if row.transpose else part
            if row.fused:  # one part of a fused tensor: its columns of the whole
                shape, axis = list(value.shape), row.out_axis
                shape[axis] = row.fused_width(shape[axis])
                fused = tensors.setdefault(hf_key, np.zeros(shape, value.dtype))
                at: list[Any] = [slice(None)] * value.ndim
                at[axis] = row.columns(value.shape[axis])
                fused[tuple(at)] = value
            else:
                tensors[hf_key] = np.ascontiguousarray(value)
    missing = set(by_key) - {row.ours for row in rows}
    if missing:
        raise CheckpointError(f"no table row names parameters {sorted(missing)}")
    for hf_key, array in (extra or {}).items():
        tensors[hf_key] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
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
    save_params(model, target_rows(model.cfg), out / "model.safetensors", dtype)
    hf_cfg = model.cfg.to_hf()
    if dtype is not None:
        hf_cfg["torch_dtype"] = np.dtype(dtype).name
    hf_cfg.update(extra_config or {})
    with open(out / "config.json", "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return out
