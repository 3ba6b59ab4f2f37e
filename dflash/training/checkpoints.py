"""Orbax checkpoints of a drafter run and the policy for resuming one.

A checkpoint holds the (drafter, optimizer) state and JSON metadata (step, best τ, history,
data position). The exporter reads checkpoints through ``Checkpoints`` too, so this module
imports nothing of the training loop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
import yaml

from dflash.configio import flatten, from_dict, to_dict
from dflash.errors import CheckpointError, ConfigError, TrainingError
from dflash.training.config import ExperimentConfig

# What Orbax raises for a checkpoint it cannot read (measured on orbax-checkpoint 0.12.8: garbage
# or truncated JSON / OCDBT files -> JSONDecodeError or tensorstore's ValueError, a missing item
# -> KeyError, missing array files -> FileNotFoundError). Anything else (out of memory, sharding,
# a bug) keeps its own type and traceback.
CORRUPT_CHECKPOINT_ERRORS = (ValueError, KeyError, OSError)


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
        except CORRUPT_CHECKPOINT_ERRORS as err:
            raise self.unreadable(step, err) from err
        return (restored["state"] if state else None), restored["meta"]

    def latest_meta(self) -> dict[str, Any]:
        """The metadata of the latest checkpoint ({} when there is none); no arrays are read."""
        steps = self.steps()
        return self.restore(steps[-1], state=False)[1] if steps else {}

    def restore_subtree(self, step: int, item: dict[str, Any]) -> dict[str, Any]:
        """Only the part of the saved state that ``item`` (a raw tree of ``ShapeDtypeStruct``)
        names, e.g. the drafter's parameters without the optimizer moments an export never needs."""
        fresh = Checkpoints(self.directory, self.keep_last)  # a manager is bound to one restore kind
        # Read onto the shardings of ``item``: the saved ones may name another process count's devices.
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        try:
            return fresh.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, partial_restore=True, restore_args=restore_args)))["state"]
        except CORRUPT_CHECKPOINT_ERRORS as err:  # as in ``restore``
            raise self.unreadable(step, err) from err

    def unreadable(self, step: int, err: BaseException) -> CheckpointError:
        """A few lines a user can act on: checkpoint, step, damaged file, the previous good step.

        Orbax's own message holds the whole TensorStore spec (hundreds of lines); it stays in the
        exception chain (``--verbose``), and only its root cause is quoted here.
        """
        cause = _root_cause(err)
        where = re.search(r'"([^"]+)" in OCDBT database at local file "([^"]+)"', cause)
        file = f"{where.group(2)} (array {where.group(1)})" if where else str(self.directory / str(step))
        good = self.previous_good_step(step)
        run = self.directory.parent
        advice = (f"the previous good step is {good}: export it with `dflash-export --run {run} --step "
                  f"{good} --out DIR`, or move {self.directory / str(step)} out of the run to resume from it"
                  if good is not None else "no earlier checkpoint is readable: start a new run directory")
        return CheckpointError(f"checkpoint step {step} in {self.directory} could not be restored: {cause}\n"
                             f"  damaged or missing file: {file}\n  {advice}; nothing was changed "
                             "(the full error: --verbose)")

    def previous_good_step(self, step: int) -> int | None:
        """The latest kept step before ``step`` whose state restores, if any."""
        for earlier in reversed([s for s in self.steps() if s < step]):
            try:
                Checkpoints(self.directory, self.keep_last).manager.restore(
                    earlier, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                return earlier
            except CORRUPT_CHECKPOINT_ERRORS:  # unreadable too: look further back
                continue
        return None


def _root_cause(err: BaseException, limit: int = 400) -> str:
    """The innermost message of an exception chain, on one line, at most ``limit`` characters."""
    chain = [err]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    text = next((str(e) for e in reversed(chain) if str(e).strip()), type(err).__name__)
    line = " ".join(text.split("[tensorstore_spec=")[0].split())
    return line if len(line) <= limit else line[:limit] + " ..."


# Keys a resumed run may change: they steer logging, checkpoint cadence, the device count (same
# loss on 1 or N devices) and the final report, never the parameters. Any other change would
# break "resume continues exactly" and is refused.
RESUME_FREE_KEYS = frozenset({
    "run_dir", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "train.num_devices", "eval.num_prompts", "eval.max_new_tokens", "eval.prompt_tokens"})


def has_checkpoints(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def decide_resume(run_dir: Path, cfg: ExperimentConfig, resume: bool | None, *, extend: bool = False) -> bool:
    """Whether the run resumes: ``resume=None`` does when ``run_dir`` holds checkpoints.

    Refuses to resume without checkpoints, to start over existing ones, and to resume with a
    config that differs from the saved one (``check_resume_config``).
    """
    has_ckpt = has_checkpoints(run_dir)
    if resume is None:
        resume = has_ckpt
    if resume and not has_ckpt:
        raise TrainingError(f"--resume: no checkpoint to resume from in {run_dir / 'checkpoints'}")
    if not resume and has_ckpt:
        raise TrainingError(f"{run_dir} already holds checkpoints; resume it or choose a new run_dir "
                            "(refusing to overwrite them)")
    if extend and not resume:
        raise TrainingError(f"--extend continues a run, and {run_dir} holds no checkpoint to continue")
    if resume:
        check_resume_config(run_dir, cfg, extend=extend)
    return resume


# Keys ``--extend`` may change as well: the length of the run.
EXTEND_KEYS = frozenset({"train.steps", "train.epochs"})


def check_resume_config(run_dir: Path, cfg: ExperimentConfig, *, extend: bool = False) -> None:
    """A resumed run must use the config it was started with (up to ``RESUME_FREE_KEYS``, and
    ``EXTEND_KEYS`` when extending)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is missing")
    try:
        saved = flatten(to_dict(from_dict(ExperimentConfig, yaml.safe_load(path.read_text()) or {})))
    except (yaml.YAMLError, ConfigError) as err:  # unparsable, or keys / values from_dict refuses
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is unreadable ({err})") from err
    new = flatten(to_dict(cfg))
    free = RESUME_FREE_KEYS | (EXTEND_KEYS if extend else frozenset())
    diffs = [f"{key}: {saved.get(key)!r} -> {new.get(key)!r}" for key in sorted(saved.keys() | new.keys())
             if key not in free and saved.get(key) != new.get(key)]
    if diffs:
        longer = ("; to train longer on the same run, raise train.steps and pass --extend"
                  if not extend and {d.split(":")[0] for d in diffs} <= EXTEND_KEYS else "")
        raise TrainingError(f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
                            f"resume with the settings it was started with, or start a new run_dir{longer}")
