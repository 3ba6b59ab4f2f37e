"""Accidents (docs/design.md §10, "Errors"): each is one line naming the step or the path and what to
do, and nothing already written is lost.

- A damaged newest checkpoint, file by file: resume and export fall back to the previous good step.
  The damage modes are the distinct failures found by damaging every file of a single-process and
  of an 8-device checkpoint in turn (truncated, zeroed, deleted, garbled); files whose damage Orbax
  never reads (commit markers, stale OCDBT pieces) are left out.
- Ctrl-C during a step or a save: the step is saved, and the rerun ends equal to an uninterrupted run.
- A read-only or full disk, an uncreatable run directory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from devices import on_cpu_devices
from jax.sharding import NamedSharding, PartitionSpec

from dflash.errors import CheckpointError
from dflash.export.from_run import export_checkpoint
from dflash.training.checkpoints import Checkpoints
from dflash.training.recovery import restore_latest

# name: (files of the newest step, relative to it; how they are damaged; what the report names)
DAMAGES = {
    "array data truncated": ("state/**/d/*", "truncate", "state/ (array "),
    "array data zeroed": ("state/**/d/*", "zero", "state/ (array "),
    "array data deleted": ("state/**/d/*", "delete", "state/ (array "),
    "array index deleted": ("state/manifest.ocdbt", "delete", "state/ (array "),
    "array metadata garbled": ("state/_METADATA", "garble", "state/_METADATA"),
    # A garbled byte inside array data reads back without any error from Orbax: stand-in, another
    # step's (well-formed) arrays under this step's name; only the saved checksums tell.
    "array bytes changed": ("state", "replace", "does not match the checksum"),
    "step metadata truncated": ("meta/metadata", "truncate", "meta/metadata"),
    "step metadata garbled": ("meta/metadata", "garble", "meta/metadata"),  # still parses: the digest
}


def damage(step_dir: Path, pattern: str, how: str) -> None:
    files = sorted(step_dir.glob(pattern))
    assert files, pattern
    for f in files:
        if how == "delete":
            f.unlink()
        elif how == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        elif how == "zero":
            f.write_bytes(bytes(f.stat().st_size))
        elif how == "garble":  # a few bytes flipped in the middle: the JSON may still parse
            data = bytearray(f.read_bytes())
            middle = len(data) // 3
            data[middle:middle + 6] = bytes(b ^ 0x5A for b in data[middle:middle + 6])
            f.write_bytes(bytes(data))
        elif how == "replace":  # the previous step's arrays
            shutil.rmtree(f)
            shutil.copytree(step_dir.parent / "2" / f.name, f)


def make_run(run_config, target, run: Path, *extra: str) -> Path:
    from dflash.training.trainer import run_training

    run_training(run_config(target, run, *extra), progress=False, final_eval=False, stop_after=4)
    assert Checkpoints(run / "checkpoints", 2).steps() == [2, 4]
    return run


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, run_config, tiny_target) -> Path:
    """A tiny run with checkpoints at steps 2 and 4 (made once; each test damages a copy)."""
    return make_run(run_config, tiny_target, tmp_path_factory.mktemp("damage") / "run")


@contextlib.contextmanager
def dflash_warnings() -> Iterator[list[str]]:
    """The messages of the warnings dflash logs meanwhile."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("dflash")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def check_fallback(good: Path, work: Path, mode: str, abstract) -> None:
    """Step 4 damaged by ``mode``: resume restores step 2, logs one line naming step 4 and the file
    and moves step 4 aside; export of the latest step writes step 2 and names step 4 (or step 4
    itself where only the metadata, which an export does not read, is damaged)."""
    pattern, how, named = DAMAGES[mode]
    shutil.copytree(good, work / "run")
    damage(work / "run" / "checkpoints" / "4", pattern, how)
    shutil.copytree(work / "run", work / "copy")  # the export reads an unmoved copy
    ckpts = Checkpoints(work / "run" / "checkpoints", 2)
    assert ckpts.latest_meta()["step"] == (2 if pattern.startswith("meta") else 4)
    with dflash_warnings() as messages:
        state, meta, step = restore_latest(ckpts, abstract)
    assert (step, meta["step"]) == (2, 2)
    expected = Checkpoints(good / "checkpoints", 2).restore(2, abstract)[0]
    jax.tree.map(np.testing.assert_array_equal, state, expected)
    first, last = messages[0], messages[-1]
    assert first.startswith("checkpoint step 4 in ") and " is damaged: " in first and named in first, first
    assert "\n" not in first and "tensorstore_spec" not in first and len(first) < 600, first
    assert last.startswith("resumed from checkpoint step 2") and "checkpoints-damaged" in last, last
    assert ckpts.steps() == [2]

    info = export_checkpoint(work / "out", run_dir=work / "copy")
    if pattern.startswith("meta"):
        assert (info["step"], info["damaged_steps"]) == (4, [])
    else:
        assert info["step"] == 2 and len(info["damaged_steps"]) == 1, info
        line = info["damaged_steps"][0]
        assert line.startswith("checkpoint step 4 in ") and named in line


