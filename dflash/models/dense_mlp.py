"""The dense MLP kind: ``down(act(gate(x)) * up(x))``; options ``bias`` (Llama's ``mlp_bias``),
``activation`` (``silu``: SwiGLU; ``gelu_tanh``: GeGLU with the tanh approximation, Gemma's
``gelu_pytorch_tanh``) and ``intermediate_size`` (this layer's width; 0: the config's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.models.kinds import MLPKind, WeightRow, mlp_option, register_mlp
from dflash.models.layers import Linear
from dflash.sharding import constrain


class MLP(nnx.Module):
    """``width``: the hidden width when not the config's (a mixture's shared expert)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 width: int | None = None, activation: str | None = None):
        d, f = cfg.hidden_size, width or _width(cfg, spec)
        bias = _bias(spec)
        self.activation = activation or _activation(spec)
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        gated_BTF = constrain(act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD), "mlp")
        return self.down_proj(gated_BTF)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def _activation(spec: LayerSpec) -> str:
    """The dense kind's activation (an MLP of this shape inside another kind: SiLU)."""
    act = mlp_option(spec, "activation") if spec.mlp == "dense" else "silu"
    if act not in ACTIVATIONS:
        raise ConfigError(f"dense MLP option activation={act!r} is not one of {', '.join(ACTIVATIONS)}")
    return act


def _width(cfg: ModelConfig, spec: LayerSpec) -> int:
    return (mlp_option(spec, "intermediate_size") if spec.mlp == "dense" else 0) or cfg.intermediate_size


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
    name="dense", module=MLP, options={"bias": False, "activation": "silu", "intermediate_size": 0},
    weights=_weights,
    sharding=(
        (r"(^|\.)(gate|up)_proj\.kernel$", ("embed", "mlp")),
        (r"(^|\.)(gate|up)_proj\.bias$", ("mlp",)),
        (r"(^|\.)down_proj\.kernel$", ("mlp", "embed")),
        (r"(^|\.)down_proj\.bias$", (None,)),
    ),
    flops=lambda cfg, spec, rows: 2.0 * rows * 3 * cfg.hidden_size * _width(cfg, spec),
))
