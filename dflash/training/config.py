"""Experiment configuration of drafter training: YAML files in ``configs/`` map onto these."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dflash.checks import BLOCK, COUNT, COUNT_OR_ZERO, FRACTION, INTEGER, NON_NEGATIVE, POSITIVE, Range, check
from dflash.config import ConfigError
from dflash.drafters import DrafterKind, drafter_kind
from dflash.sharding import MeshConfig
from dflash.training.data import DataConfig
from dflash.training.selfdistill import RegenSection

Dtype = Literal["float32", "bfloat16"]


def _check(section: str, kind: Range, **values: float | None) -> None:
    """Each of ``values`` (None: unset) is ``kind`` (dflash.checks, where every number is checked)."""
    for name, value in values.items():
        if value is not None:
            check(f"{section}.{name}", value, kind)


@dataclasses.dataclass(frozen=True)
class TargetSection:
    name: str = "tiny-code"  # HF directory, shipped name or hub id
    dtype: Dtype = "float32"


@dataclasses.dataclass(frozen=True)
class DrafterSection:
    """The ``drafter:`` section. Which keys a method reads is its kind's (``dflash.drafters``):
    every kind reads ``block_size``, ``mask_token_id`` and ``init_from``; DFlash also the others."""

    num_layers: int = 1  # DFlash: drafter layers
    block_size: int = 0  # 0 = the method's default (its kind's: DFlash 16, Orthrus 32)
    target_layer_ids: tuple[int, ...] = ()  # DFlash: () = spread evenly over 1..L-3
    num_target_features: int = 5  # DFlash: how many ids when target_layer_ids is ()
    layer_types: tuple[str, ...] = ()  # DFlash: full_attention / sliding_attention per layer; () = all full
    sliding_window: int = 0  # DFlash: the sliding layers' window (positions, the row's own included)
    rope_theta: float = 0.0  # DFlash: the drafter's RoPE base; 0 = the target's (its base / sliding layers')
    num_heads: int = 0  # DFlash: the drafter's own attention shape and MLP width; 0 = the target's
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    mask_token_id: int | None = None  # None = the tokenizer's mask token
    draft_vocab_size: int = 0  # EAGLE-3: the reduced draft vocabulary; 0 = the target's whole vocabulary
    ttt_steps: int = 7  # EAGLE-3: training-time-test steps (the drafter's own outputs fed back)
    init_from: str = ""  # an exported drafter directory to continue from

    def __post_init__(self) -> None:
        _check("drafter", BLOCK.with_special(0, "the method's default"), block_size=self.block_size)
        _check("drafter", COUNT, num_layers=self.num_layers, num_target_features=self.num_target_features)
        _check("drafter", COUNT_OR_ZERO, sliding_window=self.sliding_window, num_heads=self.num_heads,
               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
               intermediate_size=self.intermediate_size, draft_vocab_size=self.draft_vocab_size)
        _check("drafter", COUNT, ttt_steps=self.ttt_steps)
        _check("drafter", NON_NEGATIVE, rope_theta=self.rope_theta)
        if self.mask_token_id == -1:  # runs written before None meant "the tokenizer's" said -1
            object.__setattr__(self, "mask_token_id", None)
        _check("drafter", COUNT_OR_ZERO, mask_token_id=self.mask_token_id)  # None: the tokenizer's
        for i, layer in enumerate(self.target_layer_ids):
            check(f"drafter.target_layer_ids[{i}]", layer, COUNT_OR_ZERO)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    final_lr_ratio: float = 0.0  # cosine decays to lr * this
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    # Micro-batches per optimizer step: the step applies the mean of their gradients, each taken
    # from its own micro-batch's loss (normalised by that micro-batch's loss weights).
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _check("optim", POSITIVE, lr=self.lr, clip_norm=self.clip_norm)
        _check("optim", COUNT, grad_accum=self.grad_accum)
        _check("optim", FRACTION, warmup_ratio=self.warmup_ratio, b1=self.b1, b2=self.b2)
        _check("optim", NON_NEGATIVE, weight_decay=self.weight_decay, final_lr_ratio=self.final_lr_ratio)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    batch_size: int = 8  # packed rows per micro-batch (global, split over the data axis)
    num_anchors: int = 512  # blocks per row (capped by the row's candidate positions)
    epochs: float = 6.0
    steps: int = 0  # > 0: optimizer steps, overriding epochs
    gamma: float = 0.0  # loss decay; 0 = from the block size (7 for B = 16)
    # Unset (null) = the method's default for that weight: DFlash CE 1 / KL 0, Orthrus CE 0 / KL 1.
    ce_weight: float | None = None
    kl_weight: float | None = None  # forward KL to the target's distribution
    labels: Literal["data", "target"] = "data"  # CE on the data tokens or on the target's argmax
    compute_dtype: Dtype = "float32"  # bf16 compute keeps fp32 master weights
    # Loss head: rows of each sequence's drafted blocks whose [rows, V] logits exist at once
    # (dflash.drafters.loss_head); peak logits memory = local batch * loss_chunk * V (/ tensor).
    loss_chunk: int = 256
    remat: bool = False  # recompute each drafter layer in the backward (less activation memory)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 3
    num_devices: int = 0  # removed (the mesh: section places the run); only 0 is accepted, for old runs

    def __post_init__(self) -> None:
        _check("train", COUNT, batch_size=self.batch_size, num_anchors=self.num_anchors,
               log_every=self.log_every, eval_every=self.eval_every, save_every=self.save_every,
               keep_last=self.keep_last, loss_chunk=self.loss_chunk)
        _check("train", COUNT.with_special(0, "from train.epochs"), steps=self.steps)
        _check("train", NON_NEGATIVE, epochs=self.epochs, ce_weight=self.ce_weight, kl_weight=self.kl_weight)
        _check("train", POSITIVE.with_special(0, "from the block size"), gamma=self.gamma)
        _check("train", INTEGER, seed=self.seed)
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("train.steps or train.epochs must be positive")
        if self.num_devices != 0:
            raise ConfigError(f"train.num_devices={self.num_devices}: the device count is now set by the "
                              "mesh: section (mesh.data / mesh.fsdp / mesh.tensor, one of them -1 for the "
                              f"rest); e.g. mesh.data={self.num_devices} for {self.num_devices} "
                              "data-parallel devices")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    heldout_rows: int = 16  # packed held-out rows for the simulated acceptance length
    eval_split: str = ""  # take held-out documents from this split instead of data.heldout_fraction
    num_prompts: int = 8  # held-out prompts for the real tau at the end of the run
    max_new_tokens: int = 128
    prompt_tokens: int = 128  # prompts are cut to their last this-many tokens

    def __post_init__(self) -> None:
        _check("eval", COUNT, heldout_rows=self.heldout_rows, num_prompts=self.num_prompts,
               max_new_tokens=self.max_new_tokens, prompt_tokens=self.prompt_tokens)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    method: str = "dflash"  # a drafter kind (dflash.drafters.KINDS: dflash, orthrus, ...)
    run_dir: str = "runs/dflash"
    target: TargetSection = TargetSection()
    drafter: DrafterSection = DrafterSection()
    data: DataConfig = DataConfig()
    regen: RegenSection = RegenSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    mesh: MeshConfig = MeshConfig()  # data x fsdp x expert x tensor over all devices (docs/design.md §11)

    def __post_init__(self) -> None:
        self.kind.check_section(self.drafter)
        if self.loss_weights == (0.0, 0.0):
            raise ConfigError("train.ce_weight / train.kl_weight must be >= 0 and not both 0")

    def check_context(self, context: int) -> None:
        """Every position training, regeneration and evaluation use must lie inside the target's
        context (``max_position_embeddings``): past it the target's features are wrong."""
        ev, regen = self.eval, self.regen
        needs = {"data.seq_len": self.data.seq_len,
                 "eval.prompt_tokens + eval.max_new_tokens": ev.prompt_tokens + ev.max_new_tokens}
        if regen.num_sequences:
            needs["regen.prompt_tokens + regen.new_tokens"] = regen.prompt_tokens + regen.new_tokens
        over = [f"{key} = {n}" for key, n in needs.items() if n > context]
        if over:
            raise ConfigError(f"{'; '.join(over)}: past the target's context of {context} positions "
                              "(max_position_embeddings); lower them")

    @property
    def kind(self) -> DrafterKind:
        """The drafter kind ``method`` names (an unknown one is a ConfigError listing the known)."""
        return drafter_kind(self.method)

    @property
    def block_size(self) -> int:
        """The drafter's block size (the method's default when ``drafter.block_size`` is 0)."""
        return self.drafter.block_size or self.kind.default_block_size

    @property
    def loss_weights(self) -> tuple[float, float]:
        """(ce_weight, kl_weight); an unset weight takes the method's default."""
        ce, kl = self.kind.default_loss_weights
        t = self.train
        return (ce if t.ce_weight is None else t.ce_weight, kl if t.kl_weight is None else t.kl_weight)
