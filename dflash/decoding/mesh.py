"""Decoding on a device mesh: where requests go, how the batch is padded, what is checked.

The decoding programs are the unsharded ones: under ``jax.set_mesh`` the models' own
``constrain`` calls (layer boundaries, the KV cache) split the batch over ``data × fsdp`` and
heads / MLP / vocabulary over ``tensor``, and the Pallas kernels run per shard
(``kernels/spmd.py``). This module adds what the host side needs: the batch padded to a
multiple of the batch split with dummy rows (their results are dropped), inputs placed in
their shards, compaction that keeps the split, and a clear error for a model that lives
elsewhere. With ``mesh=None`` every helper is the identity of the unsharded engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash.errors import ConfigError
from dflash.io.host import to_host  # noqa: F401  (re-exported: the engine's host transfers)
from dflash.sharding import batch_sharding, batch_shards, dotted


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
