"""The jitted train and eval steps: the frozen target inside, the method's loss, one optimizer update.

Both methods score blocks the same way (``loss_head.score_hidden``: ``objective.score_blocks``
from hidden states, the logits made in row chunks); they differ in how a
block is drafted: **DFlash** (``block_forward``) projects the target's hidden states into a
context for a separate drafter; **Orthrus** (``orthrus_forward``) runs diffusion attentions
over the target's own AR K/V. No gradient reaches the target and its parameters are never
donated (docs/design.md §5, §6).

Shape letters (docs/architecture.md): B rows, S sequence, A anchors per row, Q block rows
(the block size), D model width, V vocabulary, L layers, K kv heads, H head dim.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash import cache as kvc
from dflash.drafters.dflash import DFlashDrafter, default_gamma
from dflash.drafters.orthrus import OrthrusDrafter
from dflash.models.transformer import Transformer
from dflash.sharding import batch_sharding, tree_shardings
from dflash.training import loss_head
from dflash.training import objective as obj
from dflash.training.config import ExperimentConfig


def step_options(cfg: ExperimentConfig, block_size: int) -> dict[str, Any]:
    """The loss settings of ``make_step_fns`` from a config (the trainer and ``dflash.plan``)."""
    ce_weight, kl_weight = cfg.loss_weights
    return dict(num_anchors=min(cfg.train.num_anchors, cfg.data.seq_len - 1),
                gamma=cfg.train.gamma or default_gamma(block_size), ce_weight=ce_weight, kl_weight=kl_weight,
                target_labels=cfg.train.labels == "target", loss_chunk=cfg.train.loss_chunk)


def document_mask(seg_BS: jax.Array) -> jax.Array:
    """``[B, S, S]`` causal attention within each packed document (segment ids)."""
    s = seg_BS.shape[1]
    return jnp.tril(jnp.ones((s, s), bool))[None] & (seg_BS[:, :, None] == seg_BS[:, None, :])


def block_forward(drafter: DFlashDrafter, target: Transformer, batch: dict[str, jax.Array],
                  key: jax.Array, *, num_anchors: int, gamma: float, ce_weight: float,
                  kl_weight: float, target_labels: bool = False, target_metrics: bool = True,
                  loss_chunk: int = loss_head.DEFAULT_CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one packed batch (tokens / loss_mask / segment_ids / positions [B, S]).

    ``target_metrics=False`` (train steps): when the loss needs no target logits (CE on the data,
    no KL), the target stops at its deepest feature layer (XLA drops the layers above it and the
    LM head: 9% of a main-job step) and the simulated tau compares with the labels, which on
    target-regenerated data are the target's greedy tokens. Eval always compares with the target.
    """
    cfg = drafter.cfg
    q = cfg.block_size
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    need_logits = target_metrics or kl_weight > 0 or target_labels
    # Frozen target over the clean sequence: causal within each packed document (memory-bounded
    # prefill attention); its final hidden state, not its [B, S, V] logits, feeds the loss head.
    out = target(tokens, pos, segment_ids=seg, hidden_layers=cfg.target_layer_ids, compute_logits=False,
                 final_hidden=need_logits)
    hidden = jax.lax.stop_gradient(out.hidden)  # [n, B, S, D]
    t_final = jax.lax.stop_gradient(out.final) if need_logits else None  # [B, S, D]
    feats = jnp.transpose(hidden, (1, 2, 0, 3)).reshape(b, s, -1)

    blocks = anchor_blocks(target, batch, key, num_anchors, q, cfg.mask_token_id)
    ctx = drafter.project_context(feats.astype(blocks.x.dtype))
    h = drafter(blocks.x.astype(ctx.dtype), blocks.q_pos, ctx, pos, blocks.ctx_mask)  # [B, A, Q, D]
    # The LM head in the compute dtype (``target.dtype`` is the loaded one, fp32 under bf16 compute).
    h_head = h[:, :, 1:].astype(target.embed_tokens.dtype)  # [B, A, Q-1, D]: row k -> a+k
    return _score(h_head, target, blocks, t_final, batch, gamma=gamma, ce_weight=ce_weight,
                  kl_weight=kl_weight, target_labels=target_labels, chunk=loss_chunk)


class AnchorBlocks(NamedTuple):
    x: jax.Array  # [B, A, Q, D] embedded [anchor, MASK x] blocks (no gradient)
    q_pos: jax.Array  # [B, A, Q] their positions (within the anchor's document)
    ctx_mask: jax.Array  # [B, A, S] block j sees positions < a_j of its own document
    labels: jax.Array  # [B, A, Q-1] tokens at a+1 .. a+Q-1
    label_mask: jax.Array  # [B, A, Q-1]
    label_idx: jax.Array  # [B, A, Q-1] their positions in the row
    valid: jax.Array  # [B, A]