@pytest.mark.parametrize("mode", list(DAMAGES))
def test_a_damaged_newest_step_falls_back_on_resume_and_export(good_run, tmp_path, mode):
    abstract = Checkpoints(good_run / "checkpoints", 2).local_target(2)
    check_fallback(good_run, tmp_path, mode, abstract)


def test_an_explicit_damaged_step_is_an_error_naming_the_previous_good_one(good_run, tmp_path):
    shutil.copytree(good_run, tmp_path / "run")
    damage(tmp_path / "run" / "checkpoints" / "4", *DAMAGES["array data truncated"][:2])
    with pytest.raises(CheckpointError) as err:
        export_checkpoint(tmp_path / "out", run_dir=tmp_path / "run", step="4")
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("checkpoint step 4 in ") and "state/ (array " in lines[0]
    assert f"the previous good step is 2: export it with `dflash-export --run {tmp_path / 'run'} --step 2" \
        in lines[1]
    assert not (tmp_path / "out").exists()


def test_train_extend_and_export_on_a_truncated_array_file(good_run, tmp_path, capsys, run_config,
                                                           tiny_target):
    """The reported case: a few lines, the fallback, and the run goes on."""
    from dflash.cli import export as export_cli
    from dflash.training.trainer import run_training

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage(run / "checkpoints" / "4", *DAMAGES["array data truncated"][:2])
    assert export_cli.main(["--run", str(run), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dflash-export: checkpoint step 4 in ") and err[0].endswith("; skipped")
    assert err[1:] == ["dflash-export: exported step 2, the newest that restores"]

    with dflash_warnings() as messages:
        run_training(run_config(tiny_target, run, "train.steps=6"), extend=True, progress=False,
                     final_eval=False, export=False)
    assert len(messages) == 2, messages
    assert messages[0].startswith("checkpoint step 4 in ") and "state/ (array " in messages[0]
    assert messages[1].startswith("resumed from checkpoint step 2, the newest that restores; the damaged "
                                  "step 4 moved to ")
    assert f"resuming {run} from step 2 of 6" in capsys.readouterr().out.splitlines()
    assert Checkpoints(run / "checkpoints", 2).steps()[-1] == 6


@on_cpu_devices(8)
def test_a_damaged_sharded_checkpoint_falls_back_on_resume_and_export():
    import io
    import tempfile

    from conftest import make_tiny_target, tiny_run_config

    from dflash.sharding import MeshConfig, make_mesh

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mesh = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
        good = make_run(tiny_run_config, make_tiny_target(tmp / "target"), tmp / "good", *mesh)
        mesh8 = make_mesh(MeshConfig(data=2, fsdp=4), jax.devices())  # another mesh than the writer's
        raw = Checkpoints(good / "checkpoints", 2).local_target(2)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh8, PartitionSpec("fsdp") if x.ndim and x.shape[0] % 4 == 0 else PartitionSpec())), raw)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):  # a damaged restore's abandoned reads print nothing
            for mode in ("array data truncated", "array metadata garbled", "array bytes changed"):
                (tmp / mode).mkdir()
                check_fallback(good, tmp / mode, mode, abstract)
        assert "Traceback" not in stderr.getvalue(), stderr.getvalue()[-3000:]


