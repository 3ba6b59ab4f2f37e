"""Ahead-of-time plans: the real train / decode steps compiled for TPU slices we do not have.

With the ``libtpu`` package, ``jax.experimental.topologies.get_topology_desc`` describes a
TPU slice on a CPU-only host; a step jitted over a mesh of those (virtual) devices lowers,
partitions and compiles exactly as it would on the slice, Mosaic kernels included, without
allocating anything. The compiled executable's ``memory_analysis`` is the per-chip memory
(arguments, outputs, temporaries); FLOPs come from ``dflash.flops`` (XLA's cost analysis
counts a loop body once). Nothing here needs weights, a tokenizer or data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dflash import sharding
from dflash.config import DTYPES, ConfigError, ModelConfig, preset, preset_for_hub_id
from dflash.kernels.common import compiling_for

GiB = 2 ** 30


class PlanError(ConfigError):
    """A plan cannot be made (unknown topology, no sharding support, a bad mesh)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice: its libtpu topology name and per-chip HBM, bf16 peak and bandwidth."""

    name: str
    libtpu_name: str
    chips: int
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip
    options: tuple[tuple[str, str], ...] = ()  # extra topology options (v4: megacore chips)


# Per-chip figures from the Cloud TPU system-architecture pages (v5e, v4, v5p, v6e).
TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    Topology("v5e-4", "v5e:2x2", 4, 16 * GiB, 197e12, 819e9),
    Topology("v5e-8", "v5e:2x4", 8, 16 * GiB, 197e12, 819e9),
    Topology("v5e-16", "v5e:4x4", 16, 16 * GiB, 197e12, 819e9),
    Topology("v5e-64", "v5e:8x8", 64, 16 * GiB, 197e12, 819e9),
    Topology("v4-8", "v4:2x2x1", 4, 32 * GiB, 275e12, 1228e9, (("chip_config_name", "megacore"),)),
    Topology("v5p-8", "v5p:2x2x1", 4, 95 * GiB, 459e12, 2765e9),
    Topology("v5p-16", "v5p:2x2x2", 8, 95 * GiB, 459e12, 2765e9),
    Topology("v5p-32", "v5p:2x2x4", 16, 95 * GiB, 459e12, 2765e9),
    Topology("v6e-8", "v6e:2x4", 8, 32 * GiB, 918e12, 1640e9),
)}


def get_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


@functools.cache
def topology_devices(name: str) -> tuple[Any, ...]:
    """The slice's (virtual) devices, one per chip."""
    topo = get_topology(name)
    # libtpu takes a host-wide lock file when it loads; a compile-only client never touches a
    # chip, so it may share the host with other processes doing the same.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                            **dict(topo.options))
    except Exception as err:  # no libtpu, or a libtpu that does not know the chip
        raise PlanError(f"cannot describe TPU topology {topo.libtpu_name!r} ({type(err).__name__}: {err}); "
                        "install the test extra (libtpu) to compile for TPUs on this host") from err
    if len(desc.devices) != topo.chips:
        raise PlanError(f"{name}: libtpu describes {len(desc.devices)} devices, expected {topo.chips}")
    return tuple(desc.devices)


def make_mesh(mesh: Any, devices: tuple[Any, ...]) -> Any:
    """A ``(data, fsdp, expert, tensor)`` mesh over ``devices``; ``mesh`` a MeshConfig or a
    ``(data, fsdp, tensor[, expert])`` tuple."""
    return sharding.make_mesh(mesh, list(devices))


def model_config(name: str) -> ModelConfig:
    """An architecture by preset name, hub id, or checkpoint directory (its config.json only)."""
    from dflash.io.loading import read_config, resolve

    try:
        return preset(name)
    except ConfigError:
        pass
    try:
        return preset_for_hub_id(name)
    except ConfigError:
        pass
    try:
        return read_config(resolve(name))
    except Exception as err:
        raise PlanError(f"no architecture for {name!r}: not a preset, a known hub id, or a checkpoint "
                        f"directory ({err})") from err


