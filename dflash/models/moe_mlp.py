"""The mixture-of-experts MLP kind (Qwen3-MoE, gpt-oss): a router picks ``top_k`` of ``experts``
SwiGLU experts per token, dropless (every token reaches all of its k experts; no capacity factor).

``y = sum_{e in topk} w_e * down_e(act(gate_e(x), up_e(x)))``. Options: ``experts``, ``top_k``,
``intermediate_size`` (each expert's width; 0: the config's); ``router``: ``softmax_topk``
(Qwen3-MoE: ``p = softmax(x @ router)`` in float32, ``w`` its top k) or ``topk_softmax`` (gpt-oss:
the top k logits, ``w`` their softmax); ``norm_topk_prob`` (renormalise ``w`` to sum to 1; the
config says, the transformers class default is false); ``router_bias``; ``expert_bias`` (biases on
gate, up and down); ``activation``: ``swiglu`` (``silu(gate) * up``) or ``clamped_swiglu``
(gpt-oss, ``swiglu_limit`` / ``swiglu_alpha``); ``layout``: which checkpoint tensors hold the
weights (``qwen3_moe`` or ``gpt_oss``, ``_weights``).

Compute: the token-expert pairs are sorted by expert and each expert's contiguous group goes
through ``jax.lax.ragged_dot`` (a grouped matmul: only routed tokens are computed, k of E per
token). ``dense_reference`` is the every-expert formula the tests compare it with; both run the
one ``ffn``. Qwen3-MoE checkpoints store the experts one tensor each or fused; both load, saving
writes one tensor each.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear, normal

OPTIONS = {"experts": 0, "top_k": 1, "norm_topk_prob": False, "intermediate_size": 0,
           "router": "softmax_topk", "router_bias": False, "expert_bias": False, "activation": "swiglu",
           "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "layout": "qwen3_moe"}
ROUTERS = ("softmax_topk", "topk_softmax")  # Qwen3-MoE: softmax then top-k; gpt-oss: top-k then softmax
ACTIVATIONS = ("swiglu", "clamped_swiglu")
LAYOUTS = ("qwen3_moe", "gpt_oss")  # the checkpoint tensors the weights are read from (_weights)


def expert_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    return mlp_option(spec, "intermediate_size") or cfg.intermediate_size


def _choice(spec: LayerSpec, name: str, allowed: tuple[str, ...]) -> str:
    value = mlp_option(spec, name)
    if value not in allowed:
        raise ConfigError(f"moe MLP option {name}={value!r} is not one of {', '.join(allowed)}")
    return value


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, k, d, f = (mlp_option(spec, "experts"), mlp_option(spec, "top_k"), cfg.hidden_size,
                      expert_width(cfg, spec))
        if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
            raise ConfigError(f"moe MLP needs 1 <= top_k <= experts, got top_k={k!r}, experts={e!r}")
        self.top_k, self.norm_topk_prob = k, bool(mlp_option(spec, "norm_topk_prob"))
        self.router = _choice(spec, "router", ROUTERS)
        self.activation = _choice(spec, "activation", ACTIVATIONS)
        _choice(spec, "layout", LAYOUTS)
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

    def route(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's ``top_k`` experts ``[N, k]`` and their weights ``[N, k]`` (x's dtype)."""
        logits_NE = self.gate(x_ND).astype(jnp.float32)
        if self.router == "topk_softmax":
            top_NK, e_NK = jax.lax.top_k(logits_NE, self.top_k)
            w_NK = jax.nn.softmax(top_NK, axis=-1)
        else:
            w_NK, e_NK = jax.lax.top_k(jax.nn.softmax(logits_NE, axis=-1), self.top_k)
        if self.norm_topk_prob:
            w_NK = w_NK / w_NK.sum(-1, keepdims=True)
        return e_NK, w_NK.astype(x_ND.dtype)

    def activate(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """SwiGLU, or gpt-oss's clamped form: ``(clip(up) + 1) * g * sigmoid(alpha * g)`` with
        ``g = min(gate, limit)`` and ``up`` clipped to ``[-limit, limit]``."""
        if self.activation == "clamped_swiglu":
            gate, up = jnp.minimum(gate, self.limit), jnp.clip(up, -self.limit, self.limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))
        return jax.nn.silu(gate) * up

    def ffn(self, x: jax.Array, matmul: Callable[[jax.Array, jax.Array], jax.Array],
            bias: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """The experts' FFN, one formula for both computations: ``matmul(x, w_E..)`` multiplies by
        each row's expert's weights, ``bias(b_E.)`` gives each row's expert's bias."""
        def plus(y: jax.Array, b: nnx.Param | None) -> jax.Array:
            return y if b is None else y + bias(b[...])

        h = self.activate(plus(matmul(x, self.experts_gate[...]), self.experts_gate_bias),
                          plus(matmul(x, self.experts_up[...]), self.experts_up_bias))
        return plus(matmul(h, self.experts_down[...]), self.experts_down_bias)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d = x_BTD.shape[-1]
        x_ND = x_BTD.reshape(-1, d)
        e_NK, w_NK = self.route(x_ND)
        num_experts = self.experts_gate.shape[0]
        flat_M = e_NK.reshape(-1)  # M = N * k token-expert pairs
        order_M = jnp.argsort(flat_M, stable=True)  # grouped by expert, as ragged_dot needs
        token_M = order_M // self.top_k
        sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
        expert_M = flat_M[order_M]
        y_MD = self.ffn(x_ND[token_M], lambda a, w: jax.lax.ragged_dot(a, w, sizes_E),
                        lambda b: b[expert_M]) * w_NK.reshape(-1)[order_M, None]
        return jnp.zeros_like(x_ND).at[token_M].add(y_MD).reshape(x_BTD.shape)

    def dense_reference(self, x_BTD: jax.Array) -> jax.Array:
        """Every expert on every token, weighted by the routing (zero off the top k): the formula."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(x_ND)
        weights_NE = jnp.zeros((x_ND.shape[0], self.experts_gate.shape[0]), x_ND.dtype)
        weights_NE = weights_NE.at[jnp.arange(x_ND.shape[0])[:, None], e_NK].set(w_NK)

        def every_expert(a: jax.Array, w: jax.Array) -> jax.Array:  # [N, D] or [N, E, F] -> [N, E, .]
            return jnp.einsum("nd,edf->nef" if a.ndim == 2 else "nef,efd->ned", a, w)

        y_NED = self.ffn(x_ND, every_expert, lambda b: b[None])
        return jnp.einsum("ne,ned->nd", weights_NE, y_NED).reshape(x_BTD.shape)


def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    """Qwen3-MoE: per-expert tensors (``experts.{e}.gate_proj.weight``, as the hub checkpoints), or
    the fused ``[E, 2F, D]`` ``experts.gate_up_proj`` / ``[E, D, F]`` ``experts.down_proj`` of newer
    files. gpt-oss: ``router.{weight,bias}``, ``experts.gate_up_proj [E, D, 2F]`` with gate and up
    interleaved (gate the even columns) and its ``_bias [E, 2F]``, ``experts.down_proj [E, F, D]``
    and its ``_bias`` (``[in, out]`` already; MXFP4 files: dequantised by loading)."""
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
        (r"(^|\.)mlp\.experts_(gate|up)$", (None, "embed", "mlp")),
        (r"(^|\.)mlp\.experts_down$", (None, "mlp", "embed")),
        (r"(^|\.)mlp\.gate\.bias$", (None,)),
        (r"(^|\.)mlp\.experts_(gate|up)_bias$", (None, "mlp")),
        (r"(^|\.)mlp\.experts_down_bias$", (None, None)),
    ),
    flops=_flops,
))
