"""Persistent decoding memory a method adds beyond the target: parameters and drafter state."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def drafter_memory(target, method, drafter=None, *, batch: int = 1, max_len: int = 512) -> dict[str, Any]:
    """Bytes of persistent decoding state, summed over the arrays actually allocated.

    ``drafter_state_bytes`` is what ``method.init`` creates for ``batch`` rows of ``max_len``
    slots (DFlash: its context K/V cache; Orthrus and n-gram: nothing), ``drafter_params_bytes``
    the drafter module's parameters (DFlash: its layers; Orthrus: the diffusion attentions).
    Their sum is the memory a method adds beyond the target's parameters and KV cache.
    """
    state = method.init(drafter, batch, max_len, target.dtype)
    params = _nbytes(nnx.state(drafter, nnx.Param)) if drafter is not None else 0
    kv = target.init_cache(batch, max_len)
    out = {"batch": batch, "max_len": max_len, "drafter_params_bytes": params,
           "drafter_state_bytes": _nbytes(state),
           "target_params_bytes": _nbytes(nnx.state(target, nnx.Param)), "target_kv_cache_bytes": _nbytes(kv)}
    out["extra_bytes"] = out["drafter_params_bytes"] + out["drafter_state_bytes"]
    return out
