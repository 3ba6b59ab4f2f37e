"""A run's scalars: TensorBoard events (tensorboardX) and a plain ``RUN_DIR/scalars.csv``.

The CSV (``step,tag,value`` rows) is what reports and notebooks read, with no TensorBoard
reader needed. It is resume-safe: opening the log at a checkpoint's step drops the rows a
killed run wrote after that step, since the resumed run writes them again (identically: resume
is exact), so every (step, tag) appears once. Acceptance histograms go to TensorBoard as
histograms and to the CSV as one count per length (``<tag>/len_<k>``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dflash.training.accidents import write_text

FIELDS = ("step", "tag", "value")
Listener = Callable[[int, Mapping[str, float]], None]


class ScalarLog:
    """Writes scalars and histograms of one run from ``start_step`` on (0: a fresh run)."""

    def __init__(self, run_dir: str | Path, start_step: int = 0, *, on_write: Listener | None = None,
                 tensorboard: bool = True):
        self.path = Path(run_dir) / "scalars.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _rows(self.path) if int(r["step"]) <= start_step] if start_step else []
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        write_text(self.path, text.getvalue())  # rows past start_step dropped; the old file until then
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (closed by close())
        self._csv = csv.writer(self._file)
        self.on_write = on_write
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One value per tag at ``step``; ``on_write`` (e.g. a notebook's live plot) sees them too."""
        for tag, value in values.items():
            self._csv.writerow((step, tag, repr(float(value))))
            if self.writer is not None:
                self.writer.add_scalar(tag, float(value), step)
        self._file.flush()
        if self.on_write is not None:
            self.on_write(step, values)

    def histogram(self, tag: str, counts: Sequence[int], step: int) -> None:
        """``counts[k - 1]``: how many blocks (or verify steps) accepted k tokens, k = 1 .. K."""
        counts = np.asarray(counts, dtype=np.int64)
        lengths = np.arange(1, len(counts) + 1)
        if self.writer is not None and counts.sum() > 0:
            seen = lengths[counts > 0]
            self.writer.add_histogram_raw(
                tag, min=float(seen.min()), max=float(seen.max()), num=int(counts.sum()),
                sum=float((counts * lengths).sum()), sum_squares=float((counts * lengths**2).sum()),
                bucket_limits=(lengths + 0.5).tolist(), bucket_counts=counts.tolist(), global_step=step)
        for k, c in zip(lengths, counts, strict=True):
            self._csv.writerow((step, f"{tag}/len_{k}", repr(float(c))))
        self._file.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        self._file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self._file.close()


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:  # a row cut by a crash or a full disk is left out
        return [r for r in csv.DictReader(f) if r.get("value") not in (None, "")]


def read_scalars(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``scalars.csv`` (or the run directory holding it) -> tag -> ``(steps, values)``, by step."""
    path = Path(path)
    if path.is_dir():
        path = path / "scalars.csv"
    series: dict[str, list[tuple[int, float]]] = {}
    for r in _rows(path):
        series.setdefault(r["tag"], []).append((int(r["step"]), float(r["value"])))
    out = {}
    for tag, points in series.items():
        points.sort()
        out[tag] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return out


def histogram_counts(scalars: Mapping[str, tuple[np.ndarray, np.ndarray]], tag: str,
                     step: int | None = None) -> np.ndarray:
    """The counts a ``histogram(tag, ...)`` call wrote at ``step`` (default: its last step)."""
    prefix = f"{tag}/len_"
    names = sorted((n for n in scalars if n.startswith(prefix)), key=lambda n: int(n[len(prefix):]))
    if not names:
        return np.zeros(0, np.int64)
    steps = scalars[names[0]][0]
    at = int(steps[-1]) if step is None else step
    values = []
    for n in names:
        s, v = scalars[n]
        hit = np.flatnonzero(s == at)
        if not hit.size:
            raise ValueError(f"{n} has no value at step {at}")
        values.append(v[hit[0]])
    return np.asarray(values).astype(np.int64)
