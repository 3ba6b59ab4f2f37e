"""Running the Pallas kernels inside a sharded (GSPMD) program.

XLA cannot partition a Mosaic custom call, so under a mesh (``jax.set_mesh``, as the sharded
train step and the plans trace) each kernel runs per shard in a ``shard_map``: rows and heads
split as ``dflash.sharding`` places them (the ``batch`` and ``heads`` logical axes, each as far
as the sizes divide). GQA groups stay whole: query head ``n`` belongs to kv head ``n // G``, so
both head axes are split by the same factor or not at all. Attention never mixes rows or kv
heads, so every shard computes exactly its slice of the whole. Without a mesh the kernel runs
as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from dflash.sharding import activation_spec


def _mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def per_shard(kernel: Callable[..., jax.Array], args: tuple, layouts: tuple[str, ...], out_layout: str, *,
              rows: int, heads: int, kv_heads: int) -> jax.Array:
    """``kernel(*args)``, in a ``shard_map`` when a mesh is set.

    ``layouts``: one string per argument naming each dimension: ``b`` batch, ``h`` heads
    (query or kv), ``.`` whole (e.g. ``"b.h."`` for ``[B, S, N, H]``; ``""`` for a replicated one).
    """
    mesh = _mesh()
    if mesh is None:
        return kernel(*args)
    b = activation_spec((rows,), ("batch",), mesh)[0]
    h_q, h_kv = activation_spec((heads, kv_heads), ("heads", "kv_heads"), mesh)
    h = h_q if h_q == h_kv else None  # both head axes split alike, or neither (GQA groups whole)

    def spec(layout: str) -> P:
        return P(*[b if c == "b" else h if c == "h" else None for c in layout])

    in_specs = tuple(spec(x) for x in layouts)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=spec(out_layout),
                         check_vma=False)(*args)
