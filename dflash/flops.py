"""Model FLOPs of a train step and of decode passes, counted from the architecture.

XLA's ``cost_analysis`` counts a ``while`` loop's body once (a ``lax.scan`` over 16 loss
chunks reports 1/16 of its matmuls) and sees nothing inside Pallas kernels, so the plans in
``dflash.plan`` count FLOPs here: ``2 * m * n * k`` per matmul, attention as ``4 * rows *
keys * heads * head_dim``, backward = 2x forward (1x for frozen weights that only pass a
gradient through), plus the forward again for rematerialised parts. Shape letters as in
``dflash.training``: B rows, S sequence, A anchors, K block size, V vocabulary.
"""

from __future__ import annotations

from dflash.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(attention, MLP) weights of one decoder layer that multiply activations."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return d * q + 2 * d * kv + q * d, 3 * d * cfg.intermediate_size


def attention_flops(rows: int, keys: float, cfg: ModelConfig) -> float:
    """QK^T and PV of ``rows`` queries each against ``keys`` keys (all heads)."""
    return 4.0 * rows * keys * cfg.num_heads * cfg.head_dim


def target_forward_flops(cfg: ModelConfig, batch: int, seq: int, *, layers: int | None = None,
                         logits_rows: int = 0) -> float:
    """The frozen target's clean causal pass over ``batch x seq`` tokens (flash: half the keys)."""
    attn_w, mlp_w = layer_matmul_params(cfg)
    tokens = batch * seq
    per_layer = 2.0 * tokens * (attn_w + mlp_w) + attention_flops(tokens, seq / 2, cfg)
    return (layers if layers is not None else cfg.num_layers) * per_layer + \
        2.0 * logits_rows * cfg.hidden_size * cfg.vocab_size


def decode_flops(cfg: ModelConfig, batch: int, new_tokens: int, context: int) -> float:
    """One target pass of ``new_tokens`` per row against ``context`` cached positions (+ LM head)."""
    attn_w, mlp_w = layer_matmul_params(cfg)
    rows = batch * new_tokens
    per_layer = 2.0 * rows * (attn_w + mlp_w) + attention_flops(rows, context + new_tokens, cfg)
    return cfg.num_layers * per_layer + 2.0 * rows * cfg.hidden_size * cfg.vocab_size


def train_step_flops(method: str, target: ModelConfig, drafter: ModelConfig | None, *, batch: int, seq: int,
                     anchors: int, block: int, feature_layers: tuple[int, ...] = (), target_logits: bool,
                     remat: bool = False) -> dict[str, float]:
    """FLOPs of one micro-batch train step, by part: ``target``, ``drafter``, ``loss_head``, ``total``.

    DFlash: the target runs up to its deepest feature layer unless its logits are needed
    (``target_logits``: KL or target labels); the drafter's ``num_layers`` layers see ``A*K``
    block rows per sequence against the whole context (the training attention is dense over
    ``S``). Orthrus: the whole target, one diffusion attention per layer on the block rows
    (the target's MLP on those rows is frozen: its backward only passes the gradient).
    """
    d, v = target.hidden_size, target.vocab_size
    rows = batch * anchors * block  # drafted block rows
    head_rows = batch * anchors * (block - 1)
    redo = 1.0 if remat else 0.0
    attn_w, mlp_w = layer_matmul_params(target)
    if method == "orthrus":
        t = target_forward_flops(target, batch, seq)
        attn = 2.0 * rows * attn_w + attention_flops(rows, seq + block, target)
        mlp = 2.0 * rows * mlp_w
        # trained attention: fwd + 2x bwd; frozen MLP: fwd + 1x bwd (input gradient only)
        draft = target.num_layers * ((3.0 + redo) * attn + (2.0 + redo) * mlp)
    else:
        if drafter is None:
            raise ValueError("a DFlash step needs the drafter's layer config")
        layers = None if target_logits else max(feature_layers) + 1
        t = target_forward_flops(target, batch, seq, layers=layers)
        d_attn_w, d_mlp_w = layer_matmul_params(drafter)
        kv = drafter.num_kv_heads * drafter.head_dim
        per_layer = (2.0 * rows * (d_attn_w + d_mlp_w) + attention_flops(rows, seq + block, drafter)
                     + 2.0 * batch * seq * 2 * d * kv)  # context K/V projection
        fc = 2.0 * batch * seq * len(feature_layers) * d * d
        draft = (3.0 + redo) * drafter.num_layers * per_layer + 3.0 * fc
    # chunked head: forward, the backward's recompute, the input gradient (no weight gradient)
    head = 3.0 * 2.0 * head_rows * d * v
    if target_logits:
        head += 2.0 * head_rows * d * v  # the target's logits at the same rows
    return {"target": t, "drafter": draft, "loss_head": head, "total": t + draft + head}
