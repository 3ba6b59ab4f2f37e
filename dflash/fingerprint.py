"""Start-up consistency check of a multi-process job: same code, config and data everywhere.

Processes that disagree (a host with a stale checkout, a different ``--set``, another copy of
the data) would otherwise compile different programs and hang in the first collective, or
silently train on different batches. Every process publishes a fingerprint to the
``jax.distributed`` key-value store and reads everyone else's with a timeout, so all of them
reach the same verdict within seconds and stop with an error naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import dflash
from dflash.distributed import DistributedError, Launch, initialize, is_initialized

_HEAD_TAIL = 1 << 20  # bytes hashed at each end of a data file: cheap on TB datasets, catches copies
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".npz", ".txt")
_calls = itertools.count()  # distinct keys for repeated checks within one job


def code_version() -> str:
    """Package version, git commit (when run from a checkout) and a hash of the package source,
    which also catches uncommitted edits."""
    root = Path(dflash.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "no git"
    except (OSError, subprocess.SubprocessError):
        git = "no git"
    return f"dflash {dflash.__version__} ({git}) source {digest.hexdigest()[:12]}, jax {jax.__version__}"


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_TAIL))
        if size > 2 * _HEAD_TAIL:
            f.seek(size - _HEAD_TAIL)
        h.update(f.read(_HEAD_TAIL))
    return f"{size} bytes {h.hexdigest()[:12]}"


def data_digests(sources: Sequence[str]) -> dict[str, str]:
    """Size and head/tail hash of each local data file under ``sources`` (files or directories);
    remote URLs and hub ids are compared by name (they are one object for every host)."""
    out: dict[str, str] = {}
    for source in sources:
        path = Path(source).expanduser()
        if "://" in source or not path.exists():
            out[source] = "remote or hub id"
        elif path.is_file():
            out[source] = _file_digest(path)
        else:
            for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES):
                out[str(f)] = _file_digest(f)
    return out


def fingerprint(config: Mapping[str, Any] | None = None, data_files: Sequence[str] = ()) -> dict[str, Any]:
    """What must be equal on every process: code version, config (flat key -> value), data files."""
    return {"code version": code_version(), "process count": jax.process_count(),
            "config": {k: repr(v) for k, v in _flatten(config or {}).items()},
            "data files": data_digests(data_files)}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], limit: int = 4) -> list[str]:
    """``["config (train.steps: 10 vs 20)", ...]``: the components that differ, with their keys."""
    out = []
    for name in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(name), theirs.get(name)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            shown = [f"{k}: {a.get(k, '<absent>')} vs {b.get(k, '<absent>')}" for k in keys[:limit]]
            more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
            out.append(f"{name} ({'; '.join(shown)}{more})")
        else:
            out.append(f"{name} ({a} vs {b})")
    return out


def check_consistent(fp: Mapping[str, Any], *, timeout_s: float = 60.0) -> None:
    """Raises ``DistributedError`` on every process when any two fingerprints differ, or when a
    process does not publish its own within ``timeout_s``. A no-op in a single-process run."""
    if not is_initialized() or jax.process_count() == 1:
        return
    from jax._src import distributed as jdist  # key-value store: no public API; jax is pinned exactly

    client = jdist.global_state.client
    call = next(_calls)
    me = jax.process_index()
    client.key_value_set(f"dflash/fingerprint/{call}/{me}", json.dumps(fp, sort_keys=True, default=str))
    prints = {}
    for p in range(jax.process_count()):
        try:
            raw = client.blocking_key_value_get(f"dflash/fingerprint/{call}/{p}", int(timeout_s * 1000))
        except Exception as err:  # the store raises a deadline error without a public type
            raise DistributedError(f"process {p} did not report its start-up fingerprint within "
                                   f"{timeout_s:.0f} s (did it start, with the same --coordinator and "
                                   "--num-processes?): "
                                   f"{err}") from err
        prints[p] = json.loads(raw)
    problems = [f"process {p} differs from process 0 in " + ", ".join(diff)
                for p in range(1, len(prints)) if (diff := describe_differences(prints[0], prints[p]))]
    if problems:
        raise DistributedError("the processes of this job disagree; start every process with the same code, "
                               "config and data: " + " | ".join(problems))


def initialize_from_args(args: argparse.Namespace) -> Launch:
    """``initialize`` with the flags of :func:`add_distributed_args`; in a multi-process job, then
    checks that every process got the same command line (but its ``--process-id``) and code."""
    launch = initialize(args.coordinator, args.num_processes, args.process_id,
                        verbose=getattr(args, "verbose", None) or None)
    if launch.multi:
        flags = {k: v for k, v in vars(args).items() if k != "process_id"}
        check_consistent(fingerprint({"command line": flags}))
    return launch
