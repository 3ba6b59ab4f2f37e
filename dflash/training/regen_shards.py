"""Output shards of a regeneration job: split over processes, written as they finish, resumable.

Layout next to the output file ``OUT``: ``OUT.shards/manifest.json`` (the job's settings and
shard count, written once by process 0) and ``OUT.shards/shard-NNNNN.jsonl``, each written to a
temporary name and renamed when whole, so an existing shard file is a finished shard. A rerun
with the same settings skips finished shards; with other settings it is refused (the shards
would mix two jobs). Shard ``k`` belongs to process ``k mod P``; the shard contents do not depend
on ``P``, so neither does the joined output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from dflash.distributed import is_primary, sync_processes
from dflash.errors import ConfigError


@dataclasses.dataclass
class ShardPlan:
    out: Path
    directory: Path
    num_items: int
    shard_size: int

    @classmethod
    def open(cls, out: Path, num_items: int, shard_size: int, settings: dict[str, Any]) -> ShardPlan:
        """Creates (process 0) or checks the manifest; every process returns the same plan."""
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
        directory = out.with_name(out.name + ".shards")
        manifest = {"settings": settings, "num_items": num_items, "shard_size": shard_size}
        path = directory / "manifest.json"
        if is_primary() and not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"manifest.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            tmp.replace(path)
        sync_processes("dflash regen manifest")
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(manifest, sort_keys=True)):
            diff = sorted(k for k in saved["settings"].keys() | settings.keys()
                          if saved["settings"].get(k) != settings.get(k))
            diff += [k for k in ("num_items", "shard_size") if saved[k] != manifest[k]]
            raise ConfigError(f"{directory} holds shards of a regeneration with other settings "
                              f"({', '.join(diff)}); rerun with those settings to resume it, or remove the "
                              "directory to start over")
        return cls(out, directory, num_items, shard_size)

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.jsonl"

    def done(self) -> list[int]:
        return [k for k in range(self.num_shards) if self.shard_path(k).exists()]

    def todo(self) -> list[int]:
        """This process's unfinished shards."""
        me, n = jax.process_index(), jax.process_count()
        return [k for k in range(me, self.num_shards, n) if not self.shard_path(k).exists()]

    def write(self, shard: int, dataset: Any) -> None:
        """Writes one finished shard (a ``datasets.Dataset``) atomically."""
        tmp = self.shard_path(shard).with_suffix(f".{os.getpid()}.tmp")
        dataset.to_json(str(tmp), lines=True)
        tmp.replace(self.shard_path(shard))

    @contextlib.contextmanager
    def progress(self, enabled: bool) -> Iterator[Callable[[], None]]:
        """A bar on process 0 over all processes' shards (counted on the shared output directory)."""
        bar = tqdm(total=self.num_shards, initial=len(self.done()), desc="regenerate (shards)", unit="shard",
                   disable=not (enabled and is_primary()), dynamic_ncols=True)
        started, longest = time.monotonic(), 0.0

        def advance() -> None:
            nonlocal started, longest
            longest, started = max(longest, time.monotonic() - started), time.monotonic()
            bar.n = len(self.done())
            bar.refresh()

        try:
            yield advance
            if not bar.disable and jax.process_count() > 1:
                self._follow_peers(bar, stall_s=max(600.0, 3 * longest))
        finally:
            bar.close()

    def _follow_peers(self, bar: Any, stall_s: float, poll_s: float = 2.0) -> None:
        """Process 0, done with its own shards, keeps its bar moving with the other hosts' until
        all are written; it stops watching (and goes on to the barrier) after ``stall_s`` without
        a new shard, so a failed peer costs a bounded wait, never a hang of its own."""
        last_change = time.monotonic()
        while bar.n < self.num_shards and time.monotonic() - last_change < stall_s:
            time.sleep(poll_s)
            n = len(self.done())
            if n != bar.n:
                bar.n, last_change = n, time.monotonic()
                bar.refresh()

    def finish(self) -> int:
        """After every process: process 0 joins the shards in order into the output file."""
        sync_processes("dflash regen shards done")
        if is_primary():
            missing = [k for k in range(self.num_shards) if not self.shard_path(k).exists()]
            if missing:
                raise ConfigError(f"regeneration shards {missing} are missing in {self.directory}")
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            with open(tmp, "wb") as f:
                for k in range(self.num_shards):
                    f.write(self.shard_path(k).read_bytes())
            tmp.replace(self.out)
        sync_processes("dflash regen joined")
        return self.num_items
