"""Export any Orbax checkpoint of a training run as a HF-format drafter directory.

A run directory holds ``config.yaml`` (the experiment config it was started with) and
``checkpoints/<step>/`` (Orbax: drafter + optimizer state, and JSON metadata). Only the
drafter half of the state is read back; the drafter's architecture comes from the run's
config and the target's ``config.json``, so no target weights are loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dflash.configio import load_yaml
from dflash.drafters import find_export
from dflash.errors import CheckpointError, DamagedCheckpointError
from dflash.io.loading import ASSETS, SHIPPED, load_target, read_config, resolve
from dflash.io.tokenizer import load_tokenizer
from dflash.training.checkpoints import Checkpoints
from dflash.training.config import ExperimentConfig
from dflash.training.recovery import explain_damage, newest_readable
from dflash.training.setup import build_drafter_config

EXPORT_DTYPES = {"fp32": np.float32, "float32": np.float32, "bf16": "bfloat16", "bfloat16": "bfloat16"}


def find_checkpoint(run_dir: Path | None, checkpoint: Path | None, step: str = "latest") -> tuple[Path, int]:
    """``(run_dir, step)`` from either a run directory (+ ``latest``/``best``/N) or a checkpoint dir."""
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir() or not checkpoint.name.isdigit():
            raise CheckpointError(f"{checkpoint} is not a checkpoint directory "
                                  "(expected RUN/checkpoints/<step>)")
        return checkpoint.parent.parent, int(checkpoint.name)
    if run_dir is None:
        raise CheckpointError("give a run directory or a checkpoint directory")
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    steps = _checkpoints(run_dir).steps() if ckpt_dir.is_dir() else []
    if not steps:
        raise CheckpointError(f"{run_dir} holds no checkpoints (looked in {ckpt_dir})")
    if step == "latest":
        return run_dir, steps[-1]
    if step == "best":
        best = _checkpoints(run_dir).latest_meta().get("best_step")
        if best is None or int(best) not in steps:
            raise CheckpointError(f"{run_dir}: the best step {best} is not among the kept "
                                  f"checkpoints {steps}")
        return run_dir, int(best)
    if not str(step).isdigit() or int(step) not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint for step {step!r}; kept steps: {steps}")
    return run_dir, int(step)


def _checkpoints(run_dir: Path) -> Any:
    return Checkpoints(run_dir / "checkpoints", keep_last=1)  # read only: nothing is saved or deleted


def _strip_values(tree: Any) -> Any:
    """Orbax's raw tree -> NNX pure dict: variables come back as ``{"value": array}``."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        # nnx.List children are int-keyed in the pure dict; Orbax stores the keys as strings.
        return {int(k) if k.isdigit() else k: _strip_values(v) for k, v in tree.items()}
    return tree


def _as_saved(pure: Any) -> Any:
    """An NNX pure dict of abstract arrays -> the raw tree Orbax saved (string keys, ``{"value": x}``),
    each read whole onto this process's first device: the checkpoint may come from another mesh or
    process count, whose devices are not here."""
    if isinstance(pure, dict):
        return {str(k): _as_saved(v) for k, v in pure.items()}
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {"value": jax.ShapeDtypeStruct(pure.shape, pure.dtype, sharding=here)}


def _restore_drafter_state(run_dir: Path, step: int, expected: dict[str, Any]) -> dict[str, Any]:
    """The drafter's parameters of one checkpoint, read alone: the optimizer moments beside them
    (twice the drafter's size) are never read, so a damaged moment cannot stop an export."""
    # The state is nnx.split((drafter, optimizer)): the drafter is item "0". CheckpointError if unreadable.
    state = _checkpoints(run_dir).restore_subtree(step, {"0": _as_saved(expected)})
    if not isinstance(state, dict) or set(state) != {"0"}:
        raise CheckpointError(f"checkpoint step {step} of {run_dir} does not hold a "
                              "(drafter, optimizer) state")
    return _strip_values(state)[0]


