"""The Orthrus drafter kind: diffusion attentions injected into the frozen target.

Its registry entry (``dflash.drafters.registry``): no ``drafter:`` keys of its own (one diffusion
attention per target layer, warm-started from the AR attention); block size 32; loss forward KL
to the frozen AR distribution; exports ``OrthrusForCausalLM`` (full) / ``OrthrusDeltaModel``
(delta), which record a fingerprint of the target's weights. The training forward is ``loss``
below (docs/design.md §6).

Shape letters (docs/architecture.md): B rows, S sequence, A anchors, Q block rows, D width, L layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ModelConfig
from dflash.drafters import blocks as blk
from dflash.drafters import loss_head
from dflash.drafters.orthrus import hf
from dflash.drafters.orthrus.draft import OrthrusDraft
from dflash.drafters.orthrus.model import DEFAULT_BLOCK_SIZE, OrthrusConfig, OrthrusDrafter
from dflash.drafters.registry import SHIPPED, DrafterKind, register
from dflash.flops import head_flops, target_forward_flops
from dflash.models import kinds
from dflash.models.cache import KVState
from dflash.models.transformer import Transformer


class OrthrusKind(DrafterKind):
    name = "orthrus"
    label = "Orthrus"
    module = OrthrusDrafter
    architectures = hf.ARCHITECTURES
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (0.0, 1.0)
    needs_target_weights = True

    def config(self, section: Any, target: ModelConfig, *, mask_token_id: int,
               block_size: int) -> OrthrusConfig:
        return OrthrusConfig.for_target(target, mask_token_id=mask_token_id, block_size=block_size)

    def build(self, dcfg: OrthrusConfig, target: Transformer, *, seed: int, mesh: Mesh | None = None,
              replicate_indivisible: bool = False) -> OrthrusDrafter:
        return OrthrusDrafter.from_target(target, dcfg)  # copies keep the target's (same-rule) shards

    def construct(self, dcfg: OrthrusConfig, *, dtype: Any = jnp.float32, seed: int = 0) -> OrthrusDrafter:
        return OrthrusDrafter(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def param_dtype(self, target_dtype: Any) -> Any:
        return target_dtype  # copies of the target's attentions, in its dtype (``from_target``)

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.is_orthrus_config(hf_config)

    def read_config(self, directory: Path) -> OrthrusConfig:
        return hf.read_orthrus_config(directory)[0]

    def load(self, directory: Path, target: Transformer | None = None, *,
             target_cfg: ModelConfig | None = None,
             dtype: Any = jnp.float32, attention_impl: str = "auto", mesh: Mesh | None = None,
             replicate_indivisible: bool = False) -> OrthrusDrafter:
        return hf.load_orthrus(directory, target, target_cfg=target_cfg, dtype=dtype,
                               attention_impl=attention_impl,
                               mesh=mesh, replicate_indivisible=replicate_indivisible)

    def prepare_export(self, target: Transformer) -> dict[str, Any]:
        return {"weights_fingerprint": hf.target_weights_fingerprint(target)}

    def save(self, drafter: OrthrusDrafter, target: Transformer | None, target_cfg: ModelConfig, out: Path, *,
             target_name: str, dtype: Any = None, form: str = "delta", **prepared: Any) -> Path:
        return hf.save_orthrus(drafter, target, out, form=form, target_name=target_name, dtype=dtype,
                               **prepared)

    def method(self, drafter: OrthrusDrafter, *, stochastic: bool = False,
               block_size: int | None = None) -> OrthrusDraft:
        return OrthrusDraft.of(drafter, stochastic=stochastic, block_size=block_size)

    def needs_target_logits(self, step_kw: dict[str, Any]) -> bool:
        return True  # the AR pass that feeds the diffusion attentions yields them anyway

    def loss(self, drafter: OrthrusDrafter, target: Transformer, batch: dict[str, jax.Array],
             key: jax.Array, *,
             num_anchors: int, gamma: float, ce_weight: float, kl_weight: float, target_labels: bool = False,
             target_metrics: bool = True, loss_chunk: int = loss_head.DEFAULT_CHUNK,
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Orthrus loss of one packed batch; ``target_metrics`` is accepted for the shared step
        signature (the AR pass that feeds the diffusion attentions yields the logits).

        One frozen AR pass over the clean sequence (``stack_kv``: it hands back every layer's AR
        K/V), then one diffusion pass over all anchor blocks of every row: block j
        reads the AR K/V at positions < a_j of its document plus its own diffusion K/V. Row r of
        block j predicts the token at a_j + r + 1; its KL target is the AR distribution at
        a_j + r (the clean pass's logits there).
        """
        q = drafter.cfg.block_size
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        out = target(tokens, pos, segment_ids=seg, compute_logits=False, final_hidden=True, stack_kv=True)
        k_L, v_L = jax.lax.stop_gradient(out.kv)  # [L, B, S, K, H]: every layer's AR K/V
        prefix = [KVState(k=k_L[i], v=v_L[i]) for i in range(k_L.shape[0])]
        t_final = jax.lax.stop_gradient(out.final)  # [B, S, D]
        blocks = blk.anchor_blocks(target, batch, key, num_anchors, q, drafter.cfg.mask_token_id)
        h = drafter(target, blocks.x, blocks.q_pos, prefix, blocks.ctx_mask)  # [B, A, Q, D]
        h_head = target.norm(h[:, :, : q - 1])  # [B, A, Q-1, D]: row r -> token a+r+1
        return blk.score(h_head, target, blocks, t_final, batch, gamma=gamma, ce_weight=ce_weight,
                         kl_weight=kl_weight, target_labels=target_labels, chunk=loss_chunk)

    def anchor_logits(self, drafter: OrthrusDrafter, target: Transformer, seq_1S: jax.Array,
                      anchors_A: jax.Array,
                      block: int) -> jax.Array:
        s = seq_1S.shape[1]
        out = target(seq_1S, jnp.arange(s)[None], target.init_cache(1, s), compute_logits=False)  # the AR K/V
        x, q_pos, ctx_mask = blk.blocks_at(target, seq_1S, anchors_A, block, drafter.cfg.mask_token_id)
        h = drafter(target, x, q_pos, out.cache.layers, ctx_mask)  # [1, A, Q, D]
        return target.logits(h[0, :, : block - 1])  # row r -> the token at a + r + 1

    def flops(self, target: ModelConfig, dcfg: OrthrusConfig, *, batch: int, seq: int, anchors: int,
              block: int,
              target_logits: bool, remat: bool) -> dict[str, float]:
        """The whole target, then one diffusion attention per layer on the block rows (trained:
        forward + 2x backward) and the target's frozen MLPs on them (forward + the input gradient)."""
        rows = batch * anchors * block
        redo = 1.0 if remat else 0.0
        t = target_forward_flops(target, batch, seq)
        draft = 0.0
        for spec in target.layers:
            attn = kinds.mixer_kind(spec).flops(target, spec, rows, seq + block)
            mlp = kinds.mlp_kind(spec).flops(target, spec, rows)
            draft += (3.0 + redo) * attn + (2.0 + redo) * mlp
        head = head_flops(target, batch * anchors * (block - 1), target_logits)
        return {"target": t, "drafter": draft, "loss_head": head, "total": t + draft + head}


ORTHRUS = register(OrthrusKind())
SHIPPED.update(hf.SHIPPED_ORTHRUS)
