"""Drafter training against a frozen target: Optax, Orbax, TensorBoard, a data mesh.

Two methods share the machinery (``method:`` in the config): **DFlash** (a small separate
drafter fed with target features) and **Orthrus** (diffusion attentions inside every frozen
target layer; only they are trained). The train step runs the frozen target inside the
jitted step (online features / AR K/V, no gradient into it, its params never donated),
samples anchors, drafts every block of every row in one blockwise pass, and applies the
decayed loss (objective.score_blocks). The batch is sharded over a ``data`` mesh axis
with parameters replicated, so the same config runs on 1 device or many with the same loss.

Resume is exact: the data stream and the anchor RNG are pure functions of (seed, step), and
the checkpoint holds the drafter, the optimizer state and the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from dflash import cache as kvc
from dflash.configio import flatten, from_dict, to_dict
from dflash.decoding.drafters import NgramDraft, method_for
from dflash.decoding.speculative import speculative_generate
from dflash.decoding.tree import DFlashTreeDraft
from dflash.drafters.dflash import DFlashConfig, DFlashDrafter, build_drafter, default_gamma
from dflash.drafters.orthrus import OrthrusConfig, OrthrusDrafter
from dflash.export import load_drafter, save_drafter
from dflash.export.dflash_hf import target_fingerprint
from dflash.export.orthrus_hf import load_orthrus, save_orthrus
from dflash.models import load_target
from dflash.models.tokenizer import load_tokenizer
from dflash.models.transformer import Transformer
from dflash.training import objective as obj
from dflash.training.config import ExperimentConfig
from dflash.training.data import Batches, DataConfig, Document, PackedRows, load_documents, pack
from dflash.training.selfdistill import load_documents_npz, regenerate_documents, save_documents

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
    """The run cannot proceed (e.g. an unreadable checkpoint); nothing was overwritten."""


# ----------------------------------------------------------------------------- the step
def block_forward(drafter: DFlashDrafter, target: Transformer, batch: dict[str, jax.Array],
                  key: jax.Array, *, num_anchors: int, gamma: float, ce_weight: float,
                  kl_weight: float, target_labels: bool = False,
                  target_metrics: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one packed batch (tokens / loss_mask / segment_ids / positions [B, S]).

    ``target_metrics=False`` (train steps): when the loss needs no target logits (CE on the data,
    no KL), the target stops at its deepest feature layer (XLA drops the layers above it and the
    LM head: 9% of a main-job step) and the simulated tau compares with the labels, which on
    target-regenerated data are the target's greedy tokens. Eval always compares with the target.
    """
    cfg = drafter.cfg
    k = cfg.block_size
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    need_logits = target_metrics or kl_weight > 0 or target_labels
    # Frozen target over the clean sequence: causal within each packed document.
    doc_mask_BSS = jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    out = target(tokens, pos, block_mask=doc_mask_BSS, hidden_layers=cfg.target_layer_ids,
                 compute_logits=need_logits)
    hidden = jax.lax.stop_gradient(out.hidden)  # [n, B, S, D]
    t_logits = jax.lax.stop_gradient(out.logits) if need_logits else None  # [B, S, V]
    feats = jnp.transpose(hidden, (1, 2, 0, 3)).reshape(b, s, -1)

    blocks = _anchor_blocks(target, batch, key, num_anchors, k, cfg.mask_token_id)
    ctx = drafter.project_context(feats.astype(blocks.x.dtype))
    h = drafter(blocks.x.astype(ctx.dtype), blocks.q_pos, ctx, pos, blocks.ctx_mask)  # [B, A, K, D]
    # The LM head in the compute dtype (``target.dtype`` is the loaded one, fp32 under bf16 compute).
    logits = target.unembed(h[:, :, 1:].astype(target.embed_tokens.dtype))  # [B, A, K-1, V]: row k -> a+k
    return _score(logits, blocks, t_logits, batch, gamma=gamma, ce_weight=ce_weight, kl_weight=kl_weight,
                  target_labels=target_labels)


class _Blocks(NamedTuple):
    x: jax.Array  # [B, A, K, D] embedded [anchor, MASK x (K-1)] blocks (no gradient)
    q_pos: jax.Array  # [B, A, K] their positions (within the anchor's document)
    ctx_mask: jax.Array  # [B, A, S] block j sees positions < a_j of its own document
    labels: jax.Array  # [B, A, K-1] tokens at a+1 .. a+K-1
    label_mask: jax.Array  # [B, A, K-1]
    label_idx: jax.Array  # [B, A, K-1] their positions in the row
    valid: jax.Array  # [B, A]