def local_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s leaves held on one device (each leaf's shard shape)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_with(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


_OOM = re.compile(r"Ran out of memory.*?\(([\d.]+)([KMGT])\).*?\(([\d.]+)([KMGT])\)", re.S)
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class OutOfMemory:
    """The TPU compiler refused the program: the temporaries it needed, and the HBM it had."""

    temp_bytes: int
    available_bytes: int
    message: str


def compile_for_topology(fn: Any, args: tuple, mesh: Any) -> tuple[Any, float]:
    """Lowers and compiles jitted ``fn`` for abstract sharded ``args`` on TPU: ``(compiled, seconds)``.

    A program that does not fit is refused by the TPU compiler; it comes back as ``OutOfMemory``
    (the temporaries it needed, parsed from the compiler's message) instead of an executable.
    """
    start = time.perf_counter()
    with compiling_for("tpu"), jax.set_mesh(mesh):
        lowered = fn.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as err:  # XlaRuntimeError: RESOURCE_EXHAUSTED
            found = _OOM.search(str(err))
            if not found:
                raise
            need, unit, have, unit2 = found.groups()
            compiled = OutOfMemory(int(float(need) * _UNITS[unit]), int(float(have) * _UNITS[unit2]),
                                   str(err).splitlines()[0][:300])
    return compiled, time.perf_counter() - start


def memory(compiled: Any, argument_bytes: int = 0) -> dict[str, Any]:
    """Per-device bytes of a compiled executable: arguments, outputs, temporaries, peak total.

    For an ``OutOfMemory`` the total is ``argument_bytes`` plus the temporaries the compiler
    asked for (a lower bound on what the step needs)."""
    if isinstance(compiled, OutOfMemory):
        return {"arguments": argument_bytes, "outputs": 0, "aliased": 0, "temp": compiled.temp_bytes,
                "total": argument_bytes + compiled.temp_bytes, "compiler_refused": compiled.message}
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes), "total": int(total)}


def xla_flops(compiled: Any) -> float:
    if isinstance(compiled, OutOfMemory):
        return 0.0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def fit_fields(total: int, topo: Topology, compiled: Any = None) -> dict[str, Any]:
    fits = total <= topo.hbm_bytes and not isinstance(compiled, OutOfMemory)
    return {"hbm_bytes": topo.hbm_bytes, "fits": fits,
            "headroom": round(1.0 - total / topo.hbm_bytes, 4)}


def mesh_dict(mesh: Any) -> dict[str, int]:
    """The mesh's axis sizes (``expert`` only where it splits: plans of dense targets read as before)."""
    return {name: int(size) for name, size in mesh.shape.items() if name != "expert" or size > 1}


def batch_spec(mesh: Any, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(sharding.batch_sharding(mesh).spec[0], *([None] * (ndim - 1))))


def abstract_key(mesh: Any) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def abstract_target(tcfg: ModelConfig, dtype: jnp.dtype, mesh: Any) -> tuple[Any, Any]:
    """(graphdef, abstract sharded state) of the frozen target: nothing allocated."""
    from dflash.models.transformer import Transformer

    model = sharding.abstract_sharded(lambda: Transformer(tcfg, dtype=dtype, rngs=nnx.Rngs(0)), mesh)
    return nnx.split(model)


# ----------------------------------------------------------------------------- train step
def _drafter_and_optimizer(cfg: Any, tcfg: ModelConfig, total_steps: int) -> tuple[Any, Any]:
    """(drafter config, a constructor of (drafter, optimizer)) for ``cfg``, by its drafter kind."""
    from dflash.training.optim import make_optimizer

    mask = cfg.drafter.mask_token_id
    mask = tcfg.vocab_size - 1 if mask is None else mask  # any id: the tokenizer is not read
    kind = cfg.kind
    dcfg = kind.config(cfg.drafter, tcfg, mask_token_id=mask, block_size=cfg.block_size)

    def both():  # a fresh drafter, in the dtype the run holds it in (traced under eval_shape)
        d = kind.construct(dcfg, dtype=kind.param_dtype(DTYPES[cfg.target.dtype]), seed=cfg.train.seed)
        d.remat = cfg.train.remat  # as setup.build_method_drafter does
        return d, nnx.Optimizer(d, make_optimizer(cfg, total_steps), wrt=nnx.Param)

    return dcfg, both


