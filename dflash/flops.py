"""Model FLOPs of a train step and of decode passes, counted from the architecture.

XLA's ``cost_analysis`` counts a ``while`` loop's body once (a ``lax.scan`` over 16 loss
chunks reports 1/16 of its matmuls) and sees nothing inside Pallas kernels, so the plans in
``dflash.plan`` count FLOPs here: each layer kind says its own (``dflash.models.kinds``:
``2 * m * n * k`` per matmul, attention as ``4 * rows * keys * heads * head_dim``), each drafter
kind its train step (``DrafterKind.flops``); backward = 2x forward (1x for frozen weights that
only pass a gradient through), plus the forward again for rematerialised parts. Shape letters
as in ``dflash.training``: B rows, S sequence, A anchors, K block size, V vocabulary.
"""

from __future__ import annotations

from dflash.config import ModelConfig
from dflash.models import kinds


def target_forward_flops(cfg: ModelConfig, batch: int, seq: int, *, layers: int | None = None,
                         logits_rows: int = 0) -> float:
    """The frozen target's clean causal pass over ``batch x seq`` tokens (flash: half the keys)."""
    tokens = batch * seq
    depth = cfg.num_layers if layers is None else layers
    return sum(kinds.layer_flops(cfg, i, tokens, seq / 2) for i in range(depth)) + \
        2.0 * logits_rows * cfg.hidden_size * cfg.vocab_size


def decode_flops(cfg: ModelConfig, batch: int, new_tokens: int, context: int) -> float:
    """One target pass of ``new_tokens`` per row against ``context`` cached positions (+ LM head)."""
    rows = batch * new_tokens
    return sum(kinds.layer_flops(cfg, i, rows, context + new_tokens) for i in range(cfg.num_layers)) + \
        2.0 * rows * cfg.hidden_size * cfg.vocab_size


def params_read(cfg: ModelConfig, rows: int) -> float:
    """Parameters one target pass over ``rows`` tokens reads from memory: all of them, less the
    experts no token is routed to (each MLP kind's ``unread``: expected, under uniform routing) and,
    when the embedding is not tied to the LM head, the table rows no token looks up."""
    unread = sum(kind.unread(cfg, spec, rows) for spec in cfg.layers
                 if (kind := kinds.mlp_kind(spec)).unread is not None)
    if not cfg.tie_word_embeddings:
        unread += max(cfg.vocab_size - rows, 0) * cfg.hidden_size
    return cfg.num_params() - unread


def head_flops(target: ModelConfig, head_rows: int, target_logits: bool) -> float:
    """The chunked loss head over ``head_rows`` drafted rows: forward, the backward's recompute and
    the input gradient (no weight gradient), plus the target's logits at the same rows if needed."""
    one = 2.0 * head_rows * target.hidden_size * target.vocab_size
    return 3.0 * one + (one if target_logits else 0.0)
