"""Resuming skips a damaged newest checkpoint (a host died mid-save), logs it, and saves over it."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.errors import CheckpointError
from dflash.training.checkpoints import Checkpoints
from dflash.training.recovery import restore_latest


def _state(step: int) -> dict:
    key = jax.random.key(step)
    return {"w": jax.random.normal(key, (5, 3)), "b": jnp.full((7,), float(step)), "n": jnp.int32(step)}


def _damage(step_dir, how: str) -> None:
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())
    assert files
    for f in files:
        if how == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        elif how == "delete":
            f.unlink()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_skipped_logged_and_saved_again(tmp_path, caplog, how):
    ckpts = Checkpoints(tmp_path / "checkpoints", keep_last=5)
    for step in (1, 2, 3):
        ckpts.save(step, _state(step), {"step": step})
    _damage(tmp_path / "checkpoints" / "3", how)
    abstract = jax.tree.map(jnp.zeros_like, _state(0))
    with caplog.at_level(logging.WARNING, logger="dflash"):
        state, meta, step = restore_latest(ckpts, abstract)
    assert step == 2 and meta["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, state, _state(2))
    assert "step 3" in caplog.text and "checkpoints-damaged" in caplog.text
    assert ckpts.steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints-damaged").iterdir()] == ["3"]
    ckpts.save(3, _state(3), {"step": 3})  # the resumed run saves that step again
    state, _, step = restore_latest(ckpts, abstract)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))


def test_no_restorable_checkpoint_is_the_restore_error(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", keep_last=5)
    ckpts.save(1, _state(1), {"step": 1})
    _damage(tmp_path / "checkpoints" / "1", "delete")
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="could be restored, nothing was changed.*step 1"):
        restore_latest(ckpts, jax.tree.map(jnp.zeros_like, _state(0)))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_regeneration_shards_of_other_settings_are_refused(tmp_path):
    from dflash.config import ConfigError
    from dflash.training.regen_shards import ShardPlan

    out = tmp_path / "regen.jsonl"
    plan = ShardPlan.open(out, 5, 2, {"seed": "0", "max_new_tokens": "6"})
    assert (plan.num_shards, plan.bounds(2), plan.todo()) == (3, (4, 5), [0, 1, 2])
    plan.shard_path(1).write_text("{}\n")
    assert ShardPlan.open(out, 5, 2, {"seed": "0", "max_new_tokens": "6"}).todo() == [0, 2]
    with pytest.raises(ConfigError, match=r"other settings \(max_new_tokens, shard_size\)"):
        ShardPlan.open(out, 5, 3, {"seed": "0", "max_new_tokens": "7"})


def test_training_resumes_from_the_step_before_a_half_written_one(run_config, tiny_target, tmp_path, caplog):
    from safetensors.numpy import load_file

    from dflash.training.trainer import run_training

    extra = ("train.save_every=1", "train.keep_last=3")
    run_training(run_config(tiny_target, tmp_path / "a", *extra), progress=False, final_eval=False)
    cfg = run_config(tiny_target, tmp_path / "b", *extra)
    assert run_training(cfg, progress=False, stop_after=3) == {"stopped_at": 3}
    _damage(tmp_path / "b" / "checkpoints" / "3", "truncate")  # the host died while writing step 3
    with caplog.at_level(logging.WARNING, logger="dflash"):
        run_training(cfg, progress=False, final_eval=False)
    assert "resumed from checkpoint step 2" in caplog.text
    a, b = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in "ab")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
