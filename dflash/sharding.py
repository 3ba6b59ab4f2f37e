"""Device meshes and the one partition-rule table (design.md §11).

Mesh axes: ``data`` (pure replicas), ``fsdp`` (replicas that also split parameters and
optimizer state, ZeRO-3), ``expert`` (a mixture-of-experts layer's experts split across devices,
tokens sent to them: ``dflash.models.moe_mlp``) and ``tensor`` (Megatron splitting inside a
layer); the batch goes over ``data × fsdp × expert`` (outside the MoE layers the expert devices
are more replicas, so none of them idles). ``RULES`` maps a parameter path (regex) to one *logical* axis per
dimension and ``LOGICAL`` maps logical axes to mesh axes; every model (target, DFlash,
Orthrus) and the optimizer state are sharded by these two tables and nothing else.
Activations are pinned with ``constrain`` (a no-op unless a mesh is set with ``jax.set_mesh``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash.errors import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")  # the mesh's order: tensor innermost (nearest chips)
BATCH = ("data", "fsdp", "expert")

# Logical axis -> mesh axes. "embed" is a parameter's model-width dimension (ZeRO-3 over
# fsdp); activations keep their width whole and name it None.
LOGICAL: dict[str, tuple[str, ...]] = {
    "batch": BATCH,
    "embed": ("fsdp",),
    "exp": ("expert",),  # a MoE layer's expert dimension
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

# Parameter path (dotted, searched) -> logical axes of each dimension. Kernels are
# ``[in, out]``: column-parallel layers split ``out`` over tensor, row-parallel ones ``in``.
# These rows cover what every model has (embedding, LM head, norms); each layer kind and each
# drafter kind adds the rows of its own parameters when it is registered (``register_rules``,
# called by ``dflash.models.kinds`` and ``dflash.drafters.registry``), so the table is one list.
RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(^|\.)embed_tokens$", ("vocab", "embed")),
    (r"(^|\.)lm_head$", ("embed", "vocab")),
    (r"(^|\.)\w*norm(_diff)?\.weight$", (None,)),  # every RMSNorm: replicated
]

# Activations and cache states: logical axes of each dimension (``...`` fills the middle), the
# same logical names as the parameters', so one ``LOGICAL`` map places everything.
LAYOUTS: dict[str, tuple[Any, ...]] = {
    "hidden": ("batch", ..., None),  # [B, ..., D] at layer boundaries: batch over data x fsdp x expert
    "heads": ("batch", ..., "heads", None),  # [B, T, N, H] projected heads
    "mlp": ("batch", ..., "mlp"),  # [B, ..., F] MLP width
    "vocab": ("batch", ..., "vocab"),  # [B, ..., V] logits
    "kv_cache": ("batch", None, "kv_heads", None),  # [B, S, K, H] one attention layer's cache
    "kv_stack": (None, "batch", None, "kv_heads", None),  # [L, B, S, K, H] every layer's K/V of a pass
    "chunks": (None, "batch", ..., None),  # [n, B, ..., D] scanned chunks of hidden states
}


def register_rules(rows: Sequence[tuple[str, tuple[str | None, ...]]]) -> None:
    """Adds a layer kind's parameter rows to ``RULES`` (a row already there is not added twice)."""
    for row in rows:
        if row not in RULES:
            RULES.append(row)


class ShardingError(ConfigError):
    """A mesh or a tensor's sharding is impossible; the message names the tensor and the axis."""


