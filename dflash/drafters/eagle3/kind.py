"""The EAGLE-3 drafter kind: one Llama layer fed by three target layers, a reduced draft vocabulary.

Its registry entry (``dflash.drafters.registry``): ``drafter:`` keys ``target_layer_ids`` (default
the outputs of layers 1, L//2-1, L-4), ``draft_vocab_size`` (0: the whole vocabulary), ``ttt_steps``
(7), ``num_layers`` (1, the only value) and the layer's own shape; block size 8 (7 chained drafts);
loss training-time test (``ttt.py``) against the frozen target; vocabulary map by token frequency
over the run's training data (``fit_data``); export ``LlamaForCausalLMEagle3`` (``hf.py``).

Shape letters (docs/architecture.md): B rows, S sequence, D width, V vocabulary, W draft vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dflash import sharding
from dflash.config import ModelConfig
from dflash.drafters.dflash.model import SHAPE_FIELDS
from dflash.drafters.eagle3 import hf
from dflash.drafters.eagle3.draft import Eagle3Draft
from dflash.drafters.eagle3.model import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK,
    Eagle3Config,
    Eagle3Drafter,
    vocab_map,
)
from dflash.drafters.eagle3.ttt import ttt_loss
from dflash.drafters.registry import DrafterKind, register
from dflash.flops import target_forward_flops
from dflash.io.loading import read_config_json
from dflash.models import kinds
from dflash.models.transformer import Transformer


def token_counts(rows: list[dict[str, np.ndarray]], vocab_size: int) -> np.ndarray:
    """``[V]`` how often each token is supervised (``loss_mask``, inside a document) in ``rows``."""
    counts = np.zeros(vocab_size, np.int64)
    for arrays in rows:
        keep = arrays["loss_mask"].astype(bool) & (arrays["segment_ids"] > 0)
        counts += np.bincount(arrays["tokens"][keep].reshape(-1), minlength=vocab_size)[:vocab_size]
    return counts


class Eagle3Kind(DrafterKind):
    name = "eagle3"
    label = "EAGLE-3"
    module = Eagle3Drafter
    architectures = (hf.ARCHITECTURE,)
    default_block_size = DEFAULT_BLOCK_SIZE
    default_loss_weights = (1.0, 0.0)  # unused: TTT has its own loss (the step weights are fixed)
    section_keys = frozenset({"num_layers", "target_layer_ids", "draft_vocab_size", "ttt_steps",
                              *SHAPE_FIELDS})
    compared_on_init_from = ("block_size", "target_layer_ids", "draft_vocab_size")
    vllm_method = "eagle3"
    sharding = ((r"(^|\.)fc\.kernel$", ("embed", None)),  # [n*D, D]
                (r"(^|\.)lm_head\.kernel$", ("embed", "vocab")),  # [D, W]
                (r"(^|\.)(d2t|t2d)$", (None,)))  # the vocabulary maps: whole on every chip

    def config(self, section: Any, target: ModelConfig, *, mask_token_id: int,
               block_size: int) -> Eagle3Config:
        return Eagle3Config.for_target(target, draft_vocab_size=section.draft_vocab_size,
                                       block_size=block_size,
                                       ttt_steps=section.ttt_steps,
                                       target_layer_ids=section.target_layer_ids or None,
                                       num_layers=section.num_layers,
                                       **{name: getattr(section, name) for name in SHAPE_FIELDS})

    def construct(self, dcfg: Eagle3Config, *, dtype: Any = jnp.float32, seed: int = 0) -> Eagle3Drafter:
        return Eagle3Drafter(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def build(self, dcfg: Eagle3Config, target: Transformer, *, seed: int, mesh: Mesh | None = None,
              replicate_indivisible: bool = False) -> Eagle3Drafter:
        """A fresh drafter whose embedding starts as the target's (as the published recipe)."""
        dcfg.check_target(target.cfg)
        if mesh is None:
            drafter = self.construct(dcfg, seed=seed)
        else:
            drafter = sharding.init_sharded(lambda: self.construct(dcfg, seed=seed), mesh,
                                            replicate_indivisible=replicate_indivisible)
        drafter.embed_tokens[...] = target.embed_tokens[...].astype(drafter.embed_tokens[...].dtype)
        return drafter

    def fit_data(self, drafter: Eagle3Drafter, rows: list[dict[str, np.ndarray]]) -> None:
        """The draft vocabulary: the most frequent supervised tokens of the training rows."""
        counts = token_counts(rows, drafter.cfg.vocab_size)
        if jax.process_count() > 1:  # every process holds other lanes: the map must be one
            from jax.experimental import multihost_utils
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        drafter.set_vocab_map(*vocab_map(counts, drafter.cfg.draft_vocab_size))

    def claims(self, hf_config: dict[str, Any]) -> bool:
        return hf.is_eagle3_config(hf_config)

    def read_config(self, directory: Path) -> Eagle3Config:
        return hf.config_from_hf(read_config_json(directory))

    def load(self, directory: Path, target: Transformer | None = None, *,
             target_cfg: ModelConfig | None = None,
             dtype: Any = jnp.float32, attention_impl: str = "auto", mesh: Mesh | None = None,
             replicate_indivisible: bool = False) -> Eagle3Drafter:
        """An export; one without ``embed_tokens`` takes ``target``'s embedding (vLLM's sharing)."""
        return hf.load_drafter(directory, target.cfg if target is not None else target_cfg, dtype=dtype,
                               attention_impl=attention_impl, mesh=mesh,
                               replicate_indivisible=replicate_indivisible,
                               target_embed_VD=target.embed_tokens[...] if target is not None else None)

    def save(self, drafter: Eagle3Drafter, target: Transformer | None, target_cfg: ModelConfig, out: Path, *,
             target_name: str, dtype: Any = None, form: str = "delta", **prepared: Any) -> Path:
        return hf.save_drafter(drafter, out, target_name=target_name, target_cfg=target_cfg, dtype=dtype)

    def method(self, drafter: Eagle3Drafter, *, stochastic: bool = False,
               block_size: int | None = None) -> Eagle3Draft:
        return Eagle3Draft.of(drafter, stochastic=stochastic, block_size=block_size)

    def needs_target_logits(self, step_kw: dict[str, Any]) -> bool:
        return True  # TTT's targets are the target's distributions

    def loss(self, drafter: Eagle3Drafter, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
             **step_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """TTT (``ttt.py``); the block-drafter settings of the shared step (anchors, gamma, CE/KL
        weights) do not apply; ``loss_chunk`` (``train.loss_chunk``) is TTT's rows per chunk."""
        return ttt_loss(drafter, target, batch, drafter.cfg.ttt_steps,
                        chunk=step_kw.get("loss_chunk", DEFAULT_CHUNK))

    def flops(self, target: ModelConfig, dcfg: Eagle3Config, *, batch: int, seq: int, anchors: int,
              block: int,
              target_logits: bool, remat: bool) -> dict[str, float]:
        """The whole target with its logits, then ``ttt_steps`` passes of the layer over every row
        (trained: forward + 2x backward; with ``remat`` one forward more), ``fc`` once, and the draft
        head at every step (its chunked logits are made again in the backward: 4x a forward)."""
        rows, steps = batch * seq, dcfg.ttt_steps
        d, lc = dcfg.hidden_size, dcfg.layers
        t = target_forward_flops(target, batch, seq, logits_rows=rows)
        qkv = 2.0 * rows * 2 * d * (lc.num_heads + 2 * lc.num_kv_heads) * lc.head_dim  # the 2·D inputs
        # layer_flops counts D-wide q/k/v projections; EAGLE-3's read 2·D (half of ``qkv`` more)
        layer = kinds.layer_flops(lc, 0, rows, seq / 2 + steps) + qkv / 2
        head = 2.0 * rows * d * dcfg.draft_vocab_size
        fc = 2.0 * rows * len(dcfg.target_layer_ids) * d * d
        draft = (3.0 + (1.0 if remat else 0.0)) * steps * layer + 3.0 * fc
        return {"target": t, "drafter": draft, "loss_head": 4.0 * steps * head,
                "total": t + draft + 4.0 * steps * head}


EAGLE3 = register(Eagle3Kind())