def train_plan(cfg: Any, topology: str, mesh: Any = None, *, config_name: str = "") -> dict[str, Any]:
    """Compiles ``cfg``'s real train step for ``topology`` and reports its memory per chip and FLOPs.

    ``mesh``: a MeshConfig / ``(data, fsdp, tensor)``; default the config's ``mesh:`` section.
    """
    from dflash.training.step import make_step_fns, step_options

    topo = get_topology(topology)  # an unknown slice is the first thing said
    m = make_mesh(mesh if mesh is not None else cfg.mesh, topology_devices(topology))
    tcfg = model_config(cfg.target.name)
    tgraph, tstate = abstract_target(tcfg, DTYPES[cfg.target.dtype], m)
    dcfg, both = _drafter_and_optimizer(cfg, tcfg, total_steps=1000)
    graphdef, state = nnx.split(nnx.eval_shape(both))
    state = abstract_with(state, sharding.tree_shardings(state, m))
    drafter_state, opt_state = state[0], state[1]
    s, b = cfg.data.seq_len, cfg.train.batch_size
    batch = {name: jax.ShapeDtypeStruct((b, s), dtype, sharding=batch_spec(m, 2))
             for name, dtype in (("tokens", jnp.int32), ("loss_mask", jnp.bool_),
                                 ("segment_ids", jnp.int32), ("positions", jnp.int32))}
    step_kw = step_options(cfg, dcfg.block_size)
    train_step, _ = make_step_fns(graphdef, tgraph, step_kw, DTYPES[cfg.train.compute_dtype], mesh=m,
                                  state_shardings=sharding.tree_shardings(state, m),
                                  tstate_shardings=sharding.tree_shardings(tstate, m))
    compiled, seconds = compile_for_topology(train_step, (state, tstate, batch, abstract_key(m)), m)
    mem = memory(compiled, local_bytes((state, tstate, batch)))
    flops = cfg.kind.flops(tcfg, dcfg, batch=b, seq=s, anchors=step_kw["num_anchors"], block=dcfg.block_size,
                           target_logits=cfg.kind.needs_target_logits(step_kw), remat=cfg.train.remat)
    per_device = {"target": local_bytes(tstate), "drafter": local_bytes(drafter_state),
                  "optimizer": local_bytes(opt_state), "temp": mem["temp"], "total": mem["total"]}
    return {"config": config_name, "method": cfg.method, "topology": topology, "chips": topo.chips,
            "mesh": mesh_dict(m), "per_device_bytes": per_device, **fit_fields(mem["total"], topo, compiled),
            "flops_per_step": flops["total"], "flops_by_part": flops,
            "est_step_s": flops["total"] / (topo.chips * topo.peak_flops),
            "xla_flops_per_device": xla_flops(compiled), "memory_analysis": mem,
            "compile_s": round(seconds, 1)}


# ----------------------------------------------------------------------------- decode steps
def trail_bytes(graphdef: Any, state: Any, cache: Any, tokens: int) -> int:
    """Bytes per chip a pass over ``tokens`` new tokens writes beyond the committed cache: the
    per-position trail of states that roll back by selecting (docs/design.md §3; 0 for a cache of
    slots). Each layer's extra is its global growth in the pass, at that layer's share per chip."""
    batch = cache.lengths.shape[0]
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    out = jax.eval_shape(lambda s, i, c: nnx.merge(graphdef, s)(i, i, c, compute_logits=False).cache,
                         state, ids, cache)

    def nbytes(tree: Any) -> int:
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    total = 0.0
    for before, after in zip(cache.layers, out.layers, strict=True):
        if before is not None and nbytes(before):
            total += (nbytes(after) / nbytes(before) - 1) * local_bytes(before)
    return round(total)


