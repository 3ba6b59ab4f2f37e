"""The ``gemma4_assistant`` drafter kind: Google's MTP assistants for Gemma 4 targets, loaded and
drafted with, or trained here for a target that ships none and exported in the layout
``Gemma4AssistantForCausalLM.save_pretrained`` writes.

Its registry entry (``dflash.drafters.registry``): ``drafter:`` key ``num_layers`` (the assistant's
layers, at least 2: sliding ones, then a full one; each of the target's own spec); ``block_size`` =
1 + the chained steps (default 4). Fresh: the target's width, the pre / post projections random,
the tied LM head a copy of the target's embedding (the head the target itself starts from).
Training: ``dflash.drafters.gemma4_assistant.train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash import sharding
from dflash.config import ModelConfig
from dflash.drafters.gemma4_assistant import hf
from dflash.drafters.gemma4_assistant.draft import AssistantDraft
from dflash.drafters.gemma4_assistant.model import DEFAULT_BLOCK_SIZE, AssistantConfig, Gemma4Assistant
from dflash.drafters.gemma4_assistant.train import assistant_loss
from dflash.drafters.registry import DrafterKind, register
from dflash.flops import target_forward_flops
from dflash.io.loading import read_config_json
from dflash.models import kinds
from dflash.models.transformer import Transformer


class Gemma4AssistantKind(DrafterKind):
    name = "gemma4_assistant"
    label = "Gemma 4 assistant"
    module = Gemma4Assistant
    architectures = (hf.ARCHITECTURE,)
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (1.0, 0.0)
    section_keys = frozenset({"num_layers"})
    compared_on_init_from = ("num_layers", "block_size")
    vllm_method = "mtp"  # vLLM reads it as Gemma4MTPModel under its mtp method
    sharding = (
        (r"(^|\.)pre_projection\.kernel$", ("embed", None)),  # [2 D_target, D]
        (r"(^|\.)post_projection\.kernel$", (None, "embed")),  # [D, D_target]
        (r"(^|\.)centroids\.kernel$", ("embed", None)),
        (r"(^|\.)token_ordering$", (None,)),
    )

    def config(
        self, section: Any, target: ModelConfig, *, mask_token_id: int, block_size: int
    ) -> AssistantConfig:
        return AssistantConfig.for_target(target, num_layers=section.num_layers, block_size=block_size)

    def construct(self, dcfg: AssistantConfig, *, dtype: Any = jnp.float32, seed: int = 0) -> Gemma4Assistant:
        return Gemma4Assistant(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def build(
        self,
        dcfg: AssistantConfig,
        target: Transformer,
        *,
        seed: int,
        mesh: Mesh | None = None,
        replicate_indivisible: bool = False,
    ) -> Gemma4Assistant:
        dcfg.check_target(target.cfg)
        if mesh is None:
            drafter = self.construct(dcfg, seed=seed)
        else:
            drafter = sharding.init_sharded(
                lambda: self.construct(dcfg, seed=seed), mesh, replicate_indivisible=replicate_indivisible
            )
        if drafter.lm_head is None and dcfg.hidden_size == target.cfg.hidden_size:
            table = drafter.embed_tokens[...]
            drafter.embed_tokens[...] = target.embed_tokens[...].astype(table.dtype)  # same rule, same shards
        return drafter

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.claims(hf_config)

    loader = staticmethod(hf.load_assistant)

    def read_config(self, directory: Path) -> AssistantConfig:
        return AssistantConfig.from_hf(read_config_json(directory))

    def save(
        self,
        drafter: Gemma4Assistant,
        target: Transformer | None,
        target_cfg: ModelConfig,
        out: Path,
        *,
        target_name: str,
        dtype: Any = None,
        form: str = "delta",
        **prepared: Any,
    ) -> Path:
        drafter.cfg.check_target(target_cfg)
        return hf.save_assistant(drafter, out, dtype=dtype)

    def loss(
        self,
        drafter: Gemma4Assistant,
        target: Transformer,
        batch: dict[str, jax.Array],
        key: jax.Array,
        **step_kw: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return assistant_loss(drafter, target, batch, key, **step_kw)

    def flops(
        self,
        target: ModelConfig,
        dcfg: AssistantConfig,
        *,
        batch: int,
        seq: int,
        anchors: int,
        block: int,
        target_logits: bool,
        remat: bool,
    ) -> dict[str, float]:
        """The full target pass, then ``block - 1`` steps at the anchors (projections and layers over
        the keys before each anchor), forward and backward; the loss head at the anchors' rows (the
        assistant's head, and the target's own when its logits are asked for)."""
        t = target_forward_flops(target, batch, seq)
        rows = batch * anchors
        lc, d, db = dcfg.layers, dcfg.hidden_size, dcfg.backbone_hidden_size
        step = sum(kinds.layer_flops(lc, i, rows, seq / 2) for i in range(dcfg.num_layers))
        step += 2.0 * rows * (2 * db * d + d * db)
        draft = 3.0 * (block - 1) * step
        head = 3.0 * 2.0 * rows * (block - 1) * d * dcfg.vocab_size  # forward, input and weight gradients
        if target_logits:
            head += 2.0 * rows * (block - 1) * target.hidden_size * target.vocab_size
        return {"target": t, "drafter": draft, "loss_head": head, "total": t + draft + head}

    def method(
        self, drafter: Gemma4Assistant, *, stochastic: bool = False, block_size: int | None = None
    ) -> AssistantDraft:
        return AssistantDraft.of(drafter, stochastic=stochastic, block_size=block_size)


GEMMA4_ASSISTANT = register(Gemma4AssistantKind())
