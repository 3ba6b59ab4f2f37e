"""dflash's own exceptions: what a user can fix (bad config, bad checkpoint, too small a cache).

Everything the CLIs turn into a one-line ``error:`` exit derives from ``DflashError``; any
other exception is a bug or an environment problem and keeps its traceback. Each subclass
also derives from the builtin it refines (``ValueError``, ``RuntimeError``), so code that
catches those keeps working.
"""

from __future__ import annotations


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
