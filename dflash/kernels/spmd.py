"""Running the Pallas kernels inside a sharded (GSPMD) program.

XLA cannot partition a Mosaic custom call, so under a mesh (``jax.set_mesh``, as the sharded
train step and the plans trace) each kernel runs per shard in a ``shard_map``: the batch split
over ``data × fsdp`` and the heads over ``tensor``, each as far as the sizes divide (GQA
groups stay whole: query head ``n`` belongs to kv head ``n // G``, so splitting both head
axes by the same factor keeps every group on one device). Attention never mixes rows or kv
heads, so every shard computes exactly its slice of the whole. Without a mesh the kernel runs
as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def _batch_entry(mesh: Any, rows: int) -> Any:
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    while axes and rows % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _head_entry(mesh: Any, heads: int, kv_heads: int) -> Any:
    size = mesh.shape.get(HEAD_AXIS, 1)
    return HEAD_AXIS if size > 1 and heads % size == 0 and kv_heads % size == 0 else None


def per_shard(kernel: Callable[..., jax.Array], args: tuple, layouts: tuple[str, ...], out_layout: str, *,
              rows: int, heads: int, kv_heads: int) -> jax.Array:
    """``kernel(*args)``, in a ``shard_map`` when a mesh is set.

    ``layouts``: one string per argument naming each dimension: ``b`` batch, ``h`` heads
    (query or kv), ``.`` whole (e.g. ``"b.h."`` for ``[B, S, N, H]``; ``""`` for a replicated one).
    """
    mesh = _mesh()
    if mesh is None:
        return kernel(*args)
    b, h = _batch_entry(mesh, rows), _head_entry(mesh, heads, kv_heads)

    def spec(layout: str) -> P:
        return P(*[b if c == "b" else h if c == "h" else None for c in layout])

    in_specs = tuple(spec(x) for x in layouts)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=spec(out_layout),
                         check_vma=False)(*args)
