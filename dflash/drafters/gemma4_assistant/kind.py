"""The ``gemma4_assistant`` drafter kind: Google's published MTP assistants for Gemma 4 targets, loaded
and drafted with (training and exporting one here is not built: the kind refuses them in one line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash import sharding
from dflash.config import ModelConfig
from dflash.drafters.gemma4_assistant import hf
from dflash.drafters.gemma4_assistant.draft import AssistantDraft
from dflash.drafters.gemma4_assistant.model import DEFAULT_BLOCK_SIZE, AssistantConfig, Gemma4Assistant
from dflash.drafters.registry import DrafterKind, register
from dflash.errors import ConfigError
from dflash.io.loading import read_config_json
from dflash.models.transformer import Transformer


def _not_built(what: str) -> NoReturn:
    raise ConfigError(
        f"{what} a Gemma 4 assistant is not supported here: load a published one "
        "(Gemma4AssistantForCausalLM) with --drafter DIR"
    )


class Gemma4AssistantKind(DrafterKind):
    name = "gemma4_assistant"
    label = "Gemma 4 assistant"
    module = Gemma4Assistant
    architectures = (hf.ARCHITECTURE,)
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (1.0, 0.0)
    sharding = (
        (r"(^|\.)pre_projection\.kernel$", ("embed", None)),  # [2 D_target, D]
        (r"(^|\.)post_projection\.kernel$", (None, "embed")),  # [D, D_target]
        (r"(^|\.)centroids\.kernel$", ("embed", None)),
        (r"(^|\.)token_ordering$", (None,)),
    )

    def config(
        self, section: Any, target: ModelConfig, *, mask_token_id: int, block_size: int
    ) -> AssistantConfig:
        _not_built("training")

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
        if mesh is None:
            return self.construct(dcfg, seed=seed)
        return sharding.init_sharded(
            lambda: self.construct(dcfg, seed=seed), mesh, replicate_indivisible=replicate_indivisible
        )

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.claims(hf_config)

    def read_config(self, directory: Path) -> AssistantConfig:
        return AssistantConfig.from_hf(read_config_json(directory))

    def load(
        self,
        directory: Path,
        target: Transformer | None = None,
        *,
        target_cfg: ModelConfig | None = None,
        dtype: Any = jnp.float32,
        attention_impl: str = "auto",
        mesh: Mesh | None = None,
        replicate_indivisible: bool = False,
    ) -> Gemma4Assistant:
        return hf.load_assistant(
            directory,
            target.cfg if target is not None else target_cfg,
            dtype=dtype,
            attention_impl=attention_impl,
            mesh=mesh,
            replicate_indivisible=replicate_indivisible,
        )

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
        _not_built("exporting")

    def loss(
        self,
        drafter: Gemma4Assistant,
        target: Transformer,
        batch: dict[str, jax.Array],
        key: jax.Array,
        **step_kw: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        _not_built("training")

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
        _not_built("training")

    def method(
        self, drafter: Gemma4Assistant, *, stochastic: bool = False, block_size: int | None = None
    ) -> AssistantDraft:
        return AssistantDraft.of(drafter, stochastic=stochastic, block_size=block_size)


GEMMA4_ASSISTANT = register(Gemma4AssistantKind())
