"""The mixture-of-experts MLP kind (Qwen3-MoE, gpt-oss): a router picks ``top_k`` of ``experts``
SwiGLU experts per token, dropless (every token reaches all of its k experts; no capacity factor).

``y = sum_{e in topk} w_e * down_e(act(gate_e(x), up_e(x)))``. Options: ``experts``, ``top_k``,
``intermediate_size`` (each expert's width; 0: the config's); ``router``: ``softmax_topk``
(Qwen3-MoE: ``p = softmax(x @ router)`` in float32, ``w`` its top k) or ``topk_softmax`` (gpt-oss:
the top k logits, ``w`` their softmax); ``norm_topk_prob`` (renormalise ``w`` to sum to 1; the
config says, the transformers class default is false); ``router_bias``; ``expert_bias`` (biases on
gate, up and down); ``activation``: ``swiglu`` (``silu(gate) * up``) or ``clamped_swiglu``
(gpt-oss, ``swiglu_limit`` / ``swiglu_alpha``); ``layout``: which checkpoint tensors hold the
weights (``qwen3_moe`` or ``gpt_oss``, ``_weights``); ``shared_expert_size`` (Qwen3-Next,
Qwen3.5-MoE: a dense SwiGLU expert of that width every token passes through, added to the routed
sum; 0: none) and ``shared_expert_gate`` (its output times ``sigmoid(x @ w)``, one logit per token).
Gemma 4's expert block (``layout``/``router`` ``gemma4``, ``activation`` ``geglu``): a dense GeGLU
MLP of width ``dense_size`` on the layer's pre-MLP-normed input beside the experts, which run on
their own norm of the layer's residual stream and are routed from that stream (an unweighted norm
times ``router_scale / sqrt(D)``, softmax, top k renormalised, times ``per_expert_scale``); each
branch has its own output norm and the block returns their sum (the layer norms it once more).

Compute: the token-expert pairs are sorted by expert and each expert's contiguous group goes
through a grouped matmul (``dispatch.grouped_matmul``: megablox ``gmm`` on TPU, else
``jax.lax.ragged_dot``; only routed tokens are computed, k of E per token). ``dense_reference`` is
the every-expert formula the tests compare it with; every path runs the one ``ffn``. Qwen3-MoE
checkpoints store the experts one tensor each or fused; both load, saving writes one tensor each.

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
from dflash.models.dense_mlp import MLP
from dflash.models.dense_mlp import _weights as dense_rows
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear, model_norm, normal
from dflash.sharding import ShardingError, activation_spec, batch_shards

OPTIONS = {"experts": 0, "top_k": 1, "norm_topk_prob": False, "intermediate_size": 0,
           "router": "softmax_topk", "router_bias": False, "expert_bias": False, "activation": "swiglu",
           "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "layout": "qwen3_moe", "shared_expert_size": 0,
           "shared_expert_gate": False, "dense_size": 0}
# Qwen3-MoE: softmax then top-k; gpt-oss: top-k then softmax; Gemma 4: scaled norm, softmax, top-k
ROUTERS = ("softmax_topk", "topk_softmax", "gemma4")
ACTIVATIONS = ("swiglu", "clamped_swiglu", "geglu")
LAYOUTS = ("qwen3_moe", "gpt_oss", "gemma4")  # the checkpoint tensors the weights are read from (_weights)


def expert_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    return mlp_option(spec, "intermediate_size") or cfg.intermediate_size


def _choice(spec: LayerSpec, name: str, allowed: tuple[str, ...]) -> str:
    value = mlp_option(spec, name)
    if value not in allowed:
        raise ConfigError(f"moe MLP option {name}={value!r} is not one of {', '.join(allowed)}")
    return value


Weights = tuple[Any, ...]  # gate, up [E, D, F]; down [E, F, D]; their biases [E, F], [E, F], [E, D] or None


class MoE(nnx.Module):
    impl = "auto"  # the grouped matmul's attention_impl (dflash.kernels.dispatch): set by the Transformer

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, k, d, f = (mlp_option(spec, "experts"), mlp_option(spec, "top_k"), cfg.hidden_size,
                      expert_width(cfg, spec))
        if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
            raise ConfigError(f"moe MLP needs 1 <= top_k <= experts, got top_k={k!r}, experts={e!r}")
        self.top_k, self.norm_topk_prob = k, bool(mlp_option(spec, "norm_topk_prob"))
        self.router = _choice(spec, "router", ROUTERS)
        self.activation = _choice(spec, "activation", ACTIVATIONS)
        self.layout = _choice(spec, "layout", LAYOUTS)
        self.limit = float(mlp_option(spec, "swiglu_limit"))
        self.alpha = float(mlp_option(spec, "swiglu_alpha"))
        # the router (HF ``mlp.gate``, gpt-oss ``mlp.router``)
        self.gate = Linear(d, e, bias=bool(mlp_option(spec, "router_bias")), dtype=dtype, rngs=rngs)
        self.experts_gate = normal(rngs, (e, d, f), dtype)
        self.experts_up = normal(rngs, (e, d, f), dtype)
        self.experts_down = normal(rngs, (e, f, d), dtype)
        biases = bool(mlp_option(spec, "expert_bias"))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, dtype)) if biases else None  # noqa: E731
        self.experts_gate_bias, self.experts_up_bias = zeros(e, f), zeros(e, f)
        self.experts_down_bias = zeros(e, d)
        shared = mlp_option(spec, "shared_expert_size")
        self.shared_expert = MLP(cfg, spec, dtype=dtype, rngs=rngs, width=shared) if shared else None
        gated = shared and mlp_option(spec, "shared_expert_gate")
        self.shared_expert_gate = Linear(d, 1, bias=False, dtype=dtype, rngs=rngs) if gated else None
        gemma, dense = self.router == "gemma4", mlp_option(spec, "dense_size")
        self.router_norm = model_norm(cfg, d, dtype, with_scale=False) if gemma else None
        self.router_scale = nnx.Param(jnp.ones((d,), dtype)) if gemma else None
        self.per_expert_scale = nnx.Param(jnp.ones((e,), dtype)) if gemma else None
        self.dense = (MLP(cfg, spec, dtype=dtype, rngs=rngs, width=dense, activation="gelu_tanh") if dense
                      else None)
        beside = self.layout == "gemma4"  # the block's own norms (HF names: ..._1 dense, ..._2 experts)
        self.post_feedforward_layernorm_1 = model_norm(cfg, d, dtype) if beside else None
        self.pre_feedforward_layernorm_2 = model_norm(cfg, d, dtype) if beside else None
        self.post_feedforward_layernorm_2 = model_norm(cfg, d, dtype) if beside else None
        self.takes_residual = beside  # static: the layer passes its residual stream too

    def shared(self, x_BTD: jax.Array) -> jax.Array | float:
        """The shared expert's output (times its gate's sigmoid), or 0 without one."""
        if self.shared_expert is None:
            return 0.0
        y_BTD = self.shared_expert(x_BTD)
        if self.shared_expert_gate is None:
            return y_BTD
        return y_BTD * jax.nn.sigmoid(self.shared_expert_gate(x_BTD))

    def route(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's ``top_k`` experts ``[N, k]`` and their weights ``[N, k]`` (x's dtype)."""
        if self.router == "gemma4":
            x_ND = self.router_norm(x_ND) * self.router_scale[...] * jnp.asarray(x_ND.shape[-1] ** -0.5,
                                                                                  x_ND.dtype)
        logits_NE = self.gate(x_ND).astype(jnp.float32)
        if self.router == "topk_softmax":
            top_NK, e_NK = jax.lax.top_k(logits_NE, self.top_k)
            w_NK = jax.nn.softmax(top_NK, axis=-1)
        else:
            w_NK, e_NK = jax.lax.top_k(jax.nn.softmax(logits_NE, axis=-1), self.top_k)
        if self.norm_topk_prob:
            w_NK = w_NK / w_NK.sum(-1, keepdims=True)
        if self.per_expert_scale is not None:
            w_NK = w_NK * self.per_expert_scale[...][e_NK].astype(jnp.float32)
        return e_NK, w_NK.astype(x_ND.dtype)

    def activate(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """SwiGLU, or gpt-oss's clamped form: ``(clip(up) + 1) * g * sigmoid(alpha * g)`` with
        ``g = min(gate, limit)`` and ``up`` clipped to ``[-limit, limit]``."""
        if self.activation == "clamped_swiglu":
            gate, up = jnp.minimum(gate, self.limit), jnp.clip(up, -self.limit, self.limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))
        if self.activation == "geglu":
            return jax.nn.gelu(gate, approximate=True) * up
        return jax.nn.silu(gate) * up

    def expert_weights(self) -> Weights:
        """``ffn``'s weights: the stacked experts' matrices and biases (None without biases)."""
        value = lambda p: None if p is None else p[...]  # noqa: E731
        return (self.experts_gate[...], self.experts_up[...], self.experts_down[...],
                value(self.experts_gate_bias), value(self.experts_up_bias), value(self.experts_down_bias))

    def ffn(self, x: jax.Array, weights: Weights, matmul: Callable[[jax.Array, jax.Array], jax.Array],
            bias: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """The experts' FFN, one formula for every computation: ``matmul(x, w_E..)`` multiplies by
        each row's expert's weights, ``bias(b_E.)`` gives each row's expert's bias; ``weights`` as
        ``expert_weights`` (every expert, or one device's)."""
        gate, up, down, gate_b, up_b, down_b = weights

        def plus(y: jax.Array, b: jax.Array | None) -> jax.Array:
            return y if b is None else y + bias(b)

        h = self.activate(plus(matmul(x, gate), gate_b), plus(matmul(x, up), up_b))
        return plus(matmul(h, down), down_b)

    def grouped(self, x_RD: jax.Array, rows_M: jax.Array, expert_M: jax.Array,
                weights: Weights) -> tuple[jax.Array, jax.Array]:
        """Pair ``m`` (row ``x[rows_M[m]]``, expert ``expert_M[m]``) through its expert's FFN, pairs
        sorted by expert so each expert's rows are one group of the grouped matmuls. An expert id
        past the last (``E``: an empty buffer slot) is in no group (its output is never read).
        Returns the outputs ``[M, D]`` in sorted order and that order (output ``i``: pair ``order_M[i]``)."""
        num_experts = weights[0].shape[0]
        order_M = jnp.argsort(expert_M, stable=True)
        sizes_E = jnp.zeros(num_experts + 1, jnp.int32).at[expert_M].add(1)[:num_experts]
        sorted_M = jnp.minimum(expert_M[order_M], num_experts - 1)
        y_MD = self.ffn(x_RD[rows_M[order_M]], weights,
                        lambda a, w: dispatch.grouped_matmul(a, w, sizes_E, impl=self.impl),
                        lambda b: b[sorted_M])
        return y_MD, order_M

    def __call__(self, x_BTD: jax.Array, residual_BTD: jax.Array | None = None) -> jax.Array:
        """``x``: the layer's normed input; ``residual`` (Gemma 4's block): its residual stream."""
        if self.layout == "gemma4":
            return self.gemma4_block(x_BTD, residual_BTD, self.routed)
        return self.routed(x_BTD, x_BTD) + self.shared(x_BTD)

    def gemma4_block(self, x_BTD: jax.Array, residual_BTD: jax.Array, experts: Callable) -> jax.Array:
        """Gemma 4: the dense MLP on ``x`` beside ``experts(normed residual, residual)``, each normed."""
        dense_BTD = self.post_feedforward_layernorm_1(self.dense(x_BTD))
        moe_BTD = experts(self.pre_feedforward_layernorm_2(residual_BTD), residual_BTD)
        return dense_BTD + self.post_feedforward_layernorm_2(moe_BTD)

    def routed(self, x_BTD: jax.Array, route_BTD: jax.Array) -> jax.Array:
        """The experts' weighted sum on ``x``, routed from ``route`` (the same tokens)."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(route_BTD.reshape(x_ND.shape))
        mesh = _mesh()
        if mesh is not None and (mesh.shape["expert"] > 1 or dispatch.use_gmm_kernel(self.impl)):
            y_ND = _expert_parallel(self, x_ND, e_NK, w_NK, mesh)
        else:
            rows_M = jnp.arange(e_NK.size) // self.top_k  # M = N * k token-expert pairs, token-major
            y_MD, order_M = self.grouped(x_ND, rows_M, e_NK.reshape(-1), self.expert_weights())
            y_ND = jnp.zeros_like(x_ND).at[rows_M[order_M]].add(y_MD * w_NK.reshape(-1)[order_M, None])
        return y_ND.reshape(x_BTD.shape)

    def dense_reference(self, x_BTD: jax.Array, residual_BTD: jax.Array | None = None) -> jax.Array:
        """Every expert on every token, weighted by the routing (zero off the top k): the formula."""
        if self.layout == "gemma4":
            return self.gemma4_block(x_BTD, residual_BTD, self.every_expert)
        return self.every_expert(x_BTD, x_BTD) + self.shared(x_BTD)

    def every_expert(self, x_BTD: jax.Array, route_BTD: jax.Array) -> jax.Array:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(route_BTD.reshape(x_ND.shape))
        weights_NE = jnp.zeros((x_ND.shape[0], self.experts_gate.shape[0]), x_ND.dtype)
        weights_NE = weights_NE.at[jnp.arange(x_ND.shape[0])[:, None], e_NK].set(w_NK)

        def every_expert(a: jax.Array, w: jax.Array) -> jax.Array:  # [N, D] or [N, E, F] -> [N, E, .]
            return jnp.einsum("nd,edf->nef" if a.ndim == 2 else "nef,efd->ned", a, w)

        y_NED = self.ffn(x_ND, self.expert_weights(), every_expert, lambda b: b[None])
        return jnp.einsum("ne,ned->nd", weights_NE, y_NED).reshape(x_BTD.shape)


def _mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1 or "expert" not in mesh.axis_names:
        return None
    return mesh


def _expert_parallel(moe: MoE, x_ND: jax.Array, e_NK: jax.Array, w_NK: jax.Array, mesh: Any) -> jax.Array:
    """The MoE of the tokens on a mesh, per device in a ``shard_map``.

    Tokens are split over the batch axes (``data × fsdp × expert``; padded with zero-weight rows
    to a multiple), experts over ``expert``, each expert's width over ``tensor`` (its weights
    gathered over ``fsdp`` on entry, ZeRO-3). A device sends each of its token-expert pairs to the
    device holding the expert (``_exchange``), runs its own experts grouped on what it received,
    sends the outputs back and combines them with the routing weights; the partial sums over the
    width add up over ``tensor`` (the down bias is added on one ``tensor`` device). Dropless: a
    device's receive buffer holds ``expert × M`` rows (``M`` = its pairs), the worst case of every
    pair of every device choosing its experts.
    """
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    weights = moe.expert_weights()
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

    def local(x_ND, e_NK, w_NK, *weights):
        n_loc, k = e_NK.shape
        if tensor and weights[5] is not None:  # partial sums add up over tensor: the bias once
            weights = (*weights[:5], weights[5] * (jax.lax.axis_index("tensor") == 0))
        m, e_loc = n_loc * k, num_experts // ep
        rows_M, expert_M = jnp.arange(m) // k, e_NK.reshape(-1)
        if ep == 1:
            y_MD, order_M = moe.grouped(x_ND, rows_M, expert_M, weights)
        else:
            order_M = jnp.argsort(expert_M // e_loc, stable=True)  # pairs by destination device
            send_P = jnp.zeros(ep, jnp.int32).at[expert_M // e_loc].add(1)
            recv_P = jax.lax.all_to_all(send_P, "expert", 0, 0, tiled=True)
            offsets_P = jnp.cumsum(send_P) - send_P
            slots_P = jnp.arange(ep, dtype=jnp.int32) * m
            there = lambda a, fill: _exchange(a, offsets_P, send_P, recv_P, m, fill, ragged)  # noqa: E731
            x_SD = there(x_ND[rows_M[order_M]], 0)  # S = ep * m slots, m per source device
            local_S = there(expert_M[order_M] % e_loc, e_loc)  # e_loc: an empty slot
            y_SD, order_S = moe.grouped(x_SD, jnp.arange(ep * m), local_S, weights)
            y_SD = jnp.zeros_like(y_SD).at[order_S].set(y_SD)  # back in slot order
            back_SD = _exchange(y_SD, slots_P, recv_P, send_P, m, 0, ragged)  # slot j: from device j
            pos_M = jnp.arange(m) - jnp.repeat(offsets_P, send_P, total_repeat_length=m)
            dest_M = jnp.repeat(jnp.arange(ep), send_P, total_repeat_length=m)
            y_MD = back_SD[dest_M * m + pos_M]  # pair order_M[i]'s output
        out_ND = jnp.zeros_like(x_ND).at[rows_M[order_M]].add(y_MD * w_NK.reshape(-1)[order_M, None])
        return jax.lax.psum(out_ND, "tensor") if tensor else out_ND

    in_specs = (P(rows, None), P(rows, None), P(rows, None), P(exp, None, tensor), P(exp, None, tensor),
                P(exp, tensor, None), P(exp, tensor), P(exp, tensor), P(exp, None))
    # The Pallas kernel's outputs carry no varying-axes types: only the jnp path is type-checked.
    y_ND = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(rows, None),
                         check_vma=not dispatch.use_gmm_kernel(moe.impl))(x_ND, e_NK, w_NK, *weights)
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
    """Qwen3-MoE (and Qwen3-Next, Qwen3.5-MoE): per-expert tensors (``experts.{e}.gate_proj.weight``,
    as the Qwen3 hub checkpoints), or the fused ``[E, 2F, D]`` ``experts.gate_up_proj`` / ``[E, D, F]``
    ``experts.down_proj`` of newer files; a shared expert's ``shared_expert.{gate,up,down}_proj``
    and ``shared_expert_gate`` ``[1, D]``. gpt-oss: ``router.{weight,bias}``,
    ``experts.gate_up_proj [E, D, 2F]`` with gate and up
    interleaved (gate the even columns) and its ``_bias [E, 2F]``, ``experts.down_proj [E, F, D]``
    and its ``_bias`` (``[in, out]`` already; MXFP4 files: dequantised by loading)."""
    if mlp_option(spec, "layout") == "gemma4":  # relative to the layer (MLPKind.hf_prefix)
        norms = tuple(f"{p}_feedforward_layernorm_{i}" for p, i in (("post", 1), ("pre", 2), ("post", 2)))
        return (WeightRow("router.proj.weight", "gate.kernel", transpose=True),
                WeightRow("router.scale", "router_scale"),
                WeightRow("router.per_expert_scale", "per_expert_scale"),
                WeightRow("experts.gate_up_proj", "experts_gate", transpose=True, part=(0, 2)),
                WeightRow("experts.gate_up_proj", "experts_up", transpose=True, part=(1, 2)),
                WeightRow("experts.down_proj", "experts_down", transpose=True),
                *(row.prefixed("mlp.", "dense.") for row in dense_rows(cfg, spec)),
                *(WeightRow(f"{n}.weight", f"{n}.weight") for n in norms))
    if mlp_option(spec, "layout") == "gpt_oss":
        bias = mlp_option(spec, "expert_bias")
        rows = [WeightRow("router.weight", "gate.kernel", transpose=True),
                *([WeightRow("router.bias", "gate.bias")] if mlp_option(spec, "router_bias") else []),
                *(WeightRow(f"experts.gate_up_proj{s}", f"experts_{p}{s}", part=(i, 2), interleaved=True)
                  for s in ("", "_bias")[:1 + bool(bias)] for i, p in enumerate(("gate", "up"))),
                WeightRow("experts.down_proj", "experts_down"),
                *([WeightRow("experts.down_proj_bias", "experts_down_bias")] if bias else [])]
        return tuple(rows)
    e = mlp_option(spec, "experts")
    shared = tuple(row.prefixed("shared_expert.", "shared_expert.") for row in dense_rows(cfg, spec)
                   ) if mlp_option(spec, "shared_expert_size") else ()
    if shared and mlp_option(spec, "shared_expert_gate"):
        shared += (WeightRow("shared_expert_gate.weight", "shared_expert_gate.kernel", transpose=True),)
    fused = {"gate": WeightRow("experts.gate_up_proj", "experts_gate", transpose=True, part=(0, 2)),
             "up": WeightRow("experts.gate_up_proj", "experts_up", transpose=True, part=(1, 2)),
             "down": WeightRow("experts.down_proj", "experts_down", transpose=True)}
    return (WeightRow("gate.weight", "gate.kernel", transpose=True),
            *(WeightRow(f"experts.{{e}}.{p}_proj.weight", f"experts_{p}", transpose=True, experts=e,
                        alternative=fused[p]) for p in ("gate", "up", "down")), *shared)


def _flops(cfg: ModelConfig, spec: LayerSpec, rows: int) -> float:
    """The router plus ``top_k`` SwiGLU experts per token (plus the shared expert and its gate)."""
    d, e, k = cfg.hidden_size, mlp_option(spec, "experts"), mlp_option(spec, "top_k")
    shared = 3 * d * (mlp_option(spec, "shared_expert_size") + mlp_option(spec, "dense_size"))
    shared += d * bool(mlp_option(spec, "shared_expert_gate"))
    return 2.0 * rows * (d * e + k * 3 * d * expert_width(cfg, spec) + shared)


def expected_experts(experts: int, top_k: int, tokens: float) -> float:
    """How many distinct experts ``tokens`` tokens reach on average when each picks ``top_k`` of
    ``experts`` uniformly at random: ``E * (1 - (1 - k/E)^n)`` (an expert misses one token's pick
    with probability ``1 - k/E``, independently per token)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def _unread(cfg: ModelConfig, spec: LayerSpec, rows: int) -> float:
    """The experts no token of the pass is routed to (expected, uniform routing): their weights
    and biases stay in memory unread, which is the MoE verify pass's cost model (docs/scaling.md)."""
    d, f, e = cfg.hidden_size, expert_width(cfg, spec), mlp_option(spec, "experts")
    per_expert = 3 * d * f + (2 * f + d) * bool(mlp_option(spec, "expert_bias"))
    return (e - expected_experts(e, mlp_option(spec, "top_k"), rows)) * per_expert


MOE = register_mlp(MLPKind(
    name="moe", module=MoE, options=OPTIONS, weights=_weights,
    sharding=(
        (r"(^|\.)mlp\.gate\.kernel$", ("embed", None)),
        (r"(^|\.)mlp\.experts_(gate|up)$", ("exp", "embed", "mlp")),
        (r"(^|\.)mlp\.experts_down$", ("exp", "mlp", "embed")),
        (r"(^|\.)mlp\.gate\.bias$", (None,)),
        (r"(^|\.)mlp\.experts_(gate|up)_bias$", ("exp", "mlp")),
        (r"(^|\.)mlp\.experts_down_bias$", ("exp", None)),
        (r"(^|\.)mlp\.shared_expert_gate\.kernel$", ("embed", None)),  # its MLP: the dense kind's rows
        (r"(^|\.)mlp\.router_scale$", (None,)),
        (r"(^|\.)mlp\.\w+_feedforward_layernorm_[12]\.weight$", (None,)),
        (r"(^|\.)mlp\.per_expert_scale$", (None,)),
    ),
    flops=_flops,
    unread=_unread,
    hf_prefix=lambda spec: "" if mlp_option(spec, "layout") == "gemma4" else "mlp.",
))
