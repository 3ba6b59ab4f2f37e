"""The mixture-of-experts MLP kind (Qwen3-MoE): a softmax router picks ``top_k`` of ``experts``
SwiGLU experts per token, dropless (every token reaches all of its k experts; no capacity factor).

``y = sum_{e in topk(p)} w_e * down_e(silu(gate_e(x)) * up_e(x))`` with ``p = softmax(x @ router)``
(float32), ``w`` the top-k probabilities, renormalised to sum to 1 when ``norm_topk_prob`` (the
config says; the transformers class default is false). Options: ``experts``, ``top_k``,
``norm_topk_prob``, ``intermediate_size`` (each expert's width; 0: the config's).

Compute: the token-expert pairs are sorted by expert and each expert's contiguous group goes
through a grouped matmul (``dispatch.grouped_matmul``: megablox ``gmm`` on TPU, else
``jax.lax.ragged_dot``; only routed tokens are computed, k of E per token). ``dense_reference`` is
the every-expert formula the tests compare it with; both apply the one expert FFN (``swiglu``).
Checkpoints store the experts one tensor each or fused; both load, saving writes one tensor each.

Expert parallelism (a mesh with ``expert > 1``, docs/design.md §11): the experts are split over
the ``expert`` axis and each device's tokens travel to their experts' devices and back
(``_expert_parallel``); with ``expert = 1`` GSPMD partitions the grouped matmuls itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.kernels import dispatch
from dflash.kernels.common import platform
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear, normal
from dflash.sharding import ShardingError, activation_spec, batch_shards

OPTIONS = {"experts": 0, "top_k": 1, "norm_topk_prob": False, "intermediate_size": 0}


def expert_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    return mlp_option(spec, "intermediate_size") or cfg.intermediate_size


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
           matmul: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """The expert FFN ``down(silu(gate(x)) * up(x))``; ``matmul(x, w)`` applies the experts' stacked
    weights ``w`` (grouped by rows, or every expert to every row): one formula for every path."""
    return matmul(jax.nn.silu(matmul(x, gate)) * matmul(x, up), down)


def grouped_experts(x_RD: jax.Array, rows_M: jax.Array, expert_M: jax.Array, weights: tuple[jax.Array, ...],
                    impl: str) -> tuple[jax.Array, jax.Array]:
    """Pair ``m`` (row ``x[rows_M[m]]``, expert ``expert_M[m]``) through its expert's FFN, pairs
    sorted by expert so each expert's rows are one group of the grouped matmuls. An expert id past
    the last (``E``: an empty buffer slot) is in no group and gives zero. Returns the outputs
    ``[M, D]`` in sorted order and that order (output ``i`` is pair ``order_M[i]``)."""
    num_experts = weights[0].shape[0]
    order_M = jnp.argsort(expert_M, stable=True)
    sizes_E = jnp.zeros(num_experts + 1, jnp.int32).at[expert_M].add(1)[:num_experts]
    grouped = lambda a, w: dispatch.grouped_matmul(a, w, sizes_E, impl=impl)  # noqa: E731
    return swiglu(x_RD[rows_M[order_M]], *weights, grouped), order_M


class MoE(nnx.Module):
    impl = "auto"  # the grouped matmul's attention_impl (dflash.kernels.dispatch): set by the Transformer

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, k, d, f = (mlp_option(spec, "experts"), mlp_option(spec, "top_k"), cfg.hidden_size,
                      expert_width(cfg, spec))
        if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
            raise ConfigError(f"moe MLP needs 1 <= top_k <= experts, got top_k={k!r}, experts={e!r}")
        self.top_k, self.norm_topk_prob = k, bool(mlp_option(spec, "norm_topk_prob"))
        self.gate = Linear(d, e, bias=False, dtype=dtype, rngs=rngs)  # the router (HF ``mlp.gate``)
        self.experts_gate = normal(rngs, (e, d, f), dtype)
        self.experts_up = normal(rngs, (e, d, f), dtype)
        self.experts_down = normal(rngs, (e, f, d), dtype)

    def route(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's ``top_k`` experts ``[N, k]`` and their weights ``[N, k]`` (x's dtype)."""
        probs_NE = jax.nn.softmax(self.gate(x_ND).astype(jnp.float32), axis=-1)
        w_NK, e_NK = jax.lax.top_k(probs_NE, self.top_k)
        if self.norm_topk_prob:
            w_NK = w_NK / w_NK.sum(-1, keepdims=True)
        return e_NK, w_NK.astype(x_ND.dtype)

    def expert_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``swiglu``'s stacked weights: gate ``[E, D, F]``, up ``[E, D, F]``, down ``[E, F, D]``."""
        return self.experts_gate[...], self.experts_up[...], self.experts_down[...]

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(x_ND)
        mesh = _mesh()
        if mesh is not None and (mesh.shape["expert"] > 1 or dispatch.use_gmm_kernel(self.impl)):
            y_ND = _expert_parallel(x_ND, e_NK, w_NK, self.expert_weights(), self.impl, mesh)
        else:
            y_ND = _combine(x_ND, e_NK, w_NK, self.expert_weights(), self.impl)
        return y_ND.reshape(x_BTD.shape)

    def dense_reference(self, x_BTD: jax.Array) -> jax.Array:
        """Every expert on every token, weighted by the routing (zero off the top k): the formula."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(x_ND)
        weights_NE = jnp.zeros((x_ND.shape[0], self.experts_gate.shape[0]), x_ND.dtype)
        weights_NE = weights_NE.at[jnp.arange(x_ND.shape[0])[:, None], e_NK].set(w_NK)
        every = lambda a, w: jnp.einsum("end,edf->enf", jnp.broadcast_to(a, (w.shape[0], *a.shape[-2:])),  # noqa: E731
                                        w)  # every expert on every row
        y_END = swiglu(x_ND, *self.expert_weights(), every)
        return jnp.einsum("ne,end->nd", weights_NE, y_END).reshape(x_BTD.shape)


def _combine(x_ND: jax.Array, e_NK: jax.Array, w_NK: jax.Array, weights: tuple[jax.Array, ...],
             impl: str) -> jax.Array:
    """``sum_k w_k * expert_{e_k}(x)`` of every token, its pairs computed grouped (one device, or GSPMD)."""
    k = e_NK.shape[1]
    rows_M = jnp.arange(e_NK.size) // k  # M = N * k token-expert pairs, token-major
    y_MD, order_M = grouped_experts(x_ND, rows_M, e_NK.reshape(-1), weights, impl)
    return jnp.zeros_like(x_ND).at[rows_M[order_M]].add(y_MD * w_NK.reshape(-1)[order_M, None])


def _mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1 or "expert" not in mesh.axis_names:
        return None
    return mesh


def _expert_parallel(x_ND: jax.Array, e_NK: jax.Array, w_NK: jax.Array, weights: tuple[jax.Array, ...],
                     impl: str, mesh: Any) -> jax.Array:
    """The MoE of the tokens on a mesh, per device in a ``shard_map``.

    Tokens are split over the batch axes (``data × fsdp × expert``; padded with zero-weight rows
    to a multiple), experts over ``expert``, each expert's width over ``tensor`` (its weights
    gathered over ``fsdp`` on entry, ZeRO-3). A device sends each of its token-expert pairs to the
    device holding the expert (``_exchange``), runs its own experts grouped on what it received,
    sends the outputs back and combines them with the routing weights; the partial sums over the
    width add up over ``tensor``. Dropless: a device's receive buffer holds ``expert × M`` rows
    (``M`` = its pairs), the worst case of every pair of every device choosing its experts.
    """
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    num_experts, width = weights[0].shape[0], weights[0].shape[2]
    if num_experts % ep:
        raise ShardingError(f"moe experts_gate/up/down {tuple(weights[0].shape)}: dimension 0 (exp, size "
                            f"{num_experts}) is not divisible by mesh axis expert of size {ep}; choose "
                            "mesh.expert dividing the number of experts")
    n = x_ND.shape[0]
    ways = batch_shards(mesh)
    pad = -n % ways
    if pad:  # rows of zero weight: they reach expert 0 and add nothing
        x_ND, e_NK, w_NK = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x_ND, e_NK, w_NK))
    rows = activation_spec((n + pad,), ("batch",), mesh)[0]
    exp = "expert" if ep > 1 else None
    tensor = "tensor" if tp > 1 and width % tp == 0 else None  # else every tensor device has whole experts
    ragged = platform() in ("tpu", "gpu")  # XLA:CPU has no ragged all-to-all

    def local(x_ND, e_NK, w_NK, gate, up, down):
        n_loc, k = e_NK.shape
        m, e_loc = n_loc * k, num_experts // ep
        rows_M, expert_M = jnp.arange(m) // k, e_NK.reshape(-1)
        if ep == 1:
            y_MD, order_M = grouped_experts(x_ND, rows_M, expert_M, (gate, up, down), impl)
        else:
            order_M = jnp.argsort(expert_M // e_loc, stable=True)  # pairs by destination device
            send_P = jnp.zeros(ep, jnp.int32).at[expert_M // e_loc].add(1)
            recv_P = jax.lax.all_to_all(send_P, "expert", 0, 0, tiled=True)
            offsets_P = jnp.cumsum(send_P) - send_P
            slots_P = jnp.arange(ep, dtype=jnp.int32) * m
            there = lambda a, fill: _exchange(a, offsets_P, send_P, recv_P, m, fill, ragged)  # noqa: E731
            x_SD = there(x_ND[rows_M[order_M]], 0)  # S = ep * m slots, m per source device
            local_S = there(expert_M[order_M] % e_loc, e_loc)  # e_loc: an empty slot
            y_SD, order_S = grouped_experts(x_SD, jnp.arange(ep * m), local_S, (gate, up, down), impl)
            y_SD = jnp.zeros_like(y_SD).at[order_S].set(y_SD)  # back in slot order
            back_SD = _exchange(y_SD, slots_P, recv_P, send_P, m, 0, ragged)  # slot j: from device j
            pos_M = jnp.arange(m) - jnp.repeat(offsets_P, send_P, total_repeat_length=m)
            dest_M = jnp.repeat(jnp.arange(ep), send_P, total_repeat_length=m)
            y_MD = back_SD[dest_M * m + pos_M]  # pair order_M[i]'s output
        out_ND = jnp.zeros_like(x_ND).at[rows_M[order_M]].add(y_MD * w_NK.reshape(-1)[order_M, None])
        return jax.lax.psum(out_ND, "tensor") if tensor else out_ND

    in_specs = (P(rows, None), P(rows, None), P(rows, None), P(exp, None, tensor), P(exp, None, tensor),
                P(exp, tensor, None))
    # The Pallas kernel's outputs carry no varying-axes types: only the jnp path is type-checked.
    y_ND = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(rows, None),
                         check_vma=not dispatch.use_gmm_kernel(impl))(x_ND, e_NK, w_NK, *weights)
    return y_ND[:n]


def _exchange(x_MX: jax.Array, offsets_P: jax.Array, send_P: jax.Array, recv_P: jax.Array, slot: int,
              fill: Any, ragged: bool) -> jax.Array:
    """All-to-all over ``expert``: rows ``[offsets_P[j], + send_P[j])`` of ``x`` go to device ``j``;
    returns ``[P * slot, ...]`` whose slot ``s`` (rows ``s * slot ...``) holds the ``recv_P[s]``
    rows device ``s`` sent here, then ``fill``. ``ragged``: ``jax.lax.ragged_all_to_all`` (only the
    rows travel); else (XLA:CPU) every slot travels whole through ``jax.lax.all_to_all``."""
    ep = send_P.shape[0]
    out = jnp.full((ep * slot, *x_MX.shape[1:]), fill, x_MX.dtype)
    if ragged:
        here = jnp.full(ep, jax.lax.axis_index("expert") * slot, jnp.int32)  # my slot on every receiver
        return jax.lax.ragged_all_to_all(x_MX, out, offsets_P, send_P, here, recv_P, axis_name="expert")
    take_PR = offsets_P[:, None] + jnp.arange(slot)[None]
    valid_PR = jnp.arange(slot)[None] < send_P[:, None]
    sent = jnp.where(valid_PR.reshape(-1, *[1] * (x_MX.ndim - 1)),
                     x_MX[jnp.minimum(take_PR, x_MX.shape[0] - 1).reshape(-1)], out)
    return jax.lax.all_to_all(sent, "expert", 0, 0, tiled=True)


def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    """Per-expert tensors (``experts.{e}.gate_proj.weight``, as the hub checkpoints), or the fused
    ``[E, 2F, D]`` ``experts.gate_up_proj`` / ``[E, D, F]`` ``experts.down_proj`` of newer files."""
    e = mlp_option(spec, "experts")
    fused = {"gate": WeightRow("experts.gate_up_proj", "experts_gate", transpose=True, part=(0, 2)),
             "up": WeightRow("experts.gate_up_proj", "experts_up", transpose=True, part=(1, 2)),
             "down": WeightRow("experts.down_proj", "experts_down", transpose=True)}
    return (WeightRow("gate.weight", "gate.kernel", transpose=True),
            *(WeightRow(f"experts.{{e}}.{p}_proj.weight", f"experts_{p}", transpose=True, experts=e,
                        alternative=fused[p]) for p in ("gate", "up", "down")))


def _flops(cfg: ModelConfig, spec: LayerSpec, rows: int) -> float:
    """The router plus ``top_k`` SwiGLU experts per token."""
    d, e, k = cfg.hidden_size, mlp_option(spec, "experts"), mlp_option(spec, "top_k")
    return 2.0 * rows * (d * e + k * 3 * d * expert_width(cfg, spec))


MOE = register_mlp(MLPKind(
    name="moe", module=MoE, options=OPTIONS, weights=_weights,
    sharding=(
        (r"(^|\.)mlp\.gate\.kernel$", ("embed", None)),
        (r"(^|\.)mlp\.experts_(gate|up)$", ("exp", "embed", "mlp")),
        (r"(^|\.)mlp\.experts_down$", ("exp", "mlp", "embed")),
    ),
    flops=_flops,
))