def anchor_blocks(target: Transformer, batch: dict[str, jax.Array], key: jax.Array, num_anchors: int,
                  block_size: int, mask_token_id: int) -> AnchorBlocks:
    """Samples anchors and builds their blocks, labels and prefix masks (shared by both methods)."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    b, q = tokens.shape[0], block_size
    anchors, valid = obj.sample_anchors(key, loss_mask, seg, num_anchors)  # [B, A]
    labels, label_mask, idx = obj.block_labels(tokens, loss_mask, seg, anchors, valid, q)
    a = anchors.shape[1]
    anchor_tok = jnp.take_along_axis(tokens, anchors, axis=1)
    block = jnp.concatenate([anchor_tok[..., None], jnp.full((b, a, q - 1), mask_token_id)], axis=-1)
    x = jax.lax.stop_gradient(target.embed(block.reshape(b, a * q))).reshape(b, a, q, -1)
    q_pos = jnp.take_along_axis(pos, anchors, axis=1)[..., None] + jnp.arange(q)  # [B, A, Q]
    ctx_mask = obj.anchor_context_mask(anchors, valid, seg)  # [B, A, S]
    return AnchorBlocks(x, q_pos, ctx_mask, labels, label_mask, idx, valid)


def _score(h_BAkD: jax.Array, target: Transformer, blocks: AnchorBlocks, t_final_BSD: jax.Array | None,
           batch: dict[str, jax.Array], **loss_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``score_blocks`` of the rows whose logits are ``h @ head``, in row chunks (``loss_head``)."""
    loss, metrics = loss_head.score_hidden(h_BAkD, target.head_weight(), blocks.labels, blocks.label_mask,
                                           blocks.label_idx, t_final_BSD, **loss_kw)
    metrics.update(tokens=(batch["loss_mask"] & (batch["segment_ids"] > 0)).sum(), blocks=blocks.valid.sum())
    return loss, metrics


def orthrus_forward(drafter: OrthrusDrafter, target: Transformer, batch: dict[str, jax.Array],
                    key: jax.Array, *, num_anchors: int, gamma: float, ce_weight: float, kl_weight: float,
                    target_labels: bool = False, target_metrics: bool = True,
                    loss_chunk: int = loss_head.DEFAULT_CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Orthrus loss of one packed batch (docs/design.md §6); ``target_metrics`` is accepted for the
    shared step signature (the AR pass that feeds the diffusion attentions yields the logits).

    One frozen AR pass over the clean sequence (into an empty S-slot cache, which hands back
    every layer's AR K/V), then one diffusion pass over all anchor blocks of every row: block j
    reads the AR K/V at positions < a_j of its document plus its own diffusion K/V. Row r of
    block j predicts the token at a_j + r + 1; its KL target is the AR distribution at
    a_j + r (the clean pass's logits there).
    """
    q = drafter.cfg.block_size
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    out = target(tokens, pos, kvc.init_cache(target.cfg, b, s, target.dtype), segment_ids=seg,
                 compute_logits=False, final_hidden=True)
    k_ar, v_ar = jax.lax.stop_gradient(out.cache.k), jax.lax.stop_gradient(out.cache.v)  # [L, B, S, K, H]
    t_final = jax.lax.stop_gradient(out.final)  # [B, S, D]
    blocks = anchor_blocks(target, batch, key, num_anchors, q, drafter.cfg.mask_token_id)
    h = drafter(target, blocks.x, blocks.q_pos, k_ar, v_ar, blocks.ctx_mask)  # [B, A, Q, D]
    h_head = target.norm(h[:, :, : q - 1])  # [B, A, Q-1, D]: row r -> token a+r+1
    return _score(h_head, target, blocks, t_final, batch, gamma=gamma, ce_weight=ce_weight,
                  kl_weight=kl_weight, target_labels=target_labels, chunk=loss_chunk)


def drafter_forward(drafter: nnx.Module, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
                    **step_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The method's loss: by the drafter's type (static under jit)."""
    forward = orthrus_forward if isinstance(drafter, OrthrusDrafter) else block_forward
    return forward(drafter, target, batch, key, **step_kw)


def mean_metrics(micro: list[dict[str, jax.Array]], names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The mean of ``names`` over the micro-batches of one optimizer step (``grad_accum`` of them),
    on device: what the step as a whole saw, not only its last micro-batch."""
    return {name: sum(m[name] for m in micro) / len(micro) for name in names}


def cast_module(module: nnx.Module, dtype: jnp.dtype) -> nnx.Module:
    """A compute-dtype copy; gradients flow back to the fp32 master weights through the cast."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


def make_step_fns(graphdef: Any, tgraph: Any, step_kw: dict[str, Any], compute: jnp.dtype, *,
                  mesh: Mesh | None = None, state_shardings: Any = None, tstate_shardings: Any = None):
    """Jitted ``train_step(state, tstate, batch, key)`` and ``eval_step(...)``.

    ``state`` is the (drafter, optimizer) state and is donated: it is replaced every step. The
    frozen target's ``tstate`` is an ordinary argument: never donated, never differentiated.
    On a ``mesh`` the steps take and give their states in ``state_shardings`` /
    ``tstate_shardings``, the batch split over ``data × fsdp``, and the activation constraints
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
