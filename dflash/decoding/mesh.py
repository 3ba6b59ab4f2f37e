"""Decoding on a device mesh: where requests go, how the batch is padded, what is checked.

The decoding programs are the unsharded ones: under ``jax.set_mesh`` the models' own
``constrain`` calls (layer boundaries, the KV cache) split the batch over ``data × fsdp × expert`` and
heads / MLP / vocabulary over ``tensor``, and the Pallas kernels run per shard
(``kernels/spmd.py``). This module adds what the host side needs: the batch padded to a
multiple of the batch split with dummy rows (their results are dropped), inputs placed in
their shards, compaction that keeps the split, and a clear error for a model that lives
elsewhere. With ``mesh=None`` every helper is the identity of the unsharded engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash.config import ModelConfig
from dflash.errors import ConfigError
from dflash.io.host import to_host  # noqa: F401  (re-exported: the engine's host transfers)
from dflash.sharding import (
    LOGICAL,
    MeshConfig,
    ShardingError,
    batch_sharding,
    batch_shards,
    dotted,
    make_mesh,
    tree_shardings,
)


def batch_split(mesh: Mesh | None) -> int:
    """How many ways the decoding batch is split (1 without a mesh)."""
    return 1 if mesh is None else batch_shards(mesh)


@contextlib.contextmanager
def on_mesh(mesh: Mesh | None) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` (constraints and per-shard kernels active), or nothing."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


def pad_request(prompts: Sequence[Sequence[int]], budgets: int | Sequence[int],
                mesh: Mesh | None) -> tuple[list[Sequence[int]], list[int] | int]:
    """The request padded to a multiple of the batch split with dummy rows.

    A dummy row repeats the first prompt with a budget of one token, so it is finished after the
    prefill and never makes the cache or the loop longer. Dummy rows come last: a row keeps its
    position, so its random draws are those of the unpadded batch where shapes allow.
    """
    split = batch_split(mesh)
    extra = -len(prompts) % split
    if not extra or not prompts:
        return list(prompts), budgets if isinstance(budgets, int) else list(budgets)
    per_row = [budgets] * len(prompts) if isinstance(budgets, int) else list(budgets)
    return list(prompts) + [prompts[0]] * extra, per_row + [1] * extra


def place(x: Any, mesh: Mesh | None, *, batch: bool = True) -> jax.Array:
    """A host array on device: in batch shards (leading axis) or replicated on ``mesh``.

    Built shard by shard from the host copy (``make_array_from_callback``), so every process of
    a multi-host mesh passes the same full array and keeps only its own shards.
    """
    if mesh is None:
        return x if isinstance(x, jax.Array) else jax.numpy.asarray(x)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # replicated
        return jax.random.wrap_key_data(place(jax.random.key_data(x), mesh, batch=False),
                                        impl=jax.random.key_impl(x))
    x = np.asarray(x)
    sharding = batch_sharding(mesh) if batch else NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def check_on_mesh(params: Any, mesh: Mesh | None, what: str) -> None:
    """Refuses a model whose parameters are not on ``mesh``'s devices (the compiled program
    would fail later with an opaque device-assignment error)."""
    if mesh is None or params is None:
        return
    devices = set(mesh.devices.flat)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and sharding.device_set != devices:
            raise ConfigError(
                f"{what} parameter {dotted(path)!r} lives on {len(sharding.device_set)} device(s), not on "
                f"the mesh's {len(devices)}: load it with mesh= (load_target / load_drafter / load_orthrus) "
                "or move it with dflash.sharding.shard_model(model, mesh)")


def compact_rows(done: np.ndarray, split: int) -> np.ndarray:
    """Rows kept when finished rows leave the device batch: every active row, plus the first
    finished rows as padding up to a multiple of ``split`` (they are done; they only fill shards)."""
    active, finished = np.flatnonzero(~done), np.flatnonzero(done)
    pad = -len(active) % split
    return np.sort(np.concatenate([active, finished[:pad]]))


def can_compact(rows: int, split: int) -> bool:
    """Whether dropping finished rows can shrink a batch of ``rows``: once at most half are
    active, the kept rows round up to fewer than ``rows`` only if ``rows`` spans 2+ splits."""
    return rows // split >= 2


def reshard_like(tree: Any, like: Any) -> Any:
    """``tree`` placed with the shardings of ``like``'s leaves (same ranks, fewer rows): the
    compacted carry keeps the layout the loop was compiled for."""
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))


# ----------------------------------------------------------------------------- picking a mesh
FIT_FRACTION = 0.6  # of a device's memory for weights + KV cache; the rest: prefill temporaries, XLA


def device_memory(device: Any) -> int | None:
    """Bytes one device may hold (``memory_stats()['bytes_limit']``), None where unknown (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without the query
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def cache_bytes(cfg: ModelConfig, rows: int, slots: int, dtype: Any, tensor: int = 1) -> int:
    """Bytes of a cache of ``rows`` rows (one device's share) x ``slots`` on one device: each layer
    state's arrays with their ``tensor`` dimensions (kv heads, ...) split where they divide, as
    ``constrain`` places them (``LayerState.AXES``)."""
    from dflash.models.kinds import init_cache

    total = 0
    for state in jax.eval_shape(lambda: init_cache(cfg, rows, slots, dtype)).layers:
        for name, axes in ({} if state is None else type(state).AXES).items():
            x = getattr(state, name)
            named = axes if len(axes) == x.ndim else (None,) * x.ndim  # (a "..." layout: left whole)
            split = [tensor if a is not None and "tensor" in LOGICAL.get(a, ()) and d % tensor == 0 else 1
                     for d, a in zip(x.shape, named, strict=True)]
            shard = [d // k for d, k in zip(x.shape, split, strict=True)]
            total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def abstract_target_state(cfg: ModelConfig, dtype: Any) -> Any:
    """The target's parameter shapes and dtypes (nothing allocated)."""
    from dflash.models.transformer import abstract

    return nnx.state(abstract(cfg, dtype=dtype))


def weight_bytes(state: Any, mesh: Mesh) -> int:
    """Bytes of the parameters ``state`` on one device of ``mesh``: the rule table's shard shapes
    (what ``dflash.plan`` counts); raises ``ShardingError`` where the mesh does not divide a tensor."""
    shardings = tree_shardings(state, mesh)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True))


