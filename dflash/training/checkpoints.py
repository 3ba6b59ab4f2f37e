"""Orbax checkpoints of a drafter run and the policy for resuming one.

A checkpoint holds the (drafter, optimizer) state and JSON metadata (step, best τ, history,
data position). The exporter reads checkpoints through ``Checkpoints`` too, so this module
imports nothing of the training loop.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml

from dflash.configio import flatten, from_dict, to_dict
from dflash.distributed import everywhere, host_local, is_primary
from dflash.errors import DISK_ERRORS, CheckpointError, ConfigError, DamagedCheckpointError, TrainingError
from dflash.training.config import ExperimentConfig

# What Orbax raises for a checkpoint it cannot read, measured on orbax-checkpoint 0.12.8 by damaging
# every file of a single-process and of an 8-device checkpoint in turn (truncated, zeroed, deleted,
# garbled; tests/test_accidents.py): garbage or truncated JSON metadata -> JSONDecodeError (a
# ValueError); a damaged OCDBT manifest or top-level data file -> tensorstore's ValueError; a missing
# item -> KeyError; missing files -> FileNotFoundError; a missing, truncated or zeroed array-data file ->
# a bare ``Exception`` (``_ORBAX_READ_FAILURE``) whose cause is tensorstore's ValueError. Garbled array
# bytes read back without any error (the data files carry no checksum): ``checksums`` catches those.
# Anything else (out of memory, sharding, a bug) keeps its own type and traceback.
CORRUPT_CHECKPOINT_ERRORS = (ValueError, KeyError, OSError)
_ORBAX_READ_FAILURE = "Encountered error while reading array index"


def is_damage(err: BaseException) -> bool:
    """Whether ``err``, raised by an Orbax restore, says a checkpoint file is damaged or missing."""
    if isinstance(err, CORRUPT_CHECKPOINT_ERRORS):
        return True
    return (type(err) is Exception and str(err).startswith(_ORBAX_READ_FAILURE)
            and err.__cause__ is not None and is_damage(err.__cause__))


class Checkpoints:
    """Orbax manager keeping the last ``keep_last`` steps plus the best by eval tau.

    ``owner``: the run's own writer, which removes the temporary directories a killed save left
    behind (a reader such as the exporter must not: the run may be saving right now).
    """

    def __init__(self, directory: Path, keep_last: int, *, owner: bool = False):
        self.directory = directory
        self.keep_last = keep_last
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=owner)
        self.manager = ocp.CheckpointManager(directory.resolve(), options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``step`` with ``meta`` plus the checksums of ``state`` and of ``meta`` itself (both
        verified on restore)."""
        meta = {**meta, "checksums": checksums(state)}
        meta["digest"] = _digest(meta)
        self._check_space(step, state)
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as err:  # a full disk is the environment's: the half-written step goes
            code = _disk_errno(err)
            if code is None:
                raise
            if is_primary():
                for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            raise OSError(code, os.strerror(code), str(self.directory / str(step))) from err
        keep = set(self.steps()[-self.keep_last:])
        if meta.get("best_step") is not None:
            keep.add(int(meta["best_step"]))
        for old in self.steps():
            if old not in keep:
                self.manager.delete(old)

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses a save the disk cannot hold (the size of the newest step, or of the arrays for a
        first one), before Orbax's writer threads fail one by one; on every process alike."""
        steps = self.steps()
        need = (sum(f.stat().st_size for f in (self.directory / str(steps[-1])).rglob("*") if f.is_file())
                if steps else sum(x.nbytes for x in jax.tree.leaves(state)))
        free = shutil.disk_usage(self.directory).free
        if not everywhere(free >= 1.1 * need + 2**20):
            raise OSError(errno.ENOSPC, f"no space left for checkpoint step {step} (about "
                          f"{need / 1e6:.1f} MB; {free / 1e6:.1f} MB free)", str(self.directory))

    def restore(self, step: int, abstract_state: Any = None, *,
                state: bool = True) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step``, onto the shardings of ``abstract_state`` (any mesh). Without
        it the state comes back as Orbax's raw tree on this process's first device (dicts of
        arrays: for readers such as the exporter); ``state=False`` reads the metadata only.
        A damaged step is a ``DamagedCheckpointError``."""
        restored, meta = self._restore(step, abstract_state, state=state)
        return restored, {k: v for k, v in meta.items() if k not in _INTEGRITY}

    def _restore(self, step: int, abstract_state: Any = None, *,
                 state: bool = True) -> tuple[Any, dict[str, Any]]:
        """``restore`` with the metadata as saved, checksums included."""
        args = {"meta": ocp.args.JsonRestore()}
        with self._reading(step):
            if state:
                args["state"] = ocp.args.StandardRestore(abstract_state if abstract_state is not None
                                                         else self.local_target(step))
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = restored["meta"]
        if ("digest" in meta or "checksums" in meta) and meta.get("digest") != _digest(meta):
            mismatch = CheckpointError("its metadata does not match the digest saved with it")
            raise self.unreadable(step, mismatch, file=str(self.directory / str(step) / "meta" / "metadata"))
        if state:
            self._verify(step, restored["state"], meta)
        return (restored["state"] if state else None), meta

    def latest_meta(self) -> dict[str, Any]:
        """The metadata of the newest checkpoint whose metadata reads ({} when there is none); no
        arrays are read. A damaged newer step is left to ``restore_latest`` to report."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, state=False)[1]
            except DamagedCheckpointError:
                continue
        return {}

    def restore_subtree(self, step: int, item: dict[str, Any]) -> dict[str, Any]:
        """Only the part of the saved state that ``item`` (a raw tree of ``ShapeDtypeStruct``)
        names, e.g. the drafter's parameters without the optimizer moments an export never needs."""
        fresh = Checkpoints(self.directory, self.keep_last)  # a manager is bound to one restore kind
        # Read onto the shardings of ``item`` (this process's first device where it names none): the
        # saved ones may name another mesh's or process count's devices.
        item = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_first_device()), item)
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        with self._reading(step):
            restored = fresh.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, partial_restore=True, restore_args=restore_args)))["state"]
        try:  # the checksums are in the metadata: without it the arrays cannot be checked, only read
            meta = self._restore(step, state=False)[1]
        except DamagedCheckpointError:
            meta = {}
        self._verify(step, restored, meta)
        return restored

    def local_target(self, step: int) -> Any:
        """The saved state's shapes and dtypes on this process's first device: a raw restore that
        works whatever mesh (however many devices) wrote the checkpoint."""
        saved = ocp.StandardCheckpointer().metadata(self.directory.resolve() / str(step) / "state")
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_first_device()),
                            saved.item_metadata.tree)

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Orbax's errors for damaged files (``is_damage``) become a ``DamagedCheckpointError``.

        A failed read abandons Orbax's other reads of that step: collected, their coroutines report
        the same damage again, and reads still running in tensorstore's threads report "Event loop
        is closed" when they finish (some before this handler runs); each as a traceback on stderr.
        ``_quiet_abandoned_reads`` drops those two reports (only those), and the coroutines are
        collected here at once.
        """
        _quiet_abandoned_reads()
        try:
            yield
        except Exception as err:
            if not is_damage(err):
                raise
            gc.collect()
            raise self.unreadable(step, err) from err

    def _verify(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """The restored arrays against the checksums saved with them (checkpoints older than the
        checksums have none; only the arrays read are checked)."""
        saved = meta.get("checksums") or {}
        got = checksums(state)
        bad = sorted(name for name in got.keys() & saved.keys() if got[name] != saved[name])
        if bad:
            raise self.unreadable(step, CheckpointError(
                f"array {bad[0]} does not match the checksum saved with it"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")), file=f"array {bad[0]}")

    def unreadable(self, step: int, err: BaseException, *, file: str | None = None) -> DamagedCheckpointError:
        """A line a user can act on: the step, the damaged file and Orbax's root cause.

        Orbax's own message holds the whole TensorStore spec (hundreds of lines); it stays in the
        exception chain (``--verbose``), and only its root cause is quoted here.
        """
        cause = _root_cause(err)
        file = file or _damaged_file(self.directory / str(step), cause)
        cause = re.sub(r'Error reading "[^"]+" in OCDBT database at local file "[^"]+": ', "", cause)
        return DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {file}: "
                                      f"{cause}", step=step, file=file)

    def previous_good_step(self, step: int) -> int | None:
        """The latest kept step before ``step`` whose state restores, if any."""
        for earlier in reversed([s for s in self.steps() if s < step]):
            try:
                self.restore(earlier)
                return earlier
            except DamagedCheckpointError:  # unreadable too: look further back
                continue
        return None


def checksums(state: Any) -> dict[str, int]:
    """One number per array of ``state``, by its Orbax name (``0.fc.kernel.value``): garbled bytes in
    an array-data file read back without an error, and only this tells."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    sums = host_local(_checksum_arrays([x for _, x in leaves]))
    return {_orbax_name(path): int(np.asarray(s)) for (path, _), s in zip(leaves, sums, strict=True)}