def _anchor_blocks(target: Transformer, batch: dict[str, jax.Array], key: jax.Array, num_anchors: int,
                   k: int, mask_token_id: int) -> _Blocks:
    """Samples anchors and builds their blocks, labels and prefix masks (shared by both methods)."""
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    b = tokens.shape[0]
    anchors, valid = obj.sample_anchors(key, loss_mask, seg, num_anchors)  # [B, A]
    labels, label_mask, idx = obj.block_labels(tokens, loss_mask, seg, anchors, valid, k)
    a = anchors.shape[1]
    anchor_tok = jnp.take_along_axis(tokens, anchors, axis=1)
    block = jnp.concatenate([anchor_tok[..., None], jnp.full((b, a, k - 1), mask_token_id)], axis=-1)
    x = jax.lax.stop_gradient(target.embed(block.reshape(b, a * k))).reshape(b, a, k, -1)
    q_pos = jnp.take_along_axis(pos, anchors, axis=1)[..., None] + jnp.arange(k)  # [B, A, K]
    ctx_mask = obj.anchor_context_mask(anchors, valid, seg)  # [B, A, S]
    return _Blocks(x, q_pos, ctx_mask, labels, label_mask, idx, valid)


def _score(logits: jax.Array, blocks: _Blocks, t_logits: jax.Array, batch: dict[str, jax.Array],
           **loss_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss, metrics = obj.score_blocks(logits, blocks.labels, blocks.label_mask, blocks.label_idx, t_logits,
                                     **loss_kw)
    metrics.update(tokens=(batch["loss_mask"] & (batch["segment_ids"] > 0)).sum(), blocks=blocks.valid.sum())
    return loss, metrics


def orthrus_forward(drafter: OrthrusDrafter, target: Transformer, batch: dict[str, jax.Array],
                    key: jax.Array, *, num_anchors: int, gamma: float, ce_weight: float, kl_weight: float,
                    target_labels: bool = False,
                    target_metrics: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Orthrus loss of one packed batch (docs/design.md §6); ``target_metrics`` is accepted for the
    shared step signature (the AR pass that feeds the diffusion attentions yields the logits).

    One frozen AR pass over the clean sequence (into an empty S-slot cache, which hands back
    every layer's AR K/V), then one diffusion pass over all anchor blocks of every row: block j
    reads the AR K/V at positions < a_j of its document plus its own diffusion K/V. Row r of
    block j predicts the token at a_j + r + 1; its KL target is the AR distribution at
    a_j + r (the clean pass's logits there).
    """
    k = drafter.cfg.block_size
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, s = tokens.shape
    doc_mask_BSS = jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    out = target(tokens, pos, kvc.init_cache(target.cfg, b, s, target.dtype), block_mask=doc_mask_BSS)
    k_ar, v_ar = jax.lax.stop_gradient(out.cache.k), jax.lax.stop_gradient(out.cache.v)  # [L, B, S, K, H]
    t_logits = jax.lax.stop_gradient(out.logits)  # [B, S, V]
    blocks = _anchor_blocks(target, batch, key, num_anchors, k, drafter.cfg.mask_token_id)
    h = drafter(target, blocks.x, blocks.q_pos, k_ar, v_ar, blocks.ctx_mask)  # [B, A, K, D]
    logits = target.logits(h[:, :, : k - 1])  # [B, A, K-1, V]: row r -> token a+r+1
    return _score(logits, blocks, t_logits, batch, gamma=gamma, ce_weight=ce_weight, kl_weight=kl_weight,
                  target_labels=target_labels)


def drafter_forward(drafter: nnx.Module, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
                    **step_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The method's loss: by the drafter's type (static under jit)."""
    forward = orthrus_forward if isinstance(drafter, OrthrusDrafter) else block_forward
    return forward(drafter, target, batch, key, **step_kw)


def _cast(module: nnx.Module, dtype: jnp.dtype) -> nnx.Module:
    """A compute-dtype copy; gradients flow back to the fp32 master weights through the cast."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


def make_step_fns(graphdef: Any, tgraph: Any, step_kw: dict[str, Any], compute: jnp.dtype):
    """Jitted ``train_step(state, tstate, batch, key)`` and ``eval_step(...)``.

    ``state`` is the (drafter, optimizer) state and is donated: it is replaced every step. The
    frozen target's ``tstate`` is an ordinary argument: never donated, never differentiated.
    """

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, tstate, batch, key):
        drafter, optimizer = nnx.merge(graphdef, state)
        target = nnx.merge(tgraph, tstate)

        def loss_fn(drafter):
            d = _cast(drafter, compute) if compute != jnp.float32 else drafter
            t = _cast(target, compute) if compute != target.dtype else target
            return drafter_forward(d, t, batch, key, **step_kw, target_metrics=False)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(drafter)
        metrics["grad_norm"] = optax.tree.norm(grads)
        optimizer.update(drafter, grads)
        return nnx.state((drafter, optimizer)), metrics

    @jax.jit
    def eval_step(state, tstate, batch, key):
        drafter, _ = nnx.merge(graphdef, state)
        return drafter_forward(drafter, nnx.merge(tgraph, tstate), batch, key, **step_kw)[1]

    return train_step, eval_step


# ----------------------------------------------------------------------------- setup helpers
@dataclasses.dataclass
class RunData:
    train: PackedRows
    heldout: PackedRows
    prompts: list[list[int]]


def _prompts_from_docs(docs: list[Document], count: int, prompt_tokens: int) -> list[list[int]]:
    """Held-out prompts: the unsupervised prefix (conversations) or a document's start (text)."""
    out = []
    for d in docs:
        sup = np.flatnonzero(d.loss_mask)
        cut = int(sup[0]) if len(sup) and sup[0] > 0 else min(len(d.ids) // 2, prompt_tokens)
        if cut > 0:
            out.append(d.ids[:cut][-prompt_tokens:].tolist())
        if len(out) == count:
            break
    return out


def prepare_data(cfg: ExperimentConfig, tokenizer: Any, target: Transformer, run_dir: Path,
                 progress: bool = True) -> RunData:
    train_docs, held_docs = load_documents(cfg.data, tokenizer)
    if cfg.eval.eval_split:
        eval_cfg = DataConfig(**{**to_dict(cfg.data), "split": cfg.eval.eval_split, "heldout_fraction": 0.0,
                                 "max_examples": 0})
        held_docs, _ = load_documents(eval_cfg, tokenizer)
    if cfg.regen.num_sequences:
        # Train and eval rows alike become (corpus prompt, target's greedy continuation), which
        # is what the drafter sees when decoding. Made once per run and stored, so a resumed
        # run uses the very same data.
        eos = tuple(target.cfg.eos_token_id)
        cached = run_dir / "regenerated.npz"
        cached_eval = run_dir / "regenerated_eval.npz"
        made_with = run_dir / "regenerated.json"  # the settings the stored data was made with
        settings = _regen_settings(cfg, target)  # plain JSON values (to_dict turns tuples into lists)
        if (cached.exists() and cached_eval.exists() and made_with.exists()
                and json.loads(made_with.read_text()) == settings):
            train_docs, held_docs = load_documents_npz(cached), load_documents_npz(cached_eval)
        else:  # none yet, or made with other settings: regeneration is deterministic, so remake it
            train_docs = regenerate_documents(target, train_docs, cfg.regen, seed=cfg.data.seed, eos_ids=eos,
                                              progress=progress)
            eval_regen = dataclasses.replace(cfg.regen, num_sequences=cfg.eval.heldout_rows * 2)
            held_docs = regenerate_documents(target, held_docs, eval_regen, seed=cfg.data.seed + 1,
                                             eos_ids=eos, progress=progress)
            save_documents(train_docs, cached)
            save_documents(held_docs, cached_eval)
            made_with.write_text(json.dumps(settings, indent=1))
    if not train_docs:
        raise TrainingError(f"data source {cfg.data.source!r} yielded no training documents")
    if not held_docs:
        raise TrainingError("no held-out documents: raise data.heldout_fraction or set eval.eval_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = pack(train_docs, cfg.data.seq_len, pad)
    held_rows = pack(held_docs, cfg.data.seq_len, pad)
    if cfg.data.source == "tiny-code":
        from dflash.training.tiny_corpus import heldout_prompts

        texts = heldout_prompts(cfg.eval.num_prompts)
        prompts = [tokenizer(t, add_special_tokens=False).input_ids[-cfg.eval.prompt_tokens:] for t in texts]
    else:
        prompts = _prompts_from_docs(held_docs, cfg.eval.num_prompts, cfg.eval.prompt_tokens)
    return RunData(train_rows, held_rows, prompts)


def _regen_settings(cfg: ExperimentConfig, target: Transformer) -> dict[str, Any]:
    """Everything the regenerated documents depend on: data, regen and eval sections, the target."""
    return {"data": to_dict(cfg.data), "regen": to_dict(cfg.regen), "eval_split": cfg.eval.eval_split,
            "heldout_rows": cfg.eval.heldout_rows, "target": cfg.target.name,
            "target_dtype": cfg.target.dtype, "target_fingerprint": target_fingerprint(target.cfg)}


def build_drafter_config(cfg: ExperimentConfig, target: Transformer,
                         tokenizer: Any) -> DFlashConfig | OrthrusConfig:
    mask = cfg.drafter.mask_token_id
    if mask < 0:
        mask = tokenizer.mask_token_id
        if mask is None:
            raise TrainingError("the tokenizer has no mask token: set drafter.mask_token_id")
    if cfg.method == "orthrus":
        return OrthrusConfig.for_target(target.cfg, mask_token_id=mask, block_size=cfg.block_size)
    return DFlashConfig.for_target(
        target.cfg, mask_token_id=mask, num_layers=cfg.drafter.num_layers, block_size=cfg.block_size,
        target_layer_ids=cfg.drafter.target_layer_ids or None,
        num_target_features=cfg.drafter.num_target_features)


def build_method_drafter(cfg: ExperimentConfig, dcfg: DFlashConfig | OrthrusConfig,
                         target: Transformer) -> DFlashDrafter | OrthrusDrafter:
    """The drafter a run starts from: ``drafter.init_from``, else a fresh one (Orthrus: warm start).

    An Orthrus drafter starts as copies of the target's AR attentions; it holds only those
    (the target itself is never copied).
    """
    if cfg.method == "orthrus":
        if cfg.drafter.init_from:
            return load_orthrus(cfg.drafter.init_from, target, dtype=jnp.float32)
        return OrthrusDrafter.from_target(target, dcfg)
    if cfg.drafter.init_from:
        return load_drafter(cfg.drafter.init_from, target.cfg)
    return build_drafter(dcfg, seed=cfg.train.seed)


def _check_init_from(cfg: ExperimentConfig, wanted: DFlashConfig | OrthrusConfig,
                     loaded: DFlashConfig | OrthrusConfig) -> None:
    """``drafter.init_from`` must agree with the config's drafter section, rather than silently
    replace it (a 1-layer config continuing a 2-layer drafter would train and export 2 layers)."""
    names = ("block_size", "mask_token_id") if cfg.method == "orthrus" else (
        "num_layers", "block_size", "target_layer_ids", "mask_token_id")
    diffs = [f"drafter.{n}: config {getattr(wanted, n)!r}, drafter {getattr(loaded, n)!r}" for n in names
             if getattr(wanted, n) != getattr(loaded, n)]
    if diffs:
        raise TrainingError(f"drafter.init_from={cfg.drafter.init_from!r} does not match the config "
                            f"({'; '.join(diffs)}); set these keys to the drafter's values")


def lr_schedule(cfg: ExperimentConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay over the run's optimizer steps."""
    o = cfg.optim
    warmup = int(round(o.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1),
                                              o.lr * o.final_lr_ratio)


def make_optimizer(cfg: ExperimentConfig, total_steps: int) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return optax.MultiSteps(tx, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else tx


# ----------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Orbax manager keeping the last ``keep_last`` steps plus the best by eval tau."""

    def __init__(self, directory: Path, keep_last: int):
        self.directory = directory
        self.keep_last = keep_last
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.resolve(), options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        keep = set(self.steps()[-self.keep_last:])
        if meta.get("best_step") is not None:
            keep.add(int(meta["best_step"]))
        for old in self.steps():
            if old not in keep:
                self.manager.delete(old)

    def restore(self, step: int, abstract_state: Any = None, *,
                state: bool = True) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step``. Without ``abstract_state`` the state comes back as Orbax's
        raw tree (dicts of arrays: for readers such as the exporter); ``state=False`` reads the
        metadata only."""
        args = {"meta": ocp.args.JsonRestore()}
        if state:
            args["state"] = ocp.args.StandardRestore(abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:  # orbax raises many types for truncated / foreign files
            raise TrainingError(
                f"checkpoint step {step} in {self.directory} could not be restored "
                f"({type(err).__name__}: {err}); it was left untouched — move it away to use "
                "an earlier step, or start a new run directory") from err
        return (restored["state"] if state else None), restored["meta"]


# ----------------------------------------------------------------------------- the run
# Keys a resumed run may change: they steer logging, checkpoint cadence, the device count (same
# loss on 1 or N devices) and the final report, never the parameters. Any other change would
# break "resume continues exactly" and is refused.
RESUME_FREE_KEYS = frozenset({
    "run_dir", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "train.num_devices", "eval.num_prompts", "eval.max_new_tokens", "eval.prompt_tokens"})


def check_resume_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A resumed run must use the config it was started with (up to ``RESUME_FREE_KEYS``)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is missing")
    try:
        saved = flatten(to_dict(from_dict(ExperimentConfig, yaml.safe_load(path.read_text()) or {})))
    except Exception as err:
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is unreadable ({err})") from err
    new = flatten(to_dict(cfg))
    diffs = [f"{key}: {saved.get(key)!r} -> {new.get(key)!r}" for key in sorted(saved.keys() | new.keys())
             if key not in RESUME_FREE_KEYS and saved.get(key) != new.get(key)]
    if diffs:
        raise TrainingError(f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
                            "resume with the settings it was started with, or start a new run_dir")


def run_training(cfg: ExperimentConfig, *, resume: bool | None = None, progress: bool = True,
                 final_eval: bool = True, export: bool = True,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Trains a drafter (DFlash or Orthrus) per ``cfg``; returns the final metrics (also in ``metrics.json``).

    ``resume=None`` resumes when the run directory already holds checkpoints. ``stop_after``
    ends the process-level run after that step's checkpoint, exactly as a kill right after it
    would (tests use it; ``--resume`` continues).
    """
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if resume is None:
        resume = has_ckpt
    if resume and not has_ckpt:
        raise TrainingError(f"--resume: no checkpoint to resume from in {ckpt_dir}")
    if not resume and has_ckpt:
        raise TrainingError(f"{run_dir} already holds checkpoints; resume it or choose a new run_dir "
                            "(refusing to overwrite them)")
    if resume:
        check_resume_config(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    tokenizer = load_tokenizer(cfg.target.name)
    target = load_target(cfg.target.name, dtype=DTYPES[cfg.target.dtype])
    dcfg = build_drafter_config(cfg, target, tokenizer)
    drafter = build_method_drafter(cfg, dcfg, target)
    if cfg.drafter.init_from:
        _check_init_from(cfg, dcfg, drafter.cfg)
        dcfg = drafter.cfg
    devices = jax.devices()[: cfg.train.num_devices or None]
    if cfg.train.num_devices > len(devices):
        raise TrainingError(f"train.num_devices={cfg.train.num_devices}, but only {len(devices)} "
                            f"{jax.default_backend()} devices are present")
    if cfg.train.batch_size % len(devices):
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                            f"{len(devices)} devices of the data axis")
    data = prepare_data(cfg, tokenizer, target, run_dir, progress)
    if len(data.train) < cfg.train.batch_size:
        raise TrainingError(f"{len(data.train)} packed training rows of data.seq_len={cfg.data.seq_len} "
                            f"cannot fill one batch of train.batch_size={cfg.train.batch_size}")
    eval_chunk = min(cfg.train.batch_size, cfg.eval.heldout_rows, len(data.heldout))
    eval_chunk -= eval_chunk % len(devices)
    if eval_chunk == 0:
        raise TrainingError(f"{len(data.heldout)} packed held-out rows for {len(devices)} devices: the "
                            "simulated tau needs at least one row per device (more held-out data, or "
                            "eval.heldout_rows)")
    micro = Batches(data.train, cfg.train.batch_size, seed=cfg.train.seed)
    accum = cfg.optim.grad_accum
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * micro.steps_per_epoch / accum))
    optimizer = nnx.Optimizer(drafter, make_optimizer(cfg, total), wrt=nnx.Param)
    schedule = lr_schedule(cfg, total)
    gamma = cfg.train.gamma or default_gamma(dcfg.block_size)
    compute = DTYPES[cfg.train.compute_dtype]

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split((drafter, optimizer))
    state = jax.device_put(state, replicated)
    tgraph, tstate = nnx.split(target)
    tstate = jax.device_put(tstate, replicated)
    ce_weight, kl_weight = cfg.loss_weights
    step_kw = dict(num_anchors=min(cfg.train.num_anchors, cfg.data.seq_len - 1), gamma=gamma,
                   ce_weight=ce_weight, kl_weight=kl_weight, target_labels=cfg.train.labels == "target")

    train_step, eval_step = make_step_fns(graphdef, tgraph, step_kw, compute)

    def put(batch):
        return {k: jax.device_put(jnp.asarray(v), batch_sharding) for k, v in batch.items()}

    # Held-out rows in chunks of at most a training batch (the target's logits of 64 rows of a
    # real preset would not fit in memory at once); the chunks' metrics combine exactly.
    held_arrays = data.heldout.arrays()
    n_eval = min(cfg.eval.heldout_rows, len(data.heldout))
    n_eval -= n_eval % len(devices)  # every row of it; the last chunk may be smaller
    eval_batches = [put({k: v[i:min(i + eval_chunk, n_eval)] for k, v in held_arrays.items()})
                    for i in range(0, n_eval, eval_chunk)]
    eval_key = jax.random.key(12345)  # fixed anchors: evaluations are comparable across steps

    def evaluate(state) -> dict[str, Any]:
        return obj.combine_chunk_metrics([eval_step(state, tstate, b, jax.random.fold_in(eval_key, i))
                                          for i, b in enumerate(eval_batches)])

    ckpts = Checkpoints(ckpt_dir, cfg.train.keep_last)
    start, best_tau, best_step, history = 0, -1.0, None, []
    if resume:
        latest = ckpts.steps()[-1]
        state, meta = ckpts.restore(latest, state)
        state = jax.device_put(state, replicated)
        start, best_tau, best_step = int(meta["step"]), float(meta["best_tau"]), meta.get("best_step")
        history = meta.get("history", [])
        if meta.get("total_steps") not in (None, total):
            raise TrainingError(f"checkpoint was made for {meta['total_steps']} steps, config says {total}")

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    base_key = jax.random.key(cfg.train.seed)
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train {cfg.method}",
               disable=not progress, dynamic_ncols=True)
    last_log, tau_now = time.perf_counter(), float("nan")
    tokens_since = 0
    metrics: dict[str, Any] = {}
    for step in bar:
        for i in range(accum):
            m_idx = step * accum + i  # data position and anchor RNG are pure functions of this
            key = jax.random.fold_in(base_key, m_idx)
            state, metrics = train_step(state, tstate, put(micro.batch(m_idx)), key)
            tokens_since = tokens_since + metrics["tokens"]  # a device scalar: no host sync per step
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total:
            tokens = float(tokens_since)  # waits for the steps so far: the rate covers finished work
            now = time.perf_counter()
            scalars = {name: float(metrics[name]) for name in ("loss", "ce", "tau_sim", "grad_norm")}
            scalars["lr"] = float(schedule(done))
            scalars["tokens_per_s"] = tokens / max(now - last_log, 1e-9)
            for name, value in scalars.items():
                writer.add_scalar(f"train/{name}", value, done)
            for j, acc in enumerate(np.asarray(metrics["accuracy"])):
                writer.add_scalar(f"train_accuracy/pos_{j + 1}", float(acc), done)
            last_log, tokens_since = now, 0
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", tau=f"{tau_now:.2f}",
                            tok_s=f"{scalars['tokens_per_s']:.0f}")
        if done % cfg.train.eval_every == 0 or done == total:
            ev = evaluate(state)
            tau_now = ev["tau_sim_steps"]
            history.append({"step": done, **ev})
            writer.add_scalar("eval/tau_sim", ev["tau_sim"], done)
            writer.add_scalar("eval/tau_sim_steps", ev["tau_sim_steps"], done)
            writer.add_scalar("eval/tau_sim_labels", ev["tau_sim_labels"], done)
            writer.add_scalar("eval/loss", ev["loss"], done)
            for j, acc in enumerate(ev["accuracy"]):
                writer.add_scalar(f"eval_accuracy/pos_{j + 1}", acc, done)
            if ev["tau_sim_steps"] > best_tau:  # the per-step estimate tracks decoding tau best
                best_tau, best_step = ev["tau_sim_steps"], done
        # A new best is saved at once (kept beside the last k), even between save_every steps.
        if done % cfg.train.save_every == 0 or done == total or best_step == done:
            meta = {"step": done, "best_tau": best_tau, "best_step": best_step, "total_steps": total,
                    "seed": cfg.train.seed, "data_position": done * accum, "history": history}
            ckpts.save(done, state, meta)
        if stop_after is not None and done >= stop_after:
            writer.close()
            bar.close()
            return {"stopped_at": done}
    writer.flush()
    bar.close()
    drafter, _ = nnx.merge(graphdef, state)
    result: dict[str, Any] = {"method": cfg.method, "block_size": dcfg.block_size, "steps": total,
                              "final_eval": history[-1] if history else None,
                              "best_step": best_step, "best_tau_sim": best_tau}
    if export:
        out = run_dir / "export"
        if out.exists():
            shutil.rmtree(out)
        if isinstance(drafter, OrthrusDrafter):  # delta export: the diffusion tensors + a target reference
            save_orthrus(drafter, target, out, form="delta", target_name=cfg.target.name)
        else:
            save_drafter(drafter, out, target_name=cfg.target.name, target_cfg=target.cfg)
        result["export_dir"] = str(out)
    if final_eval:
        result.update(measure_tau(target, drafter, data.prompts, cfg.eval.max_new_tokens))
        writer.add_scalar("eval/tau_real", result["tau"], total)
        writer.add_scalar("eval/tau_ngram", result["tau_ngram"], total)
        if "tau_with_ngram" in result:
            writer.add_scalar("eval/tau_with_ngram", result["tau_with_ngram"], total)
        writer.flush()
    writer.close()
    with open(run_dir / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    if result.get("outputs_differ"):  # recorded first: the run's results are kept either way
        message = (f"speculative outputs differ between methods ({', '.join(result['outputs_differ'])}) on "
                   f"the held-out prompts")
        if target.dtype == jnp.float32:  # all are lossless: in fp32 a mismatch is a bug, never a metric
            raise TrainingError(message + f"; results are in {run_dir / 'metrics.json'}")
        # In bf16 the verify passes of different shapes round differently, so a near-tied greedy
        # argmax can flip: worth a warning, not the loss of a finished run.
        warnings.warn(message + f" ({cfg.target.dtype} target: rounding at near-ties)", stacklevel=2)
    return result


def measure_tau(target: Transformer, drafter: DFlashDrafter | OrthrusDrafter, prompts: list[list[int]],
                max_new_tokens: int) -> dict[str, Any]:
    """Real greedy speculative decoding on held-out prompts: the drafter's tau next to n-gram's,
    and for DFlash also both in one tree (``tau_with_ngram``: the lookup chain as a branch).

    All are lossless, so their outputs must agree; ``outputs_differ`` lists the pairs that don't."""
    eos = tuple(target.cfg.eos_token_id)
    mask = drafter.cfg.mask_token_id
    common = dict(max_new_tokens=max_new_tokens, eos_ids=eos, mask_token_id=mask)
    dres = speculative_generate(target, prompts, method=method_for(drafter), drafter=drafter, **common)
    ngram = NgramDraft(block_size=drafter.cfg.block_size)
    nres = speculative_generate(target, prompts, method=ngram, **common)
    differ = ["drafter vs n-gram"] if dres.tokens != nres.tokens else []
    out = {"tau": dres.tau, "tau_ngram": nres.tau, "acceptance_histogram": dres.histogram(),
           "eval_prompts": len(prompts), "eval_new_tokens": dres.num_generated}
    if isinstance(drafter, DFlashDrafter):
        hres = speculative_generate(target, prompts, method=DFlashTreeDraft.of(drafter, 1, lookup=True),
                                    drafter=drafter, **common)
        differ += ["with vs without the n-gram branch"] if hres.tokens != dres.tokens else []
        out["tau_with_ngram"] = hres.tau
    if differ:
        out["outputs_differ"] = differ
    return out
