"""The optimizer of a drafter run: AdamW with global-norm clipping under a warmup-cosine schedule.

``grad_accum > 1`` wraps it in ``optax.MultiSteps``: the parameters change once every
``grad_accum`` micro-batches, with the mean of their gradients.
"""

from __future__ import annotations

import optax

from dflash.training.config import ExperimentConfig


def lr_schedule(cfg: ExperimentConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay over the run's optimizer steps."""
    o = cfg.optim
    warmup = int(round(o.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1),
                                              o.lr * o.final_lr_ratio)


def make_optimizer(cfg: ExperimentConfig, total_steps: int) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return optax.MultiSteps(tx, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else tx
