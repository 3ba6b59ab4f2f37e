"""The drafter's loss head at a training step's shape: fused loss vs its autodiff reference."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dflash.bench.timing import median_in_turns
from dflash.drafters import objective as obj


def loss_head_costs(*, batch: int = 8, anchors: int = 64, block_size: int = 16, hidden: int = 256,
                    vocab: int = 4096, repeats: int = 5, iters: int = 5, seed: int = 0) -> dict[str, Any]:
    """Seconds per forward + backward of the drafter's loss head at a training step's shape.

    The head is ``lm_head`` over every block row (``[batch, anchors, block_size - 1, hidden]``)
    and the decayed loss, differentiated with respect to the rows. It is timed with the fused
    loss (``objective.decayed_loss``) and with its autodiff-only reference, CE alone and CE + KL,
    in turn for ``repeats`` rounds (median). Both give the same value and gradient (tests).
    """
    rng = np.random.default_rng(seed)
    k = block_size - 1
    h = jnp.asarray(rng.normal(size=(batch, anchors, k, hidden)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden), jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(batch, anchors, k, vocab)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, anchors, k)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, anchors, k)) < 0.9)
    weights = obj.loss_weights(block_size, 7.0)

    args = (h, w_DV, t_logits, labels, mask, weights)  # arguments, not constants XLA would fold

    def make(loss_fn, kl_weight: float):
        def head(h_BAkD, w_DV, t_logits, labels, mask, weights):
            logits = jnp.einsum("BAkD,DV->BAkV", h_BAkD, w_DV)
            out = loss_fn(logits, labels, mask, weights, t_logits, 1.0, kl_weight)
            return out[0] if isinstance(out, tuple) else out

        fn = jax.jit(jax.value_and_grad(head)).lower(*args).compile()
        jax.block_until_ready(fn(*args))

        def run():
            for _ in range(iters):
                out = fn(*args)
            return out

        return run

    impls = (("fused", obj.decayed_loss), ("reference", obj.reference_decayed_loss))
    losses = (("ce", 0.0), ("ce_kl", 1.0))
    runs = {f"{impl}_{loss}": make(fn, kl) for impl, fn in impls for loss, kl in losses}
    out: dict[str, Any] = {f"{name}_s": t for name, t in median_in_turns(runs, repeats, iters).items()}
    for loss in ("ce", "ce_kl"):
        out[f"speedup_{loss}"] = out[f"reference_{loss}_s"] / out[f"fused_{loss}_s"]
    out["shape"] = [batch, anchors, k, vocab]
    return out
