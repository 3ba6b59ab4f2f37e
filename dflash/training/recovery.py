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
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from dflash.distributed import is_primary
from dflash.errors import CheckpointError

logger = logging.getLogger("dflash")


class CheckpointStore(Protocol):
    """What this module needs of ``dflash.training`` 's ``Checkpoints``."""

    directory: Path
    manager: Any

    def steps(self) -> list[int]: ...

    def restore(self, step: int, abstract_state: Any = None, *,
                state: bool = True) -> tuple[Any, dict[str, Any]]: ...


def _everywhere(ok: bool) -> bool:
    """True when ``ok`` on every process (all processes call this the same number of times)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))).all())


def restore_latest(ckpts: CheckpointStore, abstract_state: Any = None) -> tuple[Any, dict[str, Any], int]:
    """``(state, meta, step)`` of the newest step that restores on every process.

    Damaged newer steps are logged and, once an older step restored, moved to
    ``checkpoints-damaged/`` next to the checkpoint directory. When no step restores, nothing is
    moved and the error lists every step's failure.
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
            errors.append(f"step {step}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        if _everywhere(ok):
            for bad in damaged:
                quarantine(ckpts, bad)
            if damaged:
                logger.warning("resumed from checkpoint step %d: the newer steps %s could not be restored "
                               "and were moved to %s (%s)", step, damaged, _damaged_dir(ckpts),
                               "; ".join(errors))
            return state, meta, step
        logger.warning("checkpoint step %d in %s is incomplete or damaged; trying the previous one", step,
                       ckpts.directory)
        damaged.append(step)
    raise CheckpointError(f"no checkpoint in {ckpts.directory} could be restored, nothing was changed "
                        f"({'; '.join(errors) or 'none saved'})") from first_err


def _damaged_dir(ckpts: CheckpointStore) -> Path:
    return Path(ckpts.directory).parent / "checkpoints-damaged"


def quarantine(ckpts: CheckpointStore, step: int) -> None:
    """Moves step ``step`` out of the checkpoint directory (process 0; the others wait for it)."""
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