def _disk_errno(err: BaseException) -> int | None:
    """The file-system error (``DISK_ERRORS``) behind a failed save, if that is what it is: an
    ``OSError``, or tensorstore's ValueError ``... [os_error_code='28']``."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            return err.errno
        code = re.search(r"os_error_code='(\d+)'", str(err)) if isinstance(err, ValueError) else None
        if code and int(code.group(1)) in DISK_ERRORS:
            return int(code.group(1))
        err = err.__cause__ or err.__context__
    return None


_INTEGRITY = ("checksums", "digest")  # saved beside a step's metadata, never handed back with it


def _digest(meta: dict[str, Any]) -> str:
    """Of the metadata but its ``digest``: a garbled byte can leave JSON that still parses."""
    body = json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@jax.jit
def _checksum_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    return [_checksum(x) for x in arrays]


def _checksum(x: jax.Array) -> jax.Array:
    """Sum of (bits of element i) * (2i + 1) mod 2^32: any changed element changes it (odd weights),
    so do moved ones, and an integer sum does not depend on how a sharded reduction is split."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
    bits = bits.astype(jnp.uint32)  # 8-byte elements: a trailing axis of 2 words
    strides = np.cumprod((1, *bits.shape[::-1]))[-2::-1] if bits.ndim else ()
    index = jnp.zeros(bits.shape, jnp.uint32)
    for axis, stride in enumerate(strides):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def _orbax_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _quiet_abandoned_reads() -> None:
    """From the first restore on, drop the unraisable-exception reports of reads a damaged restore
    abandoned: the damage itself (reported once, by the restore) and "Event loop is closed" from reads
    finishing after Orbax closed its event loop. Anything else is still reported. Installed once."""
    default = sys.unraisablehook
    if getattr(default, "dflash_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        err = unraisable.exc_value
        closed = isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
        damage = type(err) is Exception and str(err).startswith(_ORBAX_READ_FAILURE)
        if not (closed or damage):
            default(unraisable)

    hook.dflash_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _first_device() -> jax.sharding.SingleDeviceSharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _root_cause(err: BaseException, limit: int = 300) -> str:
    """The innermost message of an exception chain, on one line, at most ``limit`` characters."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)):
        chain.append(nxt)
    text = next((str(e) for e in reversed(chain) if str(e).strip()), type(err).__name__)
    line = " ".join(re.split(r"\[tensorstore_spec", text)[0].split())
    return line if len(line) <= limit else line[:limit] + " ..."


# Orbax's JSON files of a step: a garbled one gives a JSONDecodeError that names no file.
_JSON_FILES = ("state/_METADATA", "state/array_metadatas", "meta/metadata", "_CHECKPOINT_METADATA")


def _damaged_file(step_dir: Path, cause: str) -> str:
    """The file ``cause`` is about: the OCDBT database and array tensorstore names, else the first of
    the step's JSON files that does not parse, else the step directory."""
    where = re.search(r'"([^"]+)" in OCDBT database at local file "([^"]+)"', cause)
    if where:
        return f"{where.group(2)} (array {where.group(1)})"
    named = re.search(re.escape(str(step_dir.resolve())) + r"""[^\s"':]*""", cause)
    if named:
        return named.group(0)
    for name in _JSON_FILES:
        for path in sorted((step_dir / name).rglob("*")) if (step_dir / name).is_dir() else [step_dir / name]:
            if not path.is_file():
                continue
            try:
                json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError):
                return str(path)
    return str(step_dir)


