"""A run's data: packed training and held-out rows, and held-out prompts for the real τ.

With ``regen.num_sequences`` the corpus responses are replaced by the target's own greedy
continuations (docs/design.md §5), made once per run and cached in the run directory with
the settings they were made with, so a resumed run trains on the very same data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dflash.configio import to_dict
from dflash.distributed import is_primary, sync_processes
from dflash.drafters.dflash.hf import target_fingerprint
from dflash.errors import TrainingError
from dflash.models.transformer import Transformer
from dflash.training.config import ExperimentConfig
from dflash.training.data import DataConfig, Document, PackedRows, load_documents, load_lane_documents, pack
from dflash.training.selfdistill import load_documents_npz, regenerate_documents, save_documents
from dflash.training.tiny_corpus import heldout_prompts


@dataclasses.dataclass
class RunData:
    train: dict[int, PackedRows]  # the packed rows of each data lane this process feeds (hostdata.py)
    heldout: PackedRows
    prompts: list[list[int]]


def prompts_from_docs(docs: list[Document], count: int, prompt_tokens: int) -> list[list[int]]:
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
                 progress: bool = True, lanes: Sequence[int] | None = None,
                 mesh: Mesh | None = None) -> RunData:
    """The rows of data ``lanes`` (default: all ``data.lanes``), held-out rows and prompts.

    Only the lanes' training documents are tokenized, except with in-run regeneration, which
    samples prompts from all documents: then every process gets (or reads) the same
    regenerated documents and keeps its lanes' share (document ``i`` in lane ``i % lanes``).
    ``mesh``: the training mesh the target lives on; regeneration decodes there, each row once
    in the whole job.
    """
    lanes = list(range(cfg.data.lanes)) if lanes is None else list(lanes)
    if cfg.regen.num_sequences:
        train_docs, held_docs = load_documents(cfg.data, tokenizer)
    else:
        by_lane, held_docs = load_lane_documents(cfg.data, tokenizer, lanes)
    if cfg.eval.eval_split:
        eval_cfg = DataConfig(**{**to_dict(cfg.data), "split": cfg.eval.eval_split, "heldout_fraction": 0.0,
                                 "max_examples": 0})
        held_docs, _ = load_documents(eval_cfg, tokenizer)
    if cfg.regen.num_sequences:
        train_docs, held_docs = _regenerated(cfg, target, run_dir, train_docs, held_docs, progress, mesh)
        by_lane = {j: [(i, d) for i, d in enumerate(train_docs) if i % cfg.data.lanes == j] for j in lanes}
    if not any(by_lane.values()):
        raise TrainingError(f"data source {cfg.data.source!r} yielded no training documents")
    if not held_docs:
        raise TrainingError("no held-out documents: raise data.heldout_fraction or set eval.eval_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = {j: pack([d for _, d in docs], cfg.data.seq_len, pad) for j, docs in by_lane.items()}
    held_rows = pack(held_docs, cfg.data.seq_len, pad)
    if cfg.data.source == "tiny-code":
        texts = heldout_prompts(cfg.eval.num_prompts)
        prompts = [tokenizer(t, add_special_tokens=False).input_ids[-cfg.eval.prompt_tokens:] for t in texts]
    else:
        prompts = prompts_from_docs(held_docs, cfg.eval.num_prompts, cfg.eval.prompt_tokens)
    return RunData(train_rows, held_rows, prompts)


REGEN_FILES = ("regenerated.npz", "regenerated_eval.npz", "regenerated.json")  # what a run keeps of it


def _regenerated(cfg: ExperimentConfig, target: Transformer, run_dir: Path, train_docs: list[Document],
                 held_docs: list[Document], progress: bool,
                 mesh: Mesh | None) -> tuple[list[Document], list[Document]]:
    """Train and eval rows alike become (corpus prompt, target's greedy continuation), which is
    what the drafter sees when decoding; read from the run directory when made with these settings."""
    eos = tuple(target.cfg.eos_token_id)
    # train and eval documents, and the settings the stored data was made with
    cached, cached_eval, made_with = (run_dir / name for name in REGEN_FILES)
    settings = regen_settings(cfg, target)  # plain JSON values (to_dict turns tuples into lists)
    sync_processes("dflash regen cache check")  # every process sees the same cache state
    reuse = (cached.exists() and cached_eval.exists() and made_with.exists()
             and json.loads(made_with.read_text()) == settings)
    sync_processes("dflash regen cache checked")  # before process 0 may replace it
    if reuse:
        return load_documents_npz(cached), load_documents_npz(cached_eval)
    # None yet, or made with other settings: regeneration is deterministic, so remake it.
    if not progress:  # (with a bar, the bar says it)
        print(f"regenerating {regen_count(cfg)} + {cfg.eval.heldout_rows * 2} target continuations "
              f"(once per run, kept in {cached.name})", flush=True)
    train_docs = regenerate_documents(target, train_docs, cfg.regen, seed=cfg.data.seed, eos_ids=eos,
                                      progress=progress, limit=regen_count(cfg), mesh=mesh)
    eval_regen = dataclasses.replace(cfg.regen, num_sequences=cfg.eval.heldout_rows * 2)
    held_docs = regenerate_documents(target, held_docs, eval_regen, seed=cfg.data.seed + 1,
                                     eos_ids=eos, progress=progress, mesh=mesh)
    if is_primary():  # every process has the same documents; one writes them
        save_documents(train_docs, cached)
        save_documents(held_docs, cached_eval)
        made_with.write_text(json.dumps(settings, indent=1))
    return train_docs, held_docs


def regen_settings(cfg: ExperimentConfig, target: Transformer) -> dict[str, Any]:
    """Everything the regenerated documents depend on: data, regen and eval sections, the target."""
    settings = {"data": to_dict(cfg.data), "regen": to_dict(cfg.regen), "eval_split": cfg.eval.eval_split,
                "heldout_rows": cfg.eval.heldout_rows, "target": cfg.target.name,
                "target_dtype": cfg.target.dtype, "target_fingerprint": target_fingerprint(target.cfg)}
    if regen_count(cfg) < cfg.regen.num_sequences:  # (only then: older runs' stored data stays valid)
        settings["regen_sequences_made"] = regen_count(cfg)
    return settings


def regen_count(cfg: ExperimentConfig) -> int:
    """How many of the ``regen.num_sequences`` continuations a run regenerates: no more than its
    ``train.steps`` can consume (rows of ``data.seq_len`` holding whole prompt + continuation
    documents), so a short try does not wait for data it never reads. Epoch-based runs make all."""
    r, t = cfg.regen, cfg.train
    if not t.steps:
        return r.num_sequences
    per_row = max(1, cfg.data.seq_len // (r.prompt_tokens + r.new_tokens))
    return min(r.num_sequences, t.steps * cfg.optim.grad_accum * t.batch_size * per_row)
