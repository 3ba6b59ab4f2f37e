"""Per-host training data: each process reads, tokenizes and feeds only its share of the batch.

The global batch of ``B`` rows is ``L = data.lanes`` equal slices ("lanes"). Lane ``j`` owns the
training documents whose dataset index is ``j mod L``, packs them on its own and draws its
``B / L`` rows per step from its own seeded epoch shuffle (``Batches``). So the global batch at
step ``s`` is a pure function of (data, seed, L, s): the same whether one process builds all
lanes or P processes each build ``L / P`` of them, and a checkpoint's data position (the global
step) resumes on any process count that the lanes fit. With ``L = 1`` this is exactly the
single-process ``Batches`` of all documents.

A process's lanes follow from the batch sharding: the rows its devices hold must be whole lanes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dflash.errors import ConfigError
from dflash.training.data import Batches, DataConfig, Document, PackedRows, load_lane_documents, pack


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """[lo, hi) of the leading (batch) dimension held by this process's devices; must be contiguous."""
    spans = sorted({(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map(global_shape).values()})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    covered = np.zeros(hi - lo, dtype=bool)
    for a, b in spans:
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise ConfigError(f"this process's devices hold batch rows {spans}, not one contiguous block; build "
                          "the mesh with the data axes outermost and the processes' devices in order")
    return lo, hi


def process_lanes(sharding: jax.sharding.Sharding, batch_size: int, seq_len: int, lanes: int) -> list[int]:
    """The data lanes this process feeds: those its batch rows span (whole lanes only)."""
    if batch_size % lanes:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by data.lanes={lanes}")
    per_lane = batch_size // lanes
    lo, hi = process_rows(sharding, (batch_size, seq_len))
    if lo % per_lane or hi % per_lane:
        parts = batch_size // (hi - lo)
        raise ConfigError(
            f"this process feeds batch rows [{lo}, {hi}) of {batch_size}, which cut through data lanes of "
            f"{per_lane} rows (data.lanes={lanes}); set data.lanes to a multiple of {parts} (the job's "
            "batch slices) so every process reads only its own documents: the global batches depend on "
            "data.lanes, never on the process count")
    return list(range(lo // per_lane, hi // per_lane))


class LaneBatches:
    """Global batches assembled from data lanes, of which this process holds ``held``.

    ``lane_sizes`` is the packed-row count of every lane (all processes agree on it: see
    ``gather_lane_sizes``); it fixes ``steps_per_epoch`` (of the smallest lane) everywhere.
    """

    def __init__(self, lane_rows: Mapping[int, PackedRows], lanes: int, batch_size: int, seed: int,
                 lane_sizes: Sequence[int]):
        if batch_size % lanes:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by data.lanes={lanes}")
        self.lanes, self.batch_size, self.per_lane = lanes, batch_size, batch_size // lanes
        self.held = sorted(lane_rows)
        short = [j for j, n in enumerate(lane_sizes) if n < self.per_lane]
        if short:
            raise ConfigError(f"data lanes {short} pack into fewer than the {self.per_lane} rows one batch "
                              f"takes from each lane (lane sizes {list(lane_sizes)}): more data, or fewer "
                              "data.lanes")
        self.steps_per_epoch = min(n // self.per_lane for n in lane_sizes)
        # One lane: the plain Batches of all rows (single-process runs are unchanged by this module).
        self._lanes = {j: Batches(rows, self.per_lane, seed=seed if lanes == 1 else _lane_seed(seed, j))
                       for j, rows in lane_rows.items()}

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at ``step``: its lanes in order, each [B / L, S]."""
        parts = [self._lanes[j].batch(step) for j in self.held]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The whole global batch (only when this process holds every lane)."""
        if len(self.held) != self.lanes:
            raise ValueError(f"this process holds lanes {self.held} of {self.lanes}, not the whole batch")
        return self.local_batch(step)


def _lane_seed(seed: int, lane: int) -> int:
    return int(np.random.SeedSequence((seed, lane)).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_lane_rows(cfg: DataConfig, tokenizer: Any, lanes: Sequence[int],
                   pad_id: int) -> tuple[dict[int, PackedRows], list[Document]]:
    """({lane: its packed rows} for ``lanes``, held-out documents): tokenizes only those lanes."""
    by_lane, heldout = load_lane_documents(cfg, tokenizer, lanes)
    return {j: pack([d for _, d in docs], cfg.seq_len, pad_id) for j, docs in by_lane.items()}, heldout


def gather_lane_sizes(lane_rows: Mapping[int, PackedRows], lanes: int) -> list[int]:
    """Row counts of all ``lanes`` lanes, each process contributing the ones it holds."""
    sizes = np.zeros(lanes, dtype=np.int64)
    for j, rows in lane_rows.items():
        sizes[j] = len(rows)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sizes = np.asarray(multihost_utils.process_allgather(sizes)).max(axis=0)  # [P, L] -> [L]
    return [int(n) for n in sizes]


def global_batch(sharding: jax.sharding.Sharding, local: Mapping[str, np.ndarray],
                 batch_size: int) -> dict[str, jax.Array]:
    """The global arrays [B, ...] of which ``local`` holds this process's rows."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in local.items()}


def full_batch(sharding: jax.sharding.Sharding, full: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays of rows every process holds in full (held-out rows), laid out per ``sharding``."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in full.items()}
