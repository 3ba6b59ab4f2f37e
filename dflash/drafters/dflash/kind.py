"""The DFlash drafter kind: a small block-diffusion drafter fed with target hidden states.

Its registry entry (``dflash.drafters.registry``): ``drafter:`` keys ``num_layers``,
``target_layer_ids``, ``num_target_features``, ``layer_types`` / ``sliding_window`` (sliding
layers), ``rope_theta`` (0: the target's RoPE base) and ``num_heads`` / ``num_kv_heads`` /
``head_dim`` / ``intermediate_size`` (0: the target's); block size 16; loss CE on the data (KL optional);
export ``DFlashDraftModel``. The training forward is ``loss`` below (docs/design.md §5).

Shape letters (docs/architecture.md): B rows, S sequence, A anchors, Q block rows, D width, n features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash import sharding
from dflash.config import ModelConfig
from dflash.decoding.tree import BeamTreeDraft
from dflash.drafters import blocks as blk
from dflash.drafters import loss_head
from dflash.drafters.dflash import hf
from dflash.drafters.dflash.draft import DFlashDraft
from dflash.drafters.dflash.model import DEFAULT_BLOCK_SIZE, SHAPE_FIELDS, DFlashConfig, DFlashDrafter
from dflash.drafters.registry import SHIPPED, DrafterKind, register
from dflash.flops import head_flops, target_forward_flops
from dflash.io.loading import read_config_json, read_embedding
from dflash.models import kinds
from dflash.models.transformer import Transformer, embed_scale


class DFlashKind(DrafterKind):
    name = "dflash"
    label = "DFlash"
    module = DFlashDrafter
    architectures = (hf.ARCHITECTURE,)
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (1.0, 0.0)
    section_keys = frozenset({"num_layers", "target_layer_ids", "num_target_features", "layer_types",
                              "sliding_window", "rope_theta", *SHAPE_FIELDS})
    compared_on_init_from = ("num_layers", "block_size", "target_layer_ids", "mask_token_id", "layer_types",
                             "sliding_window", "rope_theta", *SHAPE_FIELDS)
    vllm_method = "dflash"
    sharding = ((r"(^|\.)fc\.kernel$", ("embed", None)),)  # the context projection [n*D, D]

    def config(self, section: Any, target: ModelConfig, *, mask_token_id: int,
               block_size: int) -> DFlashConfig:
        return DFlashConfig.for_target(target, mask_token_id=mask_token_id, num_layers=section.num_layers,
                                       block_size=block_size,
                                       target_layer_ids=section.target_layer_ids or None,
                                       num_target_features=section.num_target_features,
                                       layer_types=section.layer_types, sliding_window=section.sliding_window,
                                       rope_theta=section.rope_theta,
                                       **{name: getattr(section, name) for name in SHAPE_FIELDS})

    def construct(self, dcfg: DFlashConfig, *, dtype: Any = jnp.float32, seed: int = 0) -> DFlashDrafter:
        return DFlashDrafter(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def build(self, dcfg: DFlashConfig, target: Transformer, *, seed: int, mesh: Mesh | None = None,
              replicate_indivisible: bool = False) -> DFlashDrafter:
        if mesh is None:
            return self.construct(dcfg, seed=seed)
        return sharding.init_sharded(lambda: self.construct(dcfg, seed=seed), mesh,
                                     replicate_indivisible=replicate_indivisible)

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.ARCHITECTURE in (hf_config.get("architectures") or [])

    loader = staticmethod(hf.load_drafter)

    def read_config(self, directory: Path) -> DFlashConfig:
        return hf.config_from_hf(read_config_json(directory))

    def prepare_export(self, target: Transformer) -> dict[str, Any]:
        """A target that scales its embeddings: the scaled table the export ships for vLLM
        (``hf.scaled_embedding``)."""
        if not embed_scale(target.cfg):
            return {}
        return {"embed_tokens": hf.scaled_embedding(target.embed_tokens[...], target.cfg)}

    def save(self, drafter: DFlashDrafter, target: Transformer | None, target_cfg: ModelConfig, out: Path, *,
             target_name: str, dtype: Any = None, form: str = "delta", **prepared: Any) -> Path:
        table = prepared.get("embed_tokens")
        if table is None and embed_scale(target_cfg):  # dflash-export: the checkpoint's table alone
            table = hf.scaled_embedding(target.embed_tokens[...] if target is not None
                                        else read_embedding(target_name), target_cfg)
        return hf.save_drafter(drafter, out, target_name=target_name, target_cfg=target_cfg, dtype=dtype,
                               embed_tokens=table)

    def method(self, drafter: DFlashDrafter, *, stochastic: bool = False,
               block_size: int | None = None) -> DFlashDraft:
        return DFlashDraft.of(drafter, stochastic=stochastic, block_size=block_size)

    def eval_methods(self, drafter: DFlashDrafter) -> dict[str, Any]:
        """Prompt lookup as one more tree branch (``tau_with_ngram``)."""
        return {"with_ngram": BeamTreeDraft.around(self.method(drafter), 1, lookup=True)}

    def loss(self, drafter: DFlashDrafter, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
             *,
             num_anchors: int, gamma: float, ce_weight: float, kl_weight: float, target_labels: bool = False,
             target_metrics: bool = True, loss_chunk: int = loss_head.DEFAULT_CHUNK,
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
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

        blocks = blk.anchor_blocks(target, batch, key, num_anchors, q, cfg.mask_token_id)
        ctx = drafter.project_context(feats.astype(blocks.x.dtype))
        h = drafter(blocks.x.astype(ctx.dtype), blocks.q_pos, ctx, pos, blocks.ctx_mask)  # [B, A, Q, D]
        # The LM head in the compute dtype (``target.dtype`` is the loaded one, fp32 under bf16 compute).
        h_head = h[:, :, 1:].astype(target.embed_tokens.dtype)  # [B, A, Q-1, D]: row k -> a+k
        return blk.score(h_head, target, blocks, t_final, batch, gamma=gamma, ce_weight=ce_weight,
                         kl_weight=kl_weight, target_labels=target_labels, chunk=loss_chunk)

    def anchor_logits(self, drafter: DFlashDrafter, target: Transformer, seq_1S: jax.Array,
                      anchors_A: jax.Array,
                      block: int) -> jax.Array:
        s = seq_1S.shape[1]
        pos = jnp.arange(s)[None]
        out = target(seq_1S, pos, hidden_layers=drafter.cfg.target_layer_ids, compute_logits=False)  # causal
        feats = jnp.transpose(out.hidden, (1, 2, 0, 3)).reshape(1, s, -1)  # [1, S, n*D]
        x, q_pos, ctx_mask = blk.blocks_at(target, seq_1S, anchors_A, block, drafter.cfg.mask_token_id)
        h = drafter(x, q_pos, drafter.project_context(feats), pos, ctx_mask)  # [1, A, Q, D]
        return target.unembed(h[0, :, 1:])  # row k -> the token at a + k

    def flops(self, target: ModelConfig, dcfg: DFlashConfig, *, batch: int, seq: int, anchors: int,
              block: int,
              target_logits: bool, remat: bool) -> dict[str, float]:
        """The target runs up to its deepest feature layer unless its logits are needed (KL or
        target labels); the drafter's layers see ``A*Q`` block rows per sequence against the whole
        context (the training attention is dense over ``S``), plus the context's K/V projection."""
        d = target.hidden_size
        rows = batch * anchors * block  # drafted block rows
        layers = None if target_logits else max(dcfg.target_layer_ids) + 1
        t = target_forward_flops(target, batch, seq, layers=layers)
        lc = dcfg.layers
        kv = lc.num_kv_heads * lc.head_dim
        per_layer = sum(kinds.layer_flops(lc, i, rows, seq + block) for i in range(lc.num_layers))
        per_layer += lc.num_layers * 2.0 * batch * seq * 2 * d * kv  # context K/V projection
        fc = 2.0 * batch * seq * len(dcfg.target_layer_ids) * d * d
        draft = (3.0 + (1.0 if remat else 0.0)) * per_layer + 3.0 * fc
        head = head_flops(target, batch * anchors * (block - 1), target_logits)
        return {"target": t, "drafter": draft, "loss_head": head, "total": t + draft + head}


DFLASH = register(DFlashKind())
SHIPPED.update(hf.SHIPPED_DRAFTERS)