# Keys a resumed run may change: they steer logging, checkpoint cadence, the mesh (same loss on
# any mesh, within float rounding; checkpoints restore onto any mesh) and the final report, never
# the parameters. Any other change would break "resume continues exactly" and is refused.
RESUME_FREE_KEYS = frozenset({
    "run_dir", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "train.num_devices", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.replicate_indivisible",
    "eval.num_prompts", "eval.max_new_tokens", "eval.prompt_tokens"})


def has_checkpoints(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def decide_resume(run_dir: Path, cfg: ExperimentConfig, resume: bool | None, *, extend: bool = False) -> bool:
    """Whether the run resumes: ``resume=None`` does when ``run_dir`` holds checkpoints.

    Refuses to resume without checkpoints, to start over existing ones, and to resume with a
    config that differs from the saved one (``check_resume_config``).
    """
    has_ckpt = has_checkpoints(run_dir)
    if resume is None:
        resume = has_ckpt
    if resume and not has_ckpt:
        raise TrainingError(f"--resume: no checkpoint to resume from in {run_dir / 'checkpoints'}")
    if not resume and has_ckpt:
        raise TrainingError(f"{run_dir} already holds checkpoints; resume it or choose a new run_dir "
                            "(refusing to overwrite them)")
    if extend and not resume:
        raise TrainingError(f"--extend continues a run, and {run_dir} holds no checkpoint to continue")
    if resume:
        check_resume_config(run_dir, cfg, extend=extend)
    return resume


# Keys ``--extend`` may change as well: the length of the run.
EXTEND_KEYS = frozenset({"train.steps", "train.epochs"})


def check_resume_config(run_dir: Path, cfg: ExperimentConfig, *, extend: bool = False) -> None:
    """A resumed run must use the config it was started with (up to ``RESUME_FREE_KEYS``, and
    ``EXTEND_KEYS`` when extending)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is missing")
    try:
        saved = flatten(to_dict(from_dict(ExperimentConfig, yaml.safe_load(path.read_text()) or {})))
    except (yaml.YAMLError, ConfigError) as err:  # unparsable, or keys / values from_dict refuses
        raise TrainingError(f"cannot resume {run_dir}: its config.yaml is unreadable ({err})") from err
    new = flatten(to_dict(cfg))
    free = RESUME_FREE_KEYS | (EXTEND_KEYS if extend else frozenset())
    diffs = [f"{key}: {saved.get(key)!r} -> {new.get(key)!r}" for key in sorted(saved.keys() | new.keys())
             if key not in free and saved.get(key) != new.get(key)]
    if diffs:
        longer = ("; to train longer on the same run, raise train.steps and pass --extend"
                  if not extend and {d.split(":")[0] for d in diffs} <= EXTEND_KEYS else "")
        raise TrainingError(f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
                            f"resume with the settings it was started with, or start a new run_dir{longer}")
