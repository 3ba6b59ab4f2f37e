"""Where training text comes from: the builtin corpus, local files or a Hub dataset, and its format.

``load_dataset`` gives every source as a ``datasets.Dataset`` (the builtin too, so it takes the
same path); the environment's offline switches (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)
are read at call time. ``DataConfig`` and ``Document`` are the types the rest of the pipeline
(``chat``, ``packing``, ``data``) shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dflash.checks import COUNT, FRACTION, INTEGER, Range, check
from dflash.errors import ConfigError
from dflash.files import first_bad_json_line
from dflash.training.tiny_corpus import stdlib_files

FORMATS = ("auto", "text", "conversations")
BUILTIN_SOURCES = ("tiny-code",)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TRUE = ("1", "ON", "YES", "TRUE")
FSSPEC_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                   "hf": "huggingface_hub"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is cut into rows."""

    source: str = "tiny-code"  # builtin name, local .jsonl/.json/.parquet file or directory, or hub id
    split: str = "train"
    format: str = "auto"  # "auto" | "text" | "conversations"
    text_field: str = "text"
    messages_field: str = "messages"
    seq_len: int = 512  # tokens per packed row
    max_examples: int = 0  # 0 = all; otherwise the first N examples of the split
    heldout_fraction: float = 0.02  # fraction of *documents* held out for eval (deterministic by seed)
    seed: int = 0
    # Data lanes (multi-host): the global batch is ``lanes`` equal slices, lane j drawing from its own
    # documents (index % lanes == j), so a process reads and tokenizes only its lanes' documents and
    # the global batches depend on ``lanes``, never on the process count (dflash.training.hostdata).
    lanes: int = 1

    def __post_init__(self) -> None:
        for name in ("source", "split", "text_field", "messages_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not one of {FORMATS}")
        check("seq_len", self.seq_len, Range(low=8, integer=True))
        check("max_examples", self.max_examples, COUNT.with_special(0, "all"))
        check("heldout_fraction", self.heldout_fraction, FRACTION)
        check("seed", self.seed, INTEGER)
        check("lanes", self.lanes, COUNT)


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """One tokenized document; ``loss_mask`` marks the tokens that are labels."""

    ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]

    def __post_init__(self) -> None:
        if self.ids.shape != self.loss_mask.shape or self.ids.ndim != 1:
            raise ValueError(f"ids {self.ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _env_offline() -> bool:
    # Read at call time: ``datasets`` / ``huggingface_hub`` snapshot these at import, so a
    # caller (or test) that sets them later would otherwise still hit the network and sit
    # through ~25 s of retries before failing.
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily force the hub libraries offline when the environment asks for it."""
    if not enabled:
        yield
        return
    import datasets.config  # deferred, like every ``datasets`` import here: it is slow to import
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything else path-like is a local source, so a typo
    # in a path is reported as a missing file rather than as an unknown dataset id.
    return (source.startswith(("/", "./", "../", "~")) or Path(source).suffix in LOCAL_SUFFIXES
            or (os.sep in source and Path(source).parent.exists()))


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder name, sorted data files) of a local file or directory."""
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(f"source {str(path)!r}: unsupported file type (use {sorted(LOCAL_SUFFIXES)})")
        return LOCAL_SUFFIXES[path.suffix], [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise ConfigError(f"source directory {str(path)!r} holds no {sorted(LOCAL_SUFFIXES)} files")
    builders = {LOCAL_SUFFIXES[p.suffix] for p in files}
    if len(builders) > 1:  # one builder per load; mixing json and parquet would mix schemas too
        raise ConfigError(f"source directory {str(path)!r} mixes json and parquet files; keep one kind")
    return builders.pop(), [str(p) for p in files]


def _remote_files(url: str) -> tuple[str, list[str]]:
    """(builder name, local copies of the sorted data files) of a remote file or directory.

    Copied with fsspec into ``$DFLASH_CACHE`` (default ``~/.cache/dflash/remote``), kept while the
    remote size is unchanged; ``datasets`` then reads local files (its own remote reads refuse to
    run under ``HF_HUB_OFFLINE``, which pods often set).
    """
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:  # fsspec knows the protocol; its backend package is missing
        package = FSSPEC_BACKENDS.get(protocol, "its fsspec backend")
        raise ConfigError(f"data source {url!r}: reading {protocol}:// paths needs the fsspec backend "
                          f"package {package!r} (pip install {package}); {err}") from err
    except ValueError as err:
        raise ConfigError(f"data source {url!r}: fsspec knows no protocol {protocol!r}") from err
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"data source {url!r} does not exist")
    found = [path] if fs.isfile(path) else sorted(p for p in fs.find(path)
                                                  if Path(p).suffix in LOCAL_SUFFIXES)
    if not found:
        raise ConfigError(f"source {url!r} holds no {sorted(LOCAL_SUFFIXES)} files")
    builders = {LOCAL_SUFFIXES.get(Path(p).suffix) for p in found}
    if len(builders) != 1 or None in builders:
        raise ConfigError(f"source {url!r}: use one kind of {sorted(LOCAL_SUFFIXES)} files")
    cache = Path(os.environ.get("DFLASH_CACHE", "~/.cache/dflash")).expanduser() / "remote"
    local = []
    for p in found:
        remote = fs.unstrip_protocol(p)
        size = fs.size(p)
        dest = cache / hashlib.sha256(remote.encode()).hexdigest()[:16] / Path(p).name
        if not dest.exists() or dest.stat().st_size != size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # hosts sharing a cache
            fs.get(p, str(partial))
            partial.replace(dest)
        local.append(str(dest))
    return builders.pop(), local


def load_dataset(cfg: DataConfig) -> Any:
    """The examples of ``cfg.source`` / ``cfg.split`` as a ``datasets.Dataset``."""
    import datasets  # deferred: only loading data needs it, and it is slow to import

    if cfg.source == "tiny-code":
        if cfg.split not in ("train", "heldout"):
            raise ConfigError(f"split={cfg.split!r}: the builtin 'tiny-code' source has 'train', 'heldout'")
        # Truncated before reading: no point reading and holding 30 MB of text.
        files = stdlib_files(cfg.split, limit=cfg.max_examples or None)
        # Through ``datasets`` like any other source, so the builtin exercises the same path.
        return datasets.Dataset.from_dict({"text": [text for _, text in files]})

    if "://" in cfg.source:  # gs://, s3://, ... through fsspec, copied to a local cache first
        builder, files = _remote_files(cfg.source)
        return _load_files(builder, files, cfg)

    path = Path(cfg.source).expanduser()
    if path.exists() or _looks_like_path(cfg.source):
        if not path.exists():
            raise FileNotFoundError(f"data source {cfg.source!r} does not exist ({path.resolve()})")
        builder, files = _local_files(path)
        try:
            return _load_files(builder, files, cfg)
        except ConfigError:
            raise
        except ValueError as e:  # e.g. a bad split slice
            raise ConfigError(f"could not load {cfg.source!r} split {cfg.split!r}: {e}") from e

    offline = _env_offline()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(cfg.source, split=cfg.split)
    except Exception as e:  # hub errors come as many types (ConnectionError, FileNotFoundError, ...)
        why = ("is not available offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and is not cached"
               if offline else "could not be loaded from the Hub (unknown id, network failure, not cached)")
        raise ConfigError(f"dataset id {cfg.source!r} (split {cfg.split!r}) {why}: {e}") from e


def _load_files(builder: str, files: list[str], cfg: DataConfig) -> Any:
    """The data files as one split named after ``cfg.split`` (so slices like "train[:100]" work). A
    file ``datasets`` cannot read is a ``ConfigError`` naming it, and the line for malformed JSON."""
    import datasets

    quiet = logging.getLogger("datasets")  # its builder logs the error we report below, in its words
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return datasets.load_dataset(builder, data_files={cfg.split.split("[", 1)[0]: files}, split=cfg.split)
    except datasets.exceptions.DatasetGenerationError as err:  # what the builder raises on bad data
        bad = first_bad_json_line(files)
        where = (f"{bad[0]}, line {bad[1]}: not valid JSON ({bad[2]}); fix or remove that line" if bad else
                 f"{', '.join(files)}: {err.__cause__ or err}; fix the data file")
        raise ConfigError(f"data source {cfg.source!r}: {where}") from err
    finally:
        quiet.level = level


def resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    """The format of ``cfg``'s dataset: ``auto`` picks by the columns present."""
    if cfg.format == "auto":
        if cfg.messages_field in columns:
            return "conversations"
        if cfg.text_field in columns:
            return "text"
        raise ConfigError(f"format='auto': dataset {cfg.source!r} has neither messages_field="
                          f"{cfg.messages_field!r} nor text_field={cfg.text_field!r}; columns: {columns}")
    field = cfg.messages_field if cfg.format == "conversations" else cfg.text_field
    name = "messages_field" if cfg.format == "conversations" else "text_field"
    if field not in columns:
        raise ConfigError(f"format={cfg.format!r}: {name}={field!r} is not a column of dataset "
                          f"{cfg.source!r}; columns: {columns}")
    return cfg.format