@dataclasses.dataclass(frozen=True)
class MeshPick:
    """The decoding mesh chosen for a target on some devices, and the one line that says why."""

    config: MeshConfig | None  # None: one device, no mesh
    line: str


def pick_decode_mesh(cfg: ModelConfig, dtype: Any, devices: Sequence[Any], *, rows: int, slots: int,
                     memory_bytes: int | None = None) -> MeshPick:
    """The least tensor parallelism that fits: ``tensor = t`` (the smallest divisor of the device
    count the rule table accepts) such that the target's weights per device plus a KV cache of
    ``rows`` rows x ``slots`` positions (rows split over ``data = devices / t``) take at most
    ``FIT_FRACTION`` of a device's memory (``memory_bytes``, default what the device reports);
    ``data`` takes the rest, so each device decodes its share of the batch. Tensor parallelism
    costs collectives per layer, so it is used only as far as memory needs it. Unknown memory
    (CPU) means ``tensor = 1``. When nothing fits, the largest split, and the line says so."""
    n = len(devices)
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    memory = memory_bytes if memory_bytes is not None else device_memory(devices[0])
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    state, last = abstract_target_state(cfg, dtype), None
    for t in (t for t in range(1, n + 1) if n % t == 0):
        mesh = make_mesh(MeshConfig(data=n // t, tensor=t), list(devices))
        try:
            weights = weight_bytes(state, mesh)
        except ShardingError:
            continue
        cache = cache_bytes(cfg, -(-rows // (n // t)), slots, dtype, t)
        last = (t, weights, cache)
        if memory is None or weights + cache <= FIT_FRACTION * memory:
            break
    if last is None:
        raise ConfigError(f"no data x tensor mesh over {n} devices divides the target's tensors")
    t, weights, cache = last
    config = None if n == 1 else MeshConfig(data=n // t, tensor=t)
    where = "no mesh (1 device)" if config is None else f"mesh data={n // t},tensor={t} over {n} devices"
    need = (f"per device: weights {gb(weights)} + KV cache {gb(cache)} (batch {rows} x {slots} slots over "
            f"data={n // t})")
    if memory is None:
        why = f"{need}; device memory unknown ({kind})"
    elif weights + cache <= FIT_FRACTION * memory:
        why = f"{need} <= {FIT_FRACTION:.0%} of {gb(memory)} ({kind})"
    else:
        why = (f"{need} > {FIT_FRACTION:.0%} of {gb(memory)} ({kind}) even so: expect out-of-memory; "
               "lower the batch or the tokens, or use more chips")
    return MeshPick(config, f"{where}: {why}")
