"""How every dflash command ends on a user's mistake or an accident, and how it does not on a bug.

A mistake (a bad flag, config or file) or an accident (a damaged checkpoint, a full or read-only
disk, Ctrl-C) is one line on stderr that names the file, the line or the step and says what to
do; ``--verbose`` adds the full chain. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from dflash.errors import DflashError, describe_disk_error, is_disk_error


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error a user can act on; None for a bug."""
    if isinstance(err, DflashError):
        return str(err)
    if is_disk_error(err):
        return describe_disk_error(err)  # type: ignore[arg-type]
    return None


def run_command(prog: str, body: Callable[[], int], *, verbose: bool = False) -> int:
    """``body()``'s exit status; a user's error -> one ``PROG: error: ...`` line and 2, Ctrl-C -> one
    line and 130 (the conventional status of SIGINT); a bug propagates with its traceback.

    dflash's own log lines (e.g. a damaged checkpoint skipped on resume) print as ``PROG: ...``;
    ``verbose`` also shows their full errors.
    """
    with _log_to_stderr(prog, verbose):
        return _run(prog, body, verbose)


def _run(prog: str, body: Callable[[], int], verbose: bool) -> int:
    try:
        return body()
    except KeyboardInterrupt as err:
        if verbose:
            traceback.print_exception(err)
        print(f"{prog}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        if verbose:
            traceback.print_exception(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _log_to_stderr(prog: str, verbose: bool) -> Iterator[None]:
    """dflash's log records as plain ``PROG: message`` lines while the command runs (not also through
    the root logger, which absl configures with its own format), and Orbax's warnings (absl) only with
    ``verbose``; restored afterwards."""
    logger, absl = logging.getLogger("dflash"), logging.getLogger("absl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    saved = logger.propagate, logger.level, absl.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        absl.setLevel(max(absl.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level, absl.level = saved


def compile_only(prog: str, args: Any, make_plan: Callable[[], dict[str, Any]],
                 needs: tuple[str, ...] = ("topology",)) -> int:
    """``--compile-only`` of a command: the plan ``make_plan`` compiles for ``--topology``, its summary
    printed and ``--json`` written; a missing flag (``needs``) or a user's error is one line."""
    from dflash.bench.prompts import write_json
    from dflash.plan import TOPOLOGIES, summary

    missing = [f"--{name.replace('_', '-')}" for name in needs if not getattr(args, name)]
    if missing:
        print(f"{prog}: error: --compile-only needs {' and '.join(missing)} (topologies: "
              f"{', '.join(TOPOLOGIES)})", file=sys.stderr)
        return 2

    def body() -> int:
        plan = make_plan()
        print(summary(plan))
        if args.json:
            write_json(plan, args.json)
        return 0

    return run_command(prog, body, verbose=bool(getattr(args, "verbose", False)))
