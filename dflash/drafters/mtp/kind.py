"""The MTP drafter kind: a target family's own multi-token-prediction head, loaded from the target's
checkpoint (``mtp.*``) or trained here for a target that ships none.

Its registry entry (``dflash.drafters.registry``): ``drafter:`` key ``num_layers`` (the head's
layers, default 1); ``block_size`` = 1 + the chained steps (training and decoding; default 4).
Training: the DeepSeek-V3 MTP objective with one shared layer chained ``k = block_size - 1``
deep: depth j reads depth j-1's output (depth 0: the frozen target's final-normed hidden) at
position i and the embedding of token i+j, causal over the whole row, and predicts token
i+j+1; CE per depth, weighted as the block drafters' rows (``objective.loss_weights``), scored at
sampled anchors (anchor a = i+1: the first token the head reads) by the shared loss head.
Shape letters: B rows, S sequence, A anchors, k steps, D width.
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
from dflash.drafters import blocks as blk
from dflash.drafters import loss_head
from dflash.drafters.mtp import hf
from dflash.drafters.mtp.draft import MTPDraft
from dflash.drafters.mtp.model import DEFAULT_BLOCK_SIZE, MTPConfig, MTPHead
from dflash.drafters.registry import DrafterKind, register
from dflash.errors import ConfigError
from dflash.flops import head_flops, target_forward_flops
from dflash.io.loading import read_config_json, resolve
from dflash.models import kinds
from dflash.models.transformer import Transformer


class MTPKind(DrafterKind):
    name = "mtp"
    label = "MTP"
    module = MTPHead
    architectures = (
        hf.ARCHITECTURE,
        "a target config.json with num_nextn_predict_layers / mtp_num_hidden_layers",
    )
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (1.0, 0.0)
    section_keys = frozenset({"num_layers"})
    compared_on_init_from = ("num_layers", "block_size")
    sharding = (
        (r"(^|\.)fc\.kernel$", ("embed", None)),  # [2D, D], as DFlash's context projection
        (r"(^|\.)pre_fc_norm_(embedding|hidden)\.weight$", (None,)),
    )

    def config(self, section: Any, target: ModelConfig, *, mask_token_id: int, block_size: int) -> MTPConfig:
        return MTPConfig.for_target(target, num_layers=section.num_layers, block_size=block_size)

    def construct(self, dcfg: MTPConfig, *, dtype: Any = jnp.float32, seed: int = 0) -> MTPHead:
        return MTPHead(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def build(
        self,
        dcfg: MTPConfig,
        target: Transformer,
        *,
        seed: int,
        mesh: Mesh | None = None,
        replicate_indivisible: bool = False,
    ) -> MTPHead:
        if mesh is None:
            return self.construct(dcfg, seed=seed)
        return sharding.init_sharded(
            lambda: self.construct(dcfg, seed=seed), mesh, replicate_indivisible=replicate_indivisible
        )

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.ARCHITECTURE in (hf_config.get("architectures") or []) or hf.declared_layers(hf_config) > 0

    loader = staticmethod(hf.load_head)

    def read_config(self, directory: Path) -> MTPConfig:
        return hf.config_from_hf(read_config_json(directory))

    def save(
        self,
        drafter: MTPHead,
        target: Transformer | None,
        target_cfg: ModelConfig,
        out: Path,
        *,
        target_name: str,
        dtype: Any = None,
        form: str = "delta",
        **prepared: Any,
    ) -> Path:
        """``delta``: an ``MTPDraftModel`` directory; ``full``: the target's checkpoint with the head as
        its own (``hf.save_in_target``), the layout vLLM serves for Qwen3-Next / Qwen3.5."""
        if form == "full":
            return hf.save_in_target(drafter, resolve(target_name), out, dtype=dtype)
        if form != "delta":
            raise ConfigError(f"an MTP head exports as form 'delta' or 'full', got {form!r}")
        return hf.save_head(drafter, out, target_name=target_name, target_cfg=target_cfg, dtype=dtype)

    def export_note(self, target_dir: Path, out: Path, form: str) -> str | None:
        model_type = read_config_json(target_dir).get("model_type")
        if form == "full":
            return (f"the target's checkpoint with this head as its mtp.* (files linked): vllm serve {out} "
                    "--speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": K}'; "
                    f"dflash: --target {out} --drafter mtp:{out}")
        if model_type in hf.VLLM_MTP_KEYS:
            return ("an MTPDraftModel directory, which dflash loads; vLLM reads an MTP head from the "
                    "target's checkpoint: --form full writes that")
        return (f"an MTPDraftModel directory, which dflash loads; vLLM has no MTP architecture for "
                f"{model_type!r} targets (only Qwen3-Next / Qwen3.5 checkpoints carry one it serves)")

    def method(
        self, drafter: MTPHead, *, stochastic: bool = False, block_size: int | None = None
    ) -> MTPDraft:
        return MTPDraft.of(drafter, stochastic=stochastic, block_size=block_size)

    def loss(
        self,
        drafter: MTPHead,
        target: Transformer,
        batch: dict[str, jax.Array],
        key: jax.Array,
        *,
        num_anchors: int,
        gamma: float,
        ce_weight: float,
        kl_weight: float,
        target_labels: bool = False,
        target_metrics: bool = True,
        loss_chunk: int = loss_head.DEFAULT_CHUNK,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Chained depths over the whole row (module docstring), scored at the sampled anchors."""
        k, n = drafter.cfg.block_size - 1, drafter.cfg.num_layers
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        out = target(tokens, pos, segment_ids=seg, compute_logits=False, final_hidden=True)
        t_final = jax.lax.stop_gradient(out.final)  # [B, S, D]: depth 0, and the target's logits
        emb = jax.lax.stop_gradient(target.embed(tokens))
        blocks = blk.anchor_blocks(target, batch, key, num_anchors, k + 1, mask_token_id=0)
        anchors = blocks.label_idx[:, :, 0] - 1  # [B, A]: the first token the head reads
        prev = jnp.maximum(anchors - 1, 0)  # where the chain sits (the target's hidden there)
        same_doc = jnp.take_along_axis(seg, prev, axis=1) == jnp.take_along_axis(seg, anchors, axis=1)
        blocks = blocks._replace(label_mask=blocks.label_mask & ((anchors >= 1) & same_doc)[..., None])
        hid, rows = t_final, []
        for j in range(1, k + 1):
            emb_j = jnp.pad(emb[:, j:], ((0, 0), (0, j), (0, 0)))  # token i+j at position i
            hid, _ = drafter(drafter.inputs(emb_j, hid), pos, None, layer=(j - 1) % n, segment_ids=seg)
            rows.append(jnp.take_along_axis(hid, prev[..., None], axis=1))  # [B, A, D]
        h_BAkD = jnp.stack(rows, axis=2).astype(target.embed_tokens.dtype)
        need_logits = target_metrics or kl_weight > 0 or target_labels
        return blk.score(
            h_BAkD,
            target,
            blocks,
            t_final if need_logits else None,
            batch,
            gamma=gamma,
            ce_weight=ce_weight,
            kl_weight=kl_weight,
            target_labels=target_labels,
            chunk=loss_chunk,
        )

    def flops(
        self,
        target: ModelConfig,
        dcfg: MTPConfig,
        *,
        batch: int,
        seq: int,
        anchors: int,
        block: int,
        target_logits: bool,
        remat: bool,
    ) -> dict[str, float]:
        """The full target pass, then ``block - 1`` depths each over every position (fc + layer),
        forward and backward; the loss head at the anchors' rows."""
        t = target_forward_flops(target, batch, seq)
        depth = (
            kinds.layer_flops(dcfg.layers, 0, batch * seq, seq / 2)
            + 2.0 * batch * seq * 2 * dcfg.hidden_size**2
        )
        draft = 3.0 * (block - 1) * depth
        head = head_flops(target, batch * anchors * (block - 1), target_logits)
        return {"target": t, "drafter": draft, "loss_head": head, "total": t + draft + head}


MTP = register(MTPKind())