def tiny_config_file(run_config, target, run: Path, path: Path, *extra: str) -> Path:
    """The tiny run's config as a YAML file, for the CLI."""
    import yaml

    from dflash.configio import to_dict

    path.write_text(yaml.safe_dump(to_dict(run_config(target, run, *extra)), sort_keys=False))
    return path


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as in a command run from a terminal (Python's default handler): a suite started
    as a shell's background job (`.ci/run ... &`) runs with SIGINT ignored, which dflash-train rightly
    leaves alone (StopRequest, dflash/training/accidents.py: a background job's Ctrl-C is not its own)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_step_and_during_a_save_loses_nothing(good_run, tmp_path, capsys, monkeypatch,
                                                               run_config, tiny_target, terminal_sigint):
    """Each Ctrl-C ends the run after the step in progress, saved, with one line; the rerun says it
    resumes, and the run ends bit-identical to an uninterrupted one (``good_run``)."""
    import signal

    import orbax.checkpoint as ocp

    from dflash.cli import train as train_cli
    from dflash.training import trainer

    run = tmp_path / "run"
    config = tiny_config_file(run_config, tiny_target, run, tmp_path / "c.yaml")
    argv = ["--config", str(config), "--no-progress"]
    log_line = trainer.log_line

    def ctrl_c_at_step_1(step, *args):  # the loop is between the step's update and its save
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return log_line(step, *args)

    monkeypatch.setattr(trainer, "log_line", ctrl_c_at_step_1)
    assert train_cli.main(argv) == 130
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "dflash-train: Ctrl-C: stopping after this step, which is saved (Ctrl-C again to stop at once)",
        "dflash-train: interrupted at step 1 of 4, saved as a checkpoint: rerun the same command to resume "
        "from it"]
    assert Checkpoints(run / "checkpoints", 2).steps() == [1]

    save = ocp.CheckpointManager.save

    def ctrl_c_in_save(self, *args, **kwargs):  # Orbax is saving step 2
        signal.raise_signal(signal.SIGINT)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", ctrl_c_in_save)
    assert train_cli.main(argv) == 130
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert f"resuming {run} from step 1 of 4" in out.splitlines()
    assert err.splitlines()[-1] == ("dflash-train: interrupted at step 2 of 4, saved as a checkpoint: rerun "
                                    "the same command to resume from it")
    assert Checkpoints(run / "checkpoints", 2).steps() == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    # Resumed from step 1, the run reached the uninterrupted run's step 2 bit for bit.
    straight = Checkpoints(good_run / "checkpoints", 2).restore(2)[0]
    resumed = Checkpoints(run / "checkpoints", 2).restore(2)[0]
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_a_full_disk_at_a_save_is_one_line_and_nothing_is_lost(good_run, tmp_path, monkeypatch, run_config,
                                                               tiny_target):
    """The save is refused before Orbax writes (free space below the last step's size): one line with
    the step a rerun resumes from; the checkpoints before are intact."""
    import shutil as shutil_module
    from collections import namedtuple

    from dflash.errors import TrainingError
    from dflash.training.trainer import run_training

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    with pytest.raises(TrainingError) as err:
        run_training(run_config(tiny_target, run, "train.steps=5"), extend=True, progress=False,
                     final_eval=False, export=False)
    message = str(err.value)
    assert message.startswith(f"{run / 'checkpoints'}: no space left for checkpoint step 5 (about ")
    assert message.endswith("; free some space; nothing was lost: rerun the same command to resume from "
                            "step 4 (its last checkpoint, intact)") and "\n" not in message
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


def test_a_save_that_fills_the_disk_leaves_no_half_written_step(tmp_path, monkeypatch):
    """When the disk fills during Orbax's writes (tensorstore's error), the half-written step goes and
    the error is the file-system one, naming the step's directory."""
    import errno

    import orbax.checkpoint as ocp

    ckpts = Checkpoints(tmp_path / "checkpoints", keep_last=2)
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    ckpts.save(1, state, {"step": 1})

    def disk_full_midway(self, step, *args, **kwargs):
        (Path(self.directory) / f"{step}.orbax-checkpoint-tmp").mkdir()
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 735 bytes: No '
                         "space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_midway)
    with pytest.raises(OSError) as err:
        ckpts.save(2, state, {"step": 2})
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "checkpoints" / "2"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_read_only_and_uncreatable_run_directories_are_one_line(good_run, tmp_path, capsys, monkeypatch,
                                                                run_config, tiny_target):
    import errno

    from dflash.cli import train as train_cli

    def cli(run: Path) -> list[str]:
        config = tiny_config_file(run_config, tiny_target, run, tmp_path / "c.yaml")
        assert train_cli.main(["--config", str(config), "--no-progress"]) == 2
        return capsys.readouterr().err.splitlines()

    (tmp_path / "a-file").write_text("")
    assert cli(tmp_path / "a-file" / "run") == [
        f"dflash-train: error: cannot create the run directory: {tmp_path / 'a-file' / 'run'}: not a "
        "directory; a part of the path is a file, not a directory; or choose another run_dir (--run-dir)"]

    read_only = tmp_path / "ro"  # a read-only mount (root writes through file modes): its writes fail
    mkdir, write_text = Path.mkdir, Path.write_text

    def refuse(write):
        def wrapped(path, *args, **kwargs):
            if read_only in (path, *path.parents) and not (write is mkdir and path.is_dir()):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return write(path, *args, **kwargs)
        return wrapped

    shutil.copytree(good_run, read_only / "done")
    monkeypatch.setattr(Path, "mkdir", refuse(mkdir))
    monkeypatch.setattr(Path, "write_text", refuse(write_text))
    assert cli(read_only / "new") == [
        f"dflash-train: error: cannot create the run directory: {read_only / 'new'}: read-only file system; "
        "the file system is read-only: remount it writable or use a writable directory; or choose another "
        "run_dir (--run-dir)"]
    assert cli(read_only / "done") == [
        f"dflash-train: error: {read_only / 'done' / 'config.yaml'}: read-only file system; the file system "
        "is read-only: remount it writable or use a writable directory; nothing was lost: rerun the same "
        "command to resume from step 4 (its last checkpoint, intact)"]
