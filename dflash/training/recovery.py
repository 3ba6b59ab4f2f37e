"""Resuming from the newest checkpoint that is whole.

A host that dies mid-save can leave the newest step directory damaged (truncated or missing
files; on object stores, where Orbax cannot rename atomically, even a step that looks listed).
Resuming from it would fail, and every later restart with it. So the resume walks the steps
newest first, takes the first that restores on *every* process, logs each one it skips, and moves
the damaged ones out of the checkpoint directory (``checkpoints-damaged/``, kept for inspection)
so the run can save those steps again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jax

from dflash.distributed import everywhere, is_primary
from dflash.errors import CheckpointError, DamagedCheckpointError

logger = logging.getLogger("dflash")
T = TypeVar("T")


class CheckpointStore(Protocol):
    """What this module needs of ``dflash.training`` 's ``Checkpoints``."""

    directory: Path
    manager: Any

    def steps(self) -> list[int]: ...

    def restore(self, step: int, abstract_state: Any = None, *,
                state: bool = True) -> tuple[Any, dict[str, Any]]: ...

    def previous_good_step(self, step: int) -> int | None: ...


def restore_latest(ckpts: CheckpointStore, abstract_state: Any = None) -> tuple[Any, dict[str, Any], int]:
    """``(state, meta, step)`` of the newest step that restores on every process.

    Each damaged newer step is logged in one line (step, file, cause; the full error at DEBUG level,
    which ``--verbose`` shows) and, once an older step restored, moved to ``checkpoints-damaged/``
    next to the checkpoint directory. When no step restores, nothing is moved and the error lists
    every step's failure.
    """
    errors: list[str] = []
    damaged: list[int] = []
    first_err: Exception | None = None
    for step in reversed(ckpts.steps()):
        try:
            state, meta = ckpts.restore(step, abstract_state)
            ok = True
        except CheckpointError as err:  # Checkpoints.restore's verdict on a damaged step
            ok, first_err = False, first_err or err
            errors.append(str(err).splitlines()[0] if str(err) else f"step {step}: {type(err).__name__}")
            logger.warning("%s", errors[-1])
            logger.debug("the full error of checkpoint step %d", step, exc_info=err)
        if everywhere(ok):
            moved = [quarantine(ckpts, bad) for bad in damaged]
            if damaged:
                logger.warning("resumed from checkpoint step %d, the newest that restores; the damaged %s "
                               "moved to %s", step, _steps_text(damaged), _where(moved, ckpts))
            return state, meta, step
        if ok:
            logger.warning("checkpoint step %d could not be restored on another process", step)
        damaged.append(step)
    raise CheckpointError(f"no checkpoint in {ckpts.directory} could be restored, nothing was changed "
                        f"({'; '.join(errors) or 'none saved'})") from first_err


def newest_readable(ckpts: CheckpointStore, read: Callable[[int], T]) -> tuple[T, int, list[str]]:
    """``(read(step), step, damaged)`` for the newest step that ``read`` reads, in one process (a
    reader such as the exporter: nothing is moved); ``damaged`` holds one line per newer step skipped."""
    damaged: list[str] = []
    for step in reversed(ckpts.steps()):
        try:
            return read(step), step, damaged
        except DamagedCheckpointError as err:
            damaged.append(str(err))
            logger.debug("the full error of checkpoint step %d", step, exc_info=err)
    raise CheckpointError(f"no checkpoint in {ckpts.directory} could be read "
                          f"({'; '.join(damaged) or 'none saved'})")


def explain_damage(ckpts: CheckpointStore, err: DamagedCheckpointError,
                   run_dir: Path) -> DamagedCheckpointError:
    """``err`` with what to do instead: export the previous step that restores, if there is one."""
    good = ckpts.previous_good_step(err.step)
    advice = (f"the previous good step is {good}: export it with `dflash-export --run {run_dir} --step "
              f"{good} --out DIR`; resuming the run falls back to it by itself" if good is not None
              else "no earlier checkpoint restores")
    explained = DamagedCheckpointError(f"{err}\n  {advice} (nothing was changed; the full error: --verbose)",
                                       step=err.step, file=err.file)
    return explained


def _steps_text(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"


def _where(moved: list[Path | None], ckpts: CheckpointStore) -> str:
    return str(moved[0]) if len(moved) == 1 and moved[0] is not None else str(_damaged_dir(ckpts))


def _damaged_dir(ckpts: CheckpointStore) -> Path:
    return Path(ckpts.directory).parent / "checkpoints-damaged"


def quarantine(ckpts: CheckpointStore, step: int) -> Path | None:
    """Moves step ``step`` out of the checkpoint directory (process 0; the others wait for it); where
    to (process 0), else None."""
    dest = None
    if is_primary():
        source = Path(ckpts.directory) / str(step)
        if source.exists():
            dest = _damaged_dir(ckpts) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(dest))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"dflash quarantine {step}")
    ckpts.manager.reload()  # the manager caches the step list
    return dest
