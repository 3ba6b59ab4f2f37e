"""Documents packed into fixed-shape rows, and the seeded batches a run draws from them.

Packed rows keep documents apart with ``segment_ids`` (attention must not cross segments) and
``positions`` that restart at 0 per segment (RoPE sees each document as if it were alone). A
batch is a pure function of (seed, step), so resuming is exact.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from dflash.training.sources import Document


@dataclasses.dataclass(eq=False)
class PackedRows:
    """Documents packed into fixed-length rows (all arrays [N, seq_len])."""

    tokens: np.ndarray  # int32 [N, S], padding = pad_id
    loss_mask: np.ndarray  # bool [N, S], True where the token is supervised (is a label)
    segment_ids: np.ndarray  # int32 [N, S], 1..k for the k documents in the row, 0 = padding
    positions: np.ndarray  # int32 [N, S], position within its own segment (restarts at 0)

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.tokens, self.loss_mask, self.segment_ids, self.positions)}
        if len(shapes) != 1 or self.tokens.ndim != 2:
            raise ValueError(f"PackedRows arrays must share one [N, seq_len] shape, got {shapes}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "segment_ids": self.segment_ids,
                "positions": self.positions}


def pack(docs: list[Document], seq_len: int, pad_id: int) -> PackedRows:
    """Best-fit-decreasing packing of whole documents into ``seq_len`` rows.

    Documents longer than ``seq_len`` are first cut into consecutive ``seq_len`` chunks (each
    its own segment, positions restarting at 0). Pieces with no supervised token are dropped:
    segments never attend to each other, so they would only cost compute. Each piece goes to
    the open row with the least room that still fits it, which keeps padding to a few percent.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pieces: list[tuple[int, int, int]] = []  # (doc index, start, length)
    for i, d in enumerate(docs):
        n = len(d)
        for s in range(0, n, seq_len):
            e = min(s + seq_len, n)
            if d.loss_mask[s:e].any():
                pieces.append((i, s, e - s))

    order = sorted(range(len(pieces)), key=lambda j: -pieces[j][2])  # stable: deterministic ties
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free capacities among open rows
    open_rows: dict[int, list[int]] = {}  # free capacity -> row ids with exactly that much room
    for j in order:
        length = pieces[j][2]
        k = bisect.bisect_left(free_sizes, length)  # the tightest room that fits
        if k == len(free_sizes):
            r, free = len(rows), seq_len
            rows.append([])
        else:
            free = free_sizes[k]
            r = open_rows[free].pop()
            if not open_rows[free]:
                del open_rows[free]
                free_sizes.pop(k)
        rows[r].append(j)
        free -= length
        if free > 0:
            if free not in open_rows:
                bisect.insort(free_sizes, free)
                open_rows[free] = []
            open_rows[free].append(r)

    n_rows = len(rows)
    tokens = np.full((n_rows, seq_len), pad_id, dtype=np.int32)  # [N, S]
    loss_mask = np.zeros((n_rows, seq_len), dtype=bool)  # [N, S]
    segment_ids = np.zeros((n_rows, seq_len), dtype=np.int32)  # [N, S]
    positions = np.zeros((n_rows, seq_len), dtype=np.int32)  # [N, S]
    arange = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(rows):
        off = 0
        for seg, j in enumerate(members, start=1):
            i, s, length = pieces[j]
            tokens[r, off:off + length] = docs[i].ids[s:s + length]
            loss_mask[r, off:off + length] = docs[i].loss_mask[s:s + length]
            segment_ids[r, off:off + length] = seg
            positions[r, off:off + length] = arange[:length]
            off += length
    return PackedRows(tokens, loss_mask, segment_ids, positions)


class Batches:
    """Deterministic epoch-shuffled batches over PackedRows, resumable from a position.

    A batch is a pure function of (seed, step): resuming a run at step k needs no iterator
    state, only k. With ``drop_last=False`` the last batch of an epoch is smaller (a new shape
    for a jitted step); the default drops the remainder so every batch has one shape.
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        n = len(rows)
        self.steps_per_epoch: int = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} packed rows cannot fill one batch of {batch_size} (drop_last={drop_last})")
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, permutation): steps run in order

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the row order of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.rows)))
        return self._cached[1]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch at global step ``step``: each array [B, seq_len]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]  # [B]
        return {name: arr[idx] for name, arr in self.rows.arrays().items()}
