"""Drafter recipes trained on one budget with several seeds, then decoded side by side.

The equal-budget comparison of drafter kinds (DFlash, EAGLE-3, MTP, ...): every recipe trains
with the same data section, optimizer steps and batch (so the same tokens seen) under each seed;
runs that share the regeneration settings reuse the first one's regenerated data (it is checked
against the settings when read, so a mismatch regenerates). Then every trained drafter decodes
the same held-out prompts in one engine (``bench_methods``: the methods take turns batch by
batch), greedy and at each temperature asked for, and the per-seed taus are summarised per
recipe as mean and spread. Runs are resumable: a finished run is not trained again.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dflash.bench.methods import bench_methods
from dflash.configio import load_yaml
from dflash.decoding import SamplingParams
from dflash.decoding.method import StepwiseDraft
from dflash.drafters import dynamic_tree_method_for, load_drafter, method_for, resolve_method
from dflash.errors import ConfigError
from dflash.training.config import ExperimentConfig
from dflash.training.rundata import REGEN_FILES


@dataclass(frozen=True)
class Recipe:
    """One training recipe of the comparison: a name (the config file's stem) and its YAML."""

    name: str
    config: Path


def recipe_config(recipe: Recipe, seed: int, out: Path, overrides: Sequence[str]) -> ExperimentConfig:
    """The recipe's config for one seed: its own run directory under ``out``, ``train.seed``
    set, the shared ``overrides`` (e.g. ``train.steps=N``: the budget) applied to every run."""
    run_dir = out / f"{recipe.name}-seed{seed}"
    return load_yaml(ExperimentConfig, recipe.config,
                     [*overrides, f"run_dir={run_dir}", f"train.seed={seed}"])


def train_all(recipes: Sequence[Recipe], seeds: Sequence[int], out: Path, overrides: Sequence[str], *,
              progress: bool = True, log=print) -> dict[tuple[str, int], Path]:
    """Trains (or resumes, or skips when finished) every recipe x seed; returns their run dirs.

    A run that has not started yet gets the regenerated data of the last run that made some, so
    the recipes train on the same data and regeneration runs once (``_regenerated`` re-checks the
    stored settings and remakes the data when they differ)."""
    from dflash.training.trainer import run_training

    runs: dict[tuple[str, int], Path] = {}
    regen_from: Path | None = None
    for seed in seeds:  # seed by seed: a stopped comparison has every recipe at the first seeds
        for recipe in recipes:
            cfg = recipe_config(recipe, seed, out, overrides)
            run_dir = Path(cfg.run_dir)
            if regen_from is not None and not (run_dir / "checkpoints").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                for name in REGEN_FILES:
                    if not (run_dir / name).exists():
                        shutil.copy2(regen_from / name, run_dir / name)
            log(f"[compare] training {recipe.name} seed {seed} ({cfg.train.steps} steps) in {run_dir}")
            result = run_training(cfg, progress=progress, final_eval=False)
            if result.get("already_complete"):
                log(f"[compare] {run_dir} was already complete")
            if all((run_dir / name).exists() for name in REGEN_FILES):
                regen_from = run_dir
            runs[(recipe.name, seed)] = run_dir
    return runs


def decode_all(target: Any, prompts: list[list[int]], runs: dict[tuple[str, int], Path], *,
               temperatures: Sequence[float], extra_blocks: Sequence[int] = (),
               dynamic_tree: tuple[int, int, int] | None = None, max_new_tokens: int = 128,
               batch_size: int = 8, eos_ids: tuple[int, ...] = (), seed: int = 0,
               log=print) -> dict[str, Any]:
    """Every run's drafter on the same prompts at each temperature: ``bench_methods`` results.

    Method names are ``RECIPE[@VARIANT]/sSEED``; the variants are ``B<k>`` (a drafter decoded at
    block ``k`` besides its own, for each of ``extra_blocks`` smaller than its own: a block
    drafter's pass of ``k`` rows, a stepwise drafter's chain of ``k - 1`` steps)
    and ``dynamic-tree`` (a stepwise drafter as an EAGLE-2 dynamic tree, ``dynamic_tree`` =
    depth, top-k, tokens; the depth is capped at the drafter's trained chain). At T > 0 the
    drafters sample their drafts (the lossless rule for stochastic drafts). Prompt lookup runs
    at the longest block decoded, AR as the reference; greedy, every method's tokens are compared
    with AR's (``not_lossless``: the methods whose differ)."""
    impl = target.attention_impl
    drafters = {key: load_drafter(str(run_dir), target, dtype=target.dtype, attention_impl=impl)
                for key, run_dir in runs.items()}  # each read once; the methods below only wrap them
    by_temperature: dict[str, Any] = {}
    for temperature in temperatures:
        # Nothing compiled before (the runs' training steps, the last temperature's decode loops:
        # stochastic drafts compile anew) is used again: the Gemma comparison of issue 34 (six runs
        # trained, then 2 x 50 methods decoded in one process) ran a 24 GiB host out of memory in
        # LLVM at its second temperature with them all kept; decoding alone peaked at 5.1 GB.
        jax.clear_caches()
        stochastic = temperature > 0
        methods: dict[str, tuple[Any, Any]] = {"ar": resolve_method("ar", target)}
        mask_ids: set[int] = set()
        longest = 1
        for (name, seed_), drafter in drafters.items():
            method = method_for(drafter, stochastic=stochastic)
            if method.mask_token_id is not None:
                mask_ids.add(method.mask_token_id)
            methods[f"{name}/s{seed_}"] = (method, drafter)
            longest = max(longest, method.block_size)
            for k in extra_blocks:
                if k < method.block_size:
                    smaller = method_for(drafter, stochastic=stochastic, block_size=k)
                    methods[f"{name}@B{k}/s{seed_}"] = (smaller, drafter)
            if dynamic_tree is not None and isinstance(method, StepwiseDraft):
                depth, top_k, tokens = dynamic_tree
                tree = dynamic_tree_method_for(drafter, min(depth, method.block_size - 1), top_k, tokens)
                methods[f"{name}@dynamic-tree/s{seed_}"] = (tree, drafter)
        methods["ngram"] = resolve_method("ngram", target, block_size=longest)
        if len(mask_ids) > 1:
            raise ConfigError(f"the drafters' mask tokens differ ({sorted(mask_ids)}); compare drafters of "
                              "one target and tokenizer")
        log(f"[compare] decoding {len(prompts)} prompts at T={temperature:g}: {len(methods)} methods")
        result = bench_methods(target, prompts, methods, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               sampling=SamplingParams(temperature=temperature), eos_ids=eos_ids,
                               mask_token_id=next(iter(mask_ids), None), seed=seed, warmup=False)
        if not stochastic:
            result["not_lossless"] = not_lossless(result)
            for name in result["not_lossless"]:
                log(f"[compare] ERROR: {name}'s greedy tokens differ from the target's own (AR)")
        by_temperature[f"{temperature:g}"] = result
    return by_temperature


def not_lossless(result: dict[str, Any]) -> list[str]:
    """The methods of a greedy ``bench_methods`` result whose tokens differ from AR's (greedy
    speculative decoding must emit the target's own tokens)."""
    ar = [p["tokens"] for p in result["methods"]["ar"]["per_prompt"]]
    return sorted(name for name, r in result["methods"].items()
                  if [p["tokens"] for p in r["per_prompt"]] != ar)


def summarize(by_temperature: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """temperature -> method group (the name without ``/sSEED``) -> tau per seed, mean, spread
    (min..max and the sample standard deviation) and the acceptance histogram over all seeds."""
    out: dict[str, dict[str, Any]] = {}
    for temperature, result in by_temperature.items():
        groups: dict[str, dict[str, Any]] = {}
        for name, r in result["methods"].items():
            group, _, seed = name.partition("/s")
            g = groups.setdefault(group, {"taus": [], "seeds": [], "block_size": r["block_size"],
                                          "acceptance_histogram": [0] * r["block_size"]})
            g["taus"].append(float(r["tau"]))
            g["seeds"].append(int(seed) if seed else None)
            g["acceptance_histogram"] = [a + b for a, b in zip(g["acceptance_histogram"],
                                                               r["acceptance_histogram"], strict=True)]
        for g in groups.values():
            taus = np.asarray(g["taus"])
            g.update(mean=float(taus.mean()), min=float(taus.min()), max=float(taus.max()),
                     std=float(taus.std(ddof=1)) if taus.size > 1 else 0.0)
        out[temperature] = groups
    return out


def check_one_target(cfgs: Sequence[ExperimentConfig]) -> tuple[str, str]:
    """The comparison decodes on one target: every recipe must name the same one, same dtype."""
    targets = {(c.target.name, c.target.dtype) for c in cfgs}
    if len(targets) != 1:
        raise ConfigError(f"the recipes train against different targets {sorted(targets)}; "
                          "a comparison needs one (set target.name / target.dtype alike)")
    return next(iter(targets))

