"""What a run does about accidents (Ctrl-C, a full or read-only disk, an uncreatable run
directory): stop with every checkpoint intact and say, in one line, how to go on.

Ctrl-C in a single-process run finishes the step in progress and saves it (a step boundary is
the one point where the state, the data position and the metadata agree), so the rerun loses
nothing; a second Ctrl-C stops at once. In a multi-process job one process's Ctrl-C cannot stop
the others at the same step, so there it interrupts at once, as usual, and the rerun resumes from
the last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import signal
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax

from dflash.errors import Interrupted, TrainingError, describe_disk_error, is_disk_error

logger = logging.getLogger("dflash")
F = TypeVar("F", bound=Callable[..., Any])


class StopRequest:
    """Ctrl-C at a step boundary: while ``steps`` runs (single process, main thread, SIGINT handled the
    default way: not ignored as in a shell's background job, not taken by a caller), the first SIGINT
    sets ``requested`` for the loop to save the step and stop; the second raises ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def steps(self, steps: Iterable[int]) -> Iterator[int]:
        """``steps``, with the handler installed until the loop ends (``explain_accidents`` restores
        the previous one when the loop ends by an exception)."""
        if (jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield from steps
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C stops at once
        logger.warning("Ctrl-C: stopping after this step, which is saved (Ctrl-C again to stop at once)")


def make_run_dir(run_dir: Path) -> None:
    """Creates the run directory; one that cannot be is an error naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if not is_disk_error(err):
            raise
        raise TrainingError(f"cannot create the run directory: {describe_disk_error(err)}; or choose "
                            "another run_dir (--run-dir)") from err


def replace_dir(new: Path, dest: Path) -> None:
    """``new`` (complete) becomes ``dest``; the old ``dest`` goes only once ``new`` is in place."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of it (a full disk mid-write)."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, newline="")  # as given: no newline translation
        partial.replace(path)
    except OSError as err:  # named by the file meant, not the temporary one
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err


def explain_accidents(run: F) -> F:
    """``run(cfg, ...)`` with Ctrl-C and disk errors turned into one line naming the path, what to do
    and the step a rerun of the same command resumes from (the newest checkpoint, intact)."""

    @functools.wraps(run)
    def wrapped(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        handler = signal.getsignal(signal.SIGINT)
        try:
            return run(cfg, *args, **kwargs)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {_resume_hint(Path(cfg.run_dir))}") from None
        except OSError as err:
            if not is_disk_error(err):
                raise
            raise TrainingError(f"{describe_disk_error(err)}; {_resume_hint(Path(cfg.run_dir))}") from err
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)  # StopRequest's, when the loop ended by an exception

    return wrapped  # type: ignore[return-value]


def _resume_hint(run_dir: Path) -> str:
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()) \
        if (run_dir / "checkpoints").is_dir() else []
    if not steps:
        return "no checkpoint was written yet: rerun the same command to start again"
    return (f"nothing was lost: rerun the same command to resume from step {steps[-1]} (its last checkpoint, "
            "intact)")