def _restore_with_fallback(run_dir: Path, step: int, expected: dict[str, Any], *,
                           latest: bool) -> tuple[dict[str, Any], int, list[str]]:
    """The drafter state of ``step``; for ``latest``, of the newest step that restores (with a line
    per damaged newer step); a damaged explicit step is an error naming the previous good one."""
    ckpts = _checkpoints(run_dir)
    if latest:
        return newest_readable(ckpts, lambda s: _restore_drafter_state(run_dir, s, expected))
    try:
        return _restore_drafter_state(run_dir, step, expected), step, []
    except DamagedCheckpointError as err:
        raise explain_damage(ckpts, err, run_dir) from err


def run_drafter_config(run_dir: Path) -> tuple[Any, Any, Any]:
    """``(experiment config, drafter config, target config)`` of a run, without loading weights."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: {cfg_path} is missing")
    cfg = load_yaml(ExperimentConfig, cfg_path)
    target_cfg = read_config(resolve(cfg.target.name))
    if cfg.drafter.init_from:  # the drafter it continued: its architecture is the run's
        kind, directory = find_export(cfg.drafter.init_from)
        dcfg = kind.read_config(directory)
    else:
        dcfg = build_drafter_config(cfg, target_cfg, load_tokenizer(cfg.target.name))
    return cfg, dcfg, target_cfg


def _check_output_dir(out: Path) -> None:
    """Nothing is overwritten: the output must be new or an empty directory."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose a new output directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new output directory")


def export_checkpoint(out: Path, *, run_dir: Path | None = None, checkpoint: Path | None = None,
                      step: str = "latest", dtype: str = "fp32", with_target: bool | None = None,
                      form: str = "delta") -> dict[str, Any]:
    """Writes the drafter of one checkpoint to ``out`` (and the target to ``out/target`` if asked).

    Each kind writes its own layout: DFlash runs give a "DFlashDraftModel" directory; Orthrus runs:
    ``form="delta"`` holds the diffusion tensors plus a reference to the target, ``"full"``
    the target's tensors too (one directory that loads as the target and as the drafter).
    ``with_target=None`` bundles the target only when it is a checkpoint shipped with dflash
    (small, and the pair then travels as one directory); hub targets are referenced by name.
    """
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"unsupported export dtype {dtype!r}; choose from {sorted(EXPORT_DTYPES)}")
    _check_output_dir(out)  # before the (slow) restore
    run_dir, step_n = find_checkpoint(run_dir, checkpoint, step)
    cfg, dcfg, target_cfg = run_drafter_config(run_dir)
    graphdef, abstract_state = nnx.split(cfg.kind.abstract(dcfg))
    expected = nnx.to_pure_dict(abstract_state)
    saved, step_n, damaged = _restore_with_fallback(run_dir, step_n, expected, latest=step == "latest"
                                                    and checkpoint is None)
    exp_paths = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got_paths = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    if exp_paths != got_paths:
        diff = sorted(set(exp_paths.items()) ^ set(got_paths.items()))[:6]
        raise CheckpointError(f"checkpoint step {step_n} of {run_dir} does not match the run's "
                              f"drafter config (first differences: {diff})")
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(np.asarray, saved))
    drafter = nnx.merge(graphdef, abstract_state)
    # A kind whose export records the target's weights (Orthrus: a fingerprint) reads them.
    target = load_target(cfg.target.name) if cfg.kind.needs_target_weights else None
    cfg.kind.save(drafter, target, target_cfg, out, target_name=cfg.target.name, dtype=EXPORT_DTYPES[dtype],
                  form=form)
    target_dir = resolve(cfg.target.name)
    shipped = str(cfg.target.name) in SHIPPED or ASSETS in target_dir.resolve().parents
    bundled = shipped if with_target is None else with_target
    if bundled:
        shutil.copytree(target_dir, out / "target")
    info = {"out": str(out), "run_dir": str(run_dir), "step": step_n, "method": cfg.method, "dtype": dtype,
            "target": str(cfg.target.name), "target_bundled": bool(bundled), "damaged_steps": damaged}
    note = cfg.kind.export_note(target_dir, out, form)
    return {**info, "note": note} if note else info
