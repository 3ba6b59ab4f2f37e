"""The jitted train and eval steps: the frozen target inside, the drafter kind's loss, one update.

The loss is the drafter kind's (``DrafterKind.loss``, ``dflash.drafters``): every block drafter
scores its blocks the same way (``dflash.drafters.blocks``) and differs in how a block is drafted.
No gradient reaches the target and its parameters are never donated (docs/design.md §5, §6).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash.drafters import kind_of
from dflash.drafters.objective import default_gamma
from dflash.models.transformer import Transformer
from dflash.sharding import batch_sharding, tree_shardings
from dflash.training.config import ExperimentConfig


def step_options(cfg: ExperimentConfig, block_size: int) -> dict[str, Any]:
    """The loss settings of ``make_step_fns`` from a config (the trainer and ``dflash.plan``)."""
    ce_weight, kl_weight = cfg.loss_weights
    return dict(num_anchors=min(cfg.train.num_anchors, cfg.data.seq_len - 1),
                gamma=cfg.train.gamma or default_gamma(block_size), ce_weight=ce_weight, kl_weight=kl_weight,
                target_labels=cfg.train.labels == "target", loss_chunk=cfg.train.loss_chunk)


def drafter_forward(drafter: nnx.Module, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
                    **step_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of the drafter's kind (``DrafterKind.loss``; the kind is static under jit)."""
    return kind_of(drafter).loss(drafter, target, batch, key, **step_kw)


def mean_metrics(micro: list[dict[str, jax.Array]], names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The mean of ``names`` over the micro-batches of one optimizer step (``grad_accum`` of them),
    on device: what the step as a whole saw, not only its last micro-batch."""
    return {name: sum(m[name] for m in micro) / len(micro) for name in names}


def cast_module(module: nnx.Module, dtype: jnp.dtype) -> nnx.Module:
    """A compute-dtype copy of the floating-point state (integer buffers, e.g. EAGLE-3's vocabulary
    maps, stay exact); gradients flow back to the fp32 master weights through the cast."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))


def make_step_fns(graphdef: Any, tgraph: Any, step_kw: dict[str, Any], compute: jnp.dtype, *,
                  mesh: Mesh | None = None, state_shardings: Any = None, tstate_shardings: Any = None):
    """Jitted ``train_step(state, tstate, batch, key)`` and ``eval_step(...)``.

    ``state`` is the (drafter, optimizer) state and is donated: it is replaced every step. The
    frozen target's ``tstate`` is an ordinary argument: never donated, never differentiated.
    On a ``mesh`` the steps take and give their states in ``state_shardings`` /
    ``tstate_shardings``, the batch split over ``data × fsdp × expert``, and the activation constraints
    of the models (``dflash.sharding.constrain``) are live while they trace.
    """
    on_mesh = (lambda: jax.sharding.use_abstract_mesh(mesh.abstract_mesh)) if mesh else contextlib.nullcontext

    def train_step(state, tstate, batch, key):
        with on_mesh():
            return _train_step(state, tstate, batch, key)

    def eval_step(state, tstate, batch, key):
        with on_mesh():
            drafter, _ = nnx.merge(graphdef, state)
            return drafter_forward(drafter, nnx.merge(tgraph, tstate), batch, key, **step_kw)[1]

    def _train_step(state, tstate, batch, key):
        drafter, optimizer = nnx.merge(graphdef, state)
        target = nnx.merge(tgraph, tstate)

        def loss_fn(drafter):
            d = cast_module(drafter, compute) if compute != jnp.float32 else drafter
            t = cast_module(target, compute) if compute != target.dtype else target
            return drafter_forward(d, t, batch, key, **step_kw, target_metrics=False)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(drafter)
        if mesh is not None:  # gradients in their params' shards: FSDP reduces them with a reduce-scatter
            grads = jax.lax.with_sharding_constraint(grads, tree_shardings(grads, mesh))
        metrics["grad_norm"] = optax.tree.norm(grads)
        optimizer.update(drafter, grads)
        return nnx.state((drafter, optimizer)), metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
    rep = NamedSharding(mesh, P())
    ins = (state_shardings, tstate_shardings, batch_sharding(mesh), rep)
    return (jax.jit(train_step, donate_argnums=0, in_shardings=ins, out_shardings=(state_shardings, rep)),
            jax.jit(eval_step, in_shardings=ins, out_shardings=rep))
