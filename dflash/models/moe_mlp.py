"""The mixture-of-experts MLP kind (Qwen3-MoE): a softmax router picks ``top_k`` of ``experts``
SwiGLU experts per token, dropless (every token reaches all of its k experts; no capacity factor).

``y = sum_{e in topk(p)} w_e * down_e(silu(gate_e(x)) * up_e(x))`` with ``p = softmax(x @ router)``
(float32), ``w`` the top-k probabilities, renormalised to sum to 1 when ``norm_topk_prob`` (the
config says; the transformers class default is false). Options: ``experts``, ``top_k``,
``norm_topk_prob``, ``intermediate_size`` (each expert's width; 0: the config's).

Compute: the token-expert pairs are sorted by expert and each expert's contiguous group goes
through ``jax.lax.ragged_dot`` (a grouped matmul: only routed tokens are computed, k of E per
token). ``dense_reference`` is the every-expert formula the tests compare it with. Checkpoints
store the experts one tensor each or fused; both load, saving writes one tensor each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear, normal

OPTIONS = {"experts": 0, "top_k": 1, "norm_topk_prob": False, "intermediate_size": 0}


def expert_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    return mlp_option(spec, "intermediate_size") or cfg.intermediate_size


class MoE(nnx.Module):
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

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d = x_BTD.shape[-1]
        x_ND = x_BTD.reshape(-1, d)
        e_NK, w_NK = self.route(x_ND)
        num_experts = self.experts_gate.shape[0]
        flat_M = e_NK.reshape(-1)  # M = N * k token-expert pairs
        order_M = jnp.argsort(flat_M, stable=True)  # grouped by expert, as ragged_dot needs
        token_M = order_M // self.top_k
        sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
        xs_MD = x_ND[token_M]
        gated_MF = (jax.nn.silu(jax.lax.ragged_dot(xs_MD, self.experts_gate[...], sizes_E))
                    * jax.lax.ragged_dot(xs_MD, self.experts_up[...], sizes_E))
        y_MD = jax.lax.ragged_dot(gated_MF, self.experts_down[...], sizes_E) * w_NK.reshape(-1)[order_M, None]
        return jnp.zeros_like(x_ND).at[token_M].add(y_MD).reshape(x_BTD.shape)

    def dense_reference(self, x_BTD: jax.Array) -> jax.Array:
        """Every expert on every token, weighted by the routing (zero off the top k): the formula."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        e_NK, w_NK = self.route(x_ND)
        weights_NE = jnp.zeros((x_ND.shape[0], self.experts_gate.shape[0]), x_ND.dtype)
        weights_NE = weights_NE.at[jnp.arange(x_ND.shape[0])[:, None], e_NK].set(w_NK)
        h_NEF = (jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, self.experts_gate[...]))
                 * jnp.einsum("nd,edf->nef", x_ND, self.experts_up[...]))
        y_NED = jnp.einsum("nef,efd->ned", h_NEF, self.experts_down[...])
        return jnp.einsum("ne,ned->nd", weights_NE, y_NED).reshape(x_BTD.shape)


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
        (r"(^|\.)mlp\.experts_(gate|up)$", (None, "embed", "mlp")),
        (r"(^|\.)mlp\.experts_down$", (None, "mlp", "embed")),
    ),
    flops=_flops,
))
