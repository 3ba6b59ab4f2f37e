"""A damaged newest checkpoint, file by file: resume and export fall back to the previous good step
and say so in a line naming the step and the file (docs/design.md §10, "Errors").

The damage modes are the distinct failures found by damaging every file of a single-process and of
an 8-device checkpoint in turn (truncated, zeroed, deleted, garbled); files whose damage Orbax never
reads (commit markers, stale OCDBT pieces) are left out.
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
        assert info["damaged_steps"][0].startswith("checkpoint step 4 in ") and named in info["damaged_steps"][0]


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


def test_train_extend_and_export_on_a_truncated_array_file(good_run, tmp_path, capsys, run_config, tiny_target):
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
    assert len(messages) == 2 and messages[0].startswith("checkpoint step 4 in ") and "state/ (array " in messages[0]
    assert messages[1].startswith("resumed from checkpoint step 2, the newest that restores; the damaged step 4 "
                                  "moved to ")
    assert f"resuming {run} from step 2 of 6" in capsys.readouterr().out.splitlines()
    assert Checkpoints(run / "checkpoints", 2).steps()[-1] == 6


@on_cpu_devices(8)
def test_a_damaged_sharded_checkpoint_falls_back_on_resume_and_export():
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
        for mode in ("array data truncated", "array metadata garbled", "array bytes changed"):
            (tmp / mode).mkdir()
            check_fallback(good, tmp / mode, mode, abstract)