# ----------------------------------------------------------------------------- meshes
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over ``data × fsdp × expert × tensor``; one axis may be -1 ("the rest of the
    devices"). Positional order ``(data, fsdp, tensor, expert)``: three-axis tuples still mean
    ``(data, fsdp, tensor)``."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    replicate_indivisible: bool = False  # replicate a tensor an axis does not divide, instead of failing

    def __post_init__(self) -> None:
        sizes = self.sizes()
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ShardingError(f"mesh.{name} must be a positive int or -1, got {size!r}")
        if list(sizes.values()).count(-1) > 1:
            raise ShardingError(f"at most one mesh axis may be -1, got {sizes}")

    def sizes(self) -> dict[str, int]:
        """Each axis's size as given (maybe -1), in the mesh's order (``AXES``)."""
        return {name: getattr(self, name) for name in AXES}

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The sizes in ``AXES`` order ``(data, fsdp, expert, tensor)`` for ``num_devices``
        devices, -1 resolved."""
        sizes = list(self.sizes().values())
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(f"mesh {self._text()}: the fixed axes ({known} devices) do not divide "
                                    f"the {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ShardingError(f"mesh {self._text()} has {math.prod(sizes)} devices but there are "
                                f"{num_devices}; the product of mesh.data/fsdp/expert/tensor must equal the "
                                "device count (or set one axis to -1)")
        return tuple(sizes)  # type: ignore[return-value]

    def _text(self) -> str:
        """The axes as configs write them; ``expert`` only when used (a dense mesh reads as before)."""
        sizes = self.sizes().items()
        return ", ".join(f"{name}={size}" for name, size in sizes if name != "expert" or size != 1)


def dcn_split(shape: Sequence[int], granules: int) -> tuple[int, ...]:
    """How many granules (processes / slices) each axis spans, outermost axes first.

    ``data`` takes as many as it can so that mostly data-parallel traffic crosses hosts.
    """
    left, out = granules, []
    for size in shape:
        take = math.gcd(size, left)
        out.append(take)
        left //= take
    if left != 1:
        raise ShardingError(f"mesh {tuple(shape)} cannot be laid out over {granules} hosts/slices: "
                            "each host must hold a whole sub-mesh (make the outer axes multiples of it)")
    return tuple(out)


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh with Auto axes (GSPMD propagation + ``constrain``).

    Several processes on GPU/CPU, or several TPU slices: a hybrid mesh whose cross-host
    (DCN) part lies on the outermost axes, ``data`` first.
    """
    devices = list(devices if devices is not None else jax.devices())
    cfg = config if isinstance(config, MeshConfig) else MeshConfig(*config)
    shape = cfg.shape(len(devices))
    axis_types = (AxisType.Auto,) * len(AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    multi_slice = len(slices) > 1
    if multi_slice or (len(processes) > 1 and devices[0].platform != "tpu"):
        from jax.experimental import mesh_utils

        dcn = dcn_split(shape, len(slices) if multi_slice else len(processes))
        ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not multi_slice)
        return Mesh(grid, AXES, axis_types=axis_types)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def mesh_shape(mesh: Mesh) -> tuple[int, ...]:
    return tuple(mesh.shape[a] for a in AXES)


# ----------------------------------------------------------------------------- parameters
def dotted(path: Sequence[Any]) -> str:
    """A pytree / nnx path as ``layers.0.self_attn.q_proj.kernel``."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey) and p.name == "value":
            continue  # an nnx Variable's own node
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return ".".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The rule table's logical axes for parameter ``path`` (first matching rule)."""
    for pattern, axes in RULES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ShardingError(f"rule {pattern!r} gives {len(axes)} axes to {path!r}, which has {ndim}")
            return axes
    raise ShardingError(f"no sharding rule matches parameter {path!r}; add one to dflash.sharding.RULES")


def _mesh_axes(logical: str | None, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes of a logical axis, without those of size 1 (and any the mesh lacks)."""
    return tuple(a for a in LOGICAL.get(logical, ()) if a in mesh.shape and mesh.shape[a] > 1)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, *, replicate_indivisible: bool = False) -> P:
    """PartitionSpec of one parameter; an axis that does not divide its dimension is an error."""
    entries = []
    for dim, (size, logical) in enumerate(zip(shape, logical_axes(path, len(shape)), strict=True)):
        axes = _mesh_axes(logical, mesh)
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            if not replicate_indivisible:
                raise ShardingError(
                    f"parameter {path!r} {tuple(shape)}: dimension {dim} ({logical}, size {size}) is not "
                    f"divisible by mesh axis {'×'.join(axes)} of size {ways}; change the mesh or set "
                    "mesh.replicate_indivisible=true to replicate such tensors")
            axes = ()
        entries.append(_entry(axes))
    return P(*entries)


def tree_shardings(tree: Any, mesh: Mesh, *, replicate_indivisible: bool = False) -> Any:
    """``NamedSharding`` of every leaf of a parameter-shaped tree (params, grads, optimizer state).

    Leaves are matched by the end of their path, so Adam's ``mu``/``nu`` mirror their params;
    scalars (step counts) are replicated; any other unmatched leaf is an error.
    """

    def one(path, leaf):
        name, shape = dotted(path), np.shape(leaf)
        if not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(name, shape, mesh, replicate_indivisible=replicate_indivisible))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(model: nnx.Module, mesh: Mesh, *, replicate_indivisible: bool = False) -> nnx.State:
    """The model's state with a ``NamedSharding`` at each leaf (works on abstract models too)."""
    return tree_shardings(nnx.state(model), mesh, replicate_indivisible=replicate_indivisible)


def abstract_sharded(model: nnx.Module | Callable[[], nnx.Module], mesh: Mesh, *,
                     replicate_indivisible: bool = False) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` leaves that carry their shardings (restore / AOT targets)."""
    shapes = nnx.eval_shape(model) if callable(model) and not isinstance(model, nnx.Module) else model
    graphdef, state = nnx.split(shapes)
    shardings = tree_shardings(state, mesh, replicate_indivisible=replicate_indivisible)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return nnx.merge(graphdef, state)


def init_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh, *,
                 replicate_indivisible: bool = False) -> nnx.Module:
    """Builds a module under ``jit`` with output shardings: every parameter is born in its shards."""
    graphdef, state = nnx.split(nnx.eval_shape(constructor))
    shardings = tree_shardings(state, mesh, replicate_indivisible=replicate_indivisible)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, *, replicate_indivisible: bool = False) -> nnx.Module:
    """An existing (small, e.g. test) model moved onto the mesh by the rule table."""
    graphdef, state = nnx.split(model)
    shardings = tree_shardings(state, mesh, replicate_indivisible=replicate_indivisible)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def describe_sharding(model: nnx.Module, mesh: Mesh, *, replicate_indivisible: bool = False) -> str:
    """A table of every parameter: path, shape, spec, bytes on each device, and the totals."""
    state = nnx.state(model)
    shardings = tree_shardings(state, mesh, replicate_indivisible=replicate_indivisible)
    rows, total, per_device = [], 0, 0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(state),
                                      jax.tree.leaves(shardings), strict=True):
        itemsize = np.dtype(leaf.dtype).itemsize
        local = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
        total += math.prod(leaf.shape) * itemsize
        per_device += local
        rows.append((dotted(path), "x".join(map(str, leaf.shape)), str(sharding.spec), f"{local:,}"))
    rows.append(("total", "", f"mesh {dict(mesh.shape)}", f"{per_device:,} of {total:,}"))
    rows.insert(0, ("path", "shape", "spec", "bytes/device"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batches, activations
def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split (``data × fsdp × expert``)."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ``data × fsdp × expert``, the rest replicated."""
    return NamedSharding(mesh, P(_entry(_mesh_axes("batch", mesh))))


def _active_mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return None
    if any(t != AxisType.Auto for t in mesh.axis_types):
        return None  # explicit axes carry shardings in types; nothing to pin
    return mesh


def activation_spec(shape: Sequence[int], logical: str | tuple[Any, ...], mesh: Any) -> P:
    """PartitionSpec of an activation or cache array of ``shape`` (a ``LAYOUTS`` name or logical
    axes, ``...`` filling unnamed middle dims). A mesh axis that does not divide its dimension is
    dropped (the longest dividing prefix of e.g. ``data × fsdp`` is kept): never an error."""
    if isinstance(logical, str):
        logical = LAYOUTS[logical]
    if ... in logical:
        i = logical.index(...)
        logical = logical[:i] + (None,) * (len(shape) - len(logical) + 1) + logical[i + 1:]
    if len(logical) != len(shape):
        raise ShardingError(f"{len(logical)} logical axes for an array of rank {len(shape)}")
    entries = []
    for size, name in zip(shape, logical, strict=True):
        axes = _mesh_axes(name, mesh)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        entries.append(_entry(axes))
    return P(*entries)


def constrain(x: jax.Array, logical: str | tuple[Any, ...]) -> jax.Array:
    """Pins activation ``x`` to its layout (``activation_spec``) when a mesh is set; else ``x``."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, logical, mesh))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every array of a cache (``dflash.models.cache``) or of any tree of
    cache states: each state names its arrays' layouts (``AXES``); plain arrays are per-row."""

    def one(node: Any) -> Any:
        axes = getattr(node, "AXES", None)
        if axes:
            return dataclasses.replace(node, **{name: NamedSharding(mesh, activation_spec(
                getattr(node, name).shape, layout, mesh)) for name, layout in axes.items()})
        shape = np.shape(node)
        return NamedSharding(mesh, activation_spec(shape, ("batch", ...), mesh) if shape else P())

    return jax.tree.map(one, tree, is_leaf=lambda x: bool(getattr(x, "AXES", None)))
