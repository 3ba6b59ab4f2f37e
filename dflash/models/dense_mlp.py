"""The dense MLP kind: SwiGLU, ``down(silu(gate(x)) * up(x))``; option ``bias`` (Llama's ``mlp_bias``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear
from dflash.sharding import constrain


class MLP(nnx.Module):
    """``width``: the hidden width when not the config's (a mixture's shared expert)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 width: int | None = None):
        d, f = cfg.hidden_size, width or cfg.intermediate_size
        bias = _bias(spec)
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gated_BTF = constrain(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD), "mlp")
        return self.down_proj(gated_BTF)


def _bias(spec: LayerSpec) -> bool:
    """Biases: the dense kind's option (an MLP of this shape inside another kind has none)."""
    return spec.mlp == "dense" and bool(mlp_option(spec, "bias"))


def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    names = ("gate", "up", "down")
    rows = tuple(WeightRow(f"{p}_proj.weight", f"{p}_proj.kernel", transpose=True) for p in names)
    if _bias(spec):
        rows += tuple(WeightRow(f"{p}_proj.bias", f"{p}_proj.bias") for p in names)
    return rows


DENSE = register_mlp(MLPKind(
    name="dense", module=MLP, options={"bias": False}, weights=_weights,
    sharding=(
        (r"(^|\.)(gate|up)_proj\.kernel$", ("embed", "mlp")),
        (r"(^|\.)(gate|up)_proj\.bias$", ("mlp",)),
        (r"(^|\.)down_proj\.kernel$", ("mlp", "embed")),
        (r"(^|\.)down_proj\.bias$", (None,)),
    ),
    flops=lambda cfg, spec, rows: 2.0 * rows * 3 * cfg.hidden_size * cfg.intermediate_size,
))