def decode_plan(target_config: str, topology: str, mesh: Any = None, *, dtype: str = "bfloat16",
                batch: int = 1, block_size: int = 16, context: int = 2048) -> dict[str, Any]:
    """One verify pass (``block_size`` new tokens per row) and one AR step of the target on
    ``topology`` against a KV cache of ``context`` positions: memory per chip, FLOPs and the
    time at peak FLOP/s or HBM bandwidth, whichever binds; ``verify_over_ar`` is the cost of a
    speculative step in AR steps, the ceiling's denominator (speedup <= tau / verify_over_ar)."""
    from dflash.flops import decode_flops, params_read
    from dflash.models.kinds import init_cache

    topo = get_topology(topology)
    devices = topology_devices(topology)
    m = make_mesh(mesh if mesh is not None else (1, 1, topo.chips), devices)
    tcfg = model_config(target_config)
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    tgraph, tstate = abstract_target(tcfg, jdtype, m)
    # The cache in the shards the rule table gives its states (dflash.sharding.LAYOUTS).
    shapes = jax.eval_shape(lambda: init_cache(tcfg, batch, context + block_size, jdtype))
    cache = abstract_with(shapes, sharding.state_shardings(shapes, m))

    @functools.partial(jax.jit, donate_argnums=1)
    def step(tstate, cache, tokens, positions, kept):
        """A pass and its rollback (``keep``): a recurrent state's per-position trail is part of
        the pass's memory, and the cache comes back in its committed shape (donated in place)."""
        out = nnx.merge(tgraph, tstate)(tokens, positions, cache)
        return out.logits, out.cache.keep(kept, tokens.shape[1])

    passes = {}
    weights = local_bytes(tstate)
    for name, t in (("verify", block_size), ("ar", 1)):
        ids = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=NamedSharding(m, P()))
        kept = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(m, P()))
        compiled, seconds = compile_for_topology(step, (tstate, cache, ids, ids, kept), m)
        mem = memory(compiled, local_bytes((tstate, cache)))
        flops = decode_flops(tcfg, batch, t, context)
        # The whole cache and every weight the pass touches, once (a MoE reads only the experts
        # its tokens are routed to: expected under uniform routing, dflash.flops.params_read),
        # plus the rollback trail a recurrent state writes (its value after every block position).
        weights_read = weights * params_read(tcfg, batch * t) / tcfg.num_params()
        trail = trail_bytes(tgraph, tstate, cache, t)
        read = weights_read + local_bytes(cache) + trail
        passes[name] = {"new_tokens": t, "flops": flops, "memory_analysis": mem,
                        "weights_read_bytes": round(weights_read), "rollback_trail_bytes": trail,
                        "est_s_rollback": trail / topo.hbm_bw,
                        "est_s_compute": flops / (topo.chips * topo.peak_flops),
                        "est_s_memory": read / topo.hbm_bw, "compile_s": round(seconds, 1),
                        **fit_fields(mem["total"], topo, compiled)}
        passes[name]["est_s"] = max(passes[name]["est_s_compute"], passes[name]["est_s_memory"])
    return {"target": target_config, "topology": topology, "chips": topo.chips, "mesh": mesh_dict(m),
            "batch": batch, "context": context, "dtype": dtype,
            "per_device_bytes": {"target": weights, "cache": local_bytes(cache),
                                 "temp": passes["verify"]["memory_analysis"]["temp"],
                                 "total": passes["verify"]["memory_analysis"]["total"]},
            **fit_fields(passes["verify"]["memory_analysis"]["total"], topo), "passes": passes,
            "all_fit": all(p["fits"] for p in passes.values()),
            "verify_over_ar": passes["verify"]["est_s"] / passes["ar"]["est_s"]}


