"""dflash's own exceptions: what a user can fix (bad config, bad checkpoint, too small a cache).

Everything the CLIs turn into a one-line ``error:`` exit derives from ``DflashError``; any
other exception is a bug or an environment problem and keeps its traceback. Each subclass
also derives from the builtin it refines (``ValueError``, ``RuntimeError``), so code that
catches those keeps working.
"""

from __future__ import annotations

import errno


class DflashError(Exception):
    """Base of every error dflash raises on purpose; the message says what to change."""


class ConfigError(DflashError, ValueError):
    """A configuration value or key is invalid; the message names it."""


class CheckpointError(DflashError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match its config; names the culprit."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or garbled (a host died mid-save, a disk fault).

    ``step`` and ``file`` (the damaged file or the array read from it) let the caller fall back to
    an earlier step, or say which one to use.
    """

    def __init__(self, message: str, *, step: int, file: str):
        super().__init__(message)
        self.step, self.file = step, file


class CacheOverflowError(DflashError, ValueError):
    """A prompt or generation would not fit in the cache's ``max_len`` slots."""


class ContextLengthError(DflashError, ValueError):
    """A request reaches positions past the target's trained context (``max_position_embeddings``)."""


class TrainingError(DflashError, RuntimeError):
    """The run cannot proceed (e.g. an unreadable checkpoint); nothing was overwritten."""


class DistributedError(DflashError, RuntimeError):
    """A multi-process job that cannot work (bad flags, unreachable coordinator, processes that
    disagree); raised on every process, so the whole job stops instead of hanging."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and how to go on (``str``: one line). A ``KeyboardInterrupt``, not a
    ``DflashError``: an ``except Exception`` must not stop it."""


# File-system errors that are the environment's, never dflash's, and what to do about each.
DISK_ERRORS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (the disk quota is used up)",
    errno.EROFS: "the file system is read-only: remount it writable or use a writable directory",
    errno.EACCES: "check its permissions or choose another directory",
    errno.EPERM: "check its permissions or choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a part of the path exists and is not a directory (a dangling link?)",
    errno.ENOENT: "check the path",
    errno.EISDIR: "it is a directory, not a file",
    errno.EIO: "the disk reported an I/O error",
}


def is_disk_error(err: BaseException) -> bool:
    """Whether ``err`` is a file-system error of the environment (``DISK_ERRORS``): a user's to fix."""
    return isinstance(err, OSError) and (err.errno in DISK_ERRORS or isinstance(err, FileNotFoundError))


def describe_disk_error(err: OSError) -> str:
    """``PATH: reason; what to do``, on one line."""
    if err.errno is None:  # raised by dflash with its own message
        return str(err)
    advice = DISK_ERRORS.get(err.errno, "check the path")
    reason = err.strerror or str(err)
    reason = reason[:1].lower() + reason[1:]  # "No space left on device" -> "no space left on device"
    if not err.filename:
        return f"{reason}; {advice}"
    path = f"{err.filename} -> {err.filename2}" if err.filename2 else f"{err.filename}"
    return f"{path}: {reason}; {advice}"