def regen_plan(target_config: str, topology: str, mesh: Any = None, *, dtype: str = "bfloat16",
               batch: int = 16, prompt_tokens: int = 2048, new_tokens: int = 512) -> dict[str, Any]:
    """The regeneration program (``generate``: prefill of ``batch`` prompts of ``prompt_tokens``,
    then the AR loop to ``new_tokens``, its KV cache made inside) compiled for ``topology``'s
    chips on the mesh ``dflash-regenerate`` would pick there from the chip's HBM (or ``mesh``):
    memory per chip, and the AR step's time at peak FLOP/s or HBM bandwidth (an estimate)."""
    from dflash.decoding.autoregressive import _generate, bucket
    from dflash.decoding.mesh import cache_bytes
    from dflash.decoding.sampling import SamplingParams
    from dflash.flops import decode_flops
    from dflash.training.regenerate import pick_regen_mesh

    topo = get_topology(topology)
    devices = topology_devices(topology)
    tcfg, jdtype = model_config(target_config), DTYPES[dtype]
    picked = None
    if mesh is None:
        pick = pick_regen_mesh(tcfg, jdtype, devices, batch_size=batch, max_new_tokens=new_tokens,
                               max_prompt_tokens=prompt_tokens, memory_bytes=topo.hbm_bytes)
        mesh, picked = pick.config or (1, 1, 1), pick.line
    m = make_mesh(mesh, devices)
    tgraph, tstate = abstract_target(tcfg, jdtype, m)
    split = sharding.batch_shards(m)
    rows = -(-batch // split) * split  # padded with dummy rows, as generate() does
    max_len = bucket(prompt_tokens + new_tokens)
    ids = jax.ShapeDtypeStruct((rows, min(bucket(prompt_tokens, 16), max_len)), jnp.int32,
                               sharding=batch_spec(m, 2))
    per_row = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch_spec(m, 1))
    static = dict(graphdef=tgraph, max_new=new_tokens, max_len=max_len, sampling=SamplingParams(),
                  eos_ids=tuple(tcfg.eos_token_id))
    program = jax.jit(lambda *args: _generate(*args, **static))
    compiled, seconds = compile_for_topology(program, (tstate, ids, per_row, per_row, abstract_key(m)), m)
    weights = local_bytes(tstate)
    mem = memory(compiled, weights)
    cache = cache_bytes(tcfg, rows // split, max_len, jdtype, m.shape["tensor"])
    flops = decode_flops(tcfg, rows, 1, max_len)  # one AR step against a full cache (the slowest)
    step = {"flops": flops, "est_s_compute": flops / (topo.chips * topo.peak_flops),
            "est_s_memory": (weights + cache) / topo.hbm_bw}
    step["est_s"] = max(step["est_s_compute"], step["est_s_memory"])
    return {"target": target_config, "topology": topology, "chips": topo.chips, "mesh": mesh_dict(m),
            "picked": picked, "dtype": dtype, "batch": batch, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "cache_slots": max_len,
            "per_device_bytes": {"target": weights, "cache": cache, "temp": mem["temp"],
                                 "total": mem["total"]},
            **fit_fields(mem["total"], topo, compiled), "regen_ar_step": step,
            "est_tokens_per_s": batch / step["est_s"], "memory_analysis": mem, "compile_s": round(seconds, 1)}


def summary(plan: dict[str, Any]) -> str:
    """A few human-readable lines of a train or decode plan."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    mesh = "x".join(f"{k}={v}" for k, v in plan["mesh"].items())
    per = plan["per_device_bytes"]
    lines = [f"{plan['topology']} ({plan['chips']} chips, {gb(plan['hbm_bytes'])} HBM each), mesh {mesh}",
             "per chip: " + ", ".join(f"{k} {gb(v)}" for k, v in per.items()),
             f"fits: {'yes' if plan['fits'] else 'NO'} (headroom {100 * plan['headroom']:.1f}%)"]
    if "passes" in plan:
        for name, p in plan["passes"].items():
            lines.append(f"{name} pass ({p['new_tokens']} new tokens x {plan['batch']} rows, context "
                         f"{plan['context']}): {p['flops'] / 1e9:.1f} GFLOP, est {1e3 * p['est_s']:.2f} ms "
                         f"(compute {1e3 * p['est_s_compute']:.2f}, memory {1e3 * p['est_s_memory']:.2f})")
        lines.append(f"verify / AR step cost: {plan['verify_over_ar']:.2f} (speedup <= tau / this)")
    elif "regen_ar_step" in plan:
        step = plan["regen_ar_step"]
        if plan["picked"]:
            lines.insert(1, f"mesh as dflash-regenerate picks it: {plan['picked']}")
        lines.append(f"regeneration: batch {plan['batch']}, prompts of {plan['prompt_tokens']} + "
                     f"{plan['new_tokens']} new tokens; AR step est {1e3 * step['est_s']:.2f} ms (compute "
                     f"{1e3 * step['est_s_compute']:.2f}, memory {1e3 * step['est_s_memory']:.2f}): at most "
                     f"~{plan['est_tokens_per_s']:.0f} tokens/s on the slice (compiled in "
                     f"{plan['compile_s']} s)")
    else:
        lines.append(f"{plan['flops_per_step'] / 1e12:.1f} TFLOP per step, est {plan['est_step_s']:.2f} s at "
                     f"peak bf16 FLOP/s (compiled in {plan['compile_s']} s)")
    return "\n".join(lines)
