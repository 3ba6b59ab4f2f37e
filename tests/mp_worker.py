"""One process of a multi-process test (tests/test_multiprocess.py): ``python mp_worker.py SCENARIO DIR``.

Joins the job from the DFLASH_* variables dflash-launch sets (a plain single process without
them), runs the scenario and, on process 0, writes its result as JSON to DIR/result.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from dflash import distributed

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dflash.errors import ConfigError  # noqa: E402
from dflash.fingerprint import check_consistent, fingerprint  # noqa: E402

BATCH, SEQ, LANES, STEPS = 8, 16, 4, 5


def data_order(out: Path) -> dict:
    """Per-host lanes -> global batches; a sharded computation over them; row digests per step."""
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.data import DataConfig
    from dflash.training.hostdata import (
        LaneBatches,
        gather_lane_sizes,
        global_batch,
        load_lane_rows,
        process_lanes,
    )

    cfg = DataConfig(source=str(out / "docs.jsonl"), seq_len=SEQ, heldout_fraction=0.0, lanes=LANES, seed=3)
    check_consistent(fingerprint({"data": {"lanes": LANES}}, [cfg.source]), timeout_s=60)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    lanes = process_lanes(sharding, BATCH, SEQ, LANES)
    rows, _ = load_lane_rows(cfg, load_tokenizer("tiny-code"), lanes, pad_id=0)
    batches = LaneBatches(rows, LANES, BATCH, seed=3, lane_sizes=gather_lane_sizes(rows, LANES))
    weights = jax.device_put(jnp.arange(SEQ, dtype=jnp.float32) / SEQ, NamedSharding(mesh, P()))
    reduce = jax.jit(lambda t, w: jnp.sum(jnp.tanh(t.astype(jnp.float32) / 100.0) * w, axis=1),
                     out_shardings=NamedSharding(mesh, P()))
    steps, sums = [], []
    for step in range(STEPS):
        batch = global_batch(sharding, batches.local_batch(step), BATCH)
        tokens = np.asarray(multihost_utils.process_allgather(batch["tokens"], tiled=True))  # [B, S]
        steps.append([hashlib.sha256(r.tobytes()).hexdigest()[:12] for r in tokens])
        sums.append(np.asarray(reduce(batch["tokens"], weights)).tolist())
    try:  # one lane cannot be split over 2 processes: a clear error, on each process alike
        process_lanes(sharding, BATCH, SEQ, 1)
        one_lane = "no error"
    except ConfigError as err:
        one_lane = str(err)
    return {"lanes_here": lanes, "one_lane_error": one_lane, "rows_by_step": steps, "sums": sums,
            "processes": jax.process_count(), "devices": jax.device_count()}


def mismatch(out: Path) -> dict:
    """Process 1 has another train.steps: every process must stop with the error naming it."""
    check_consistent(fingerprint({"train": {"steps": 10 + jax.process_index(), "seed": 0}}), timeout_s=60)
    return {"checked": True}


def _ckpt_state(mesh: Mesh) -> dict:
    """w [8, 6] split over the data axis, b replicated: every process holds only some rows of w."""
    w = np.arange(48, dtype=np.float32).reshape(8, 6) / 7.0
    return {"w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("data")), lambda i: w[i]),
            "b": jax.device_put(jnp.arange(5, dtype=jnp.float32), NamedSharding(mesh, P()))}


def ckpt_save(out: Path) -> dict:
    """Steps 1 and 2 saved by every process (the test then damages step 2: a host died mid-save)."""
    from dflash.training.checkpoints import Checkpoints

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    ckpts = Checkpoints(out / "checkpoints", keep_last=3)
    state = _ckpt_state(mesh)
    ckpts.save(1, state, {"step": 1})
    ckpts.save(2, jax.tree.map(lambda a: a * 2, state), {"step": 2})
    return {"steps": ckpts.steps()}


def ckpt_restore(out: Path) -> dict:
    """The newest whole checkpoint, restored on this job's mesh (any process and device count)."""
    from dflash.training.checkpoints import Checkpoints
    from dflash.training.recovery import restore_latest

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    ckpts = Checkpoints(out / "checkpoints", keep_last=3)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            _ckpt_state(mesh))
    state, meta, step = restore_latest(ckpts, abstract)
    full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
            for k, v in state.items()}
    return {"step": step, "meta": meta, "state": full, "steps_after": ckpts.steps(),
            "w_sharding": str(state["w"].sharding.spec)}


def regen(out: Path) -> dict:
    """dflash-regenerate over this job's processes (shards of 2 conversations)."""
    from dflash.cli.regenerate import main

    code = main(["--target", "tiny-code", "--data", str(out / "chats.jsonl"),
                 "--out", str(out / "regen.jsonl"),
                 "--max-new-tokens", "6", "--batch-size", "2", "--shard-size", "2", "--dtype", "float32",
                 "--no-progress"])
    return {"code": code}


def _spy_regeneration() -> list:
    """Records the mesh shape (its axes of size > 1; None: no mesh) of every ``generate`` call of
    in-run regeneration."""
    from dflash.training import selfdistill

    meshes, plain = [], selfdistill.generate

    def spy(*args, mesh=None, **kwargs):
        meshes.append(None if mesh is None else {a: n for a, n in mesh.shape.items() if n > 1})
        return plain(*args, mesh=mesh, **kwargs)

    selfdistill.generate = spy
    return meshes


def train(out: Path) -> dict:
    """The tiny config for 4 steps over this job's processes in ``out/run``; ``out/args.json`` names
    the target, an optional ``stop_after``, ``mesh`` axis sizes and ``regen`` (in-run regenerated
    sequences, 0 by default)."""
    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    args = json.loads((out / "args.json").read_text())
    regen_meshes = _spy_regeneration()
    root = Path(__file__).resolve().parents[1]
    cfg = load_yaml(ExperimentConfig, root / "configs/tiny_code.yaml", [
        f"target.name={args['target']}", f"run_dir={out / 'run'}", "data.max_examples=40", "data.seq_len=64",
        "data.lanes=2", "train.batch_size=8", "train.num_anchors=8", "train.steps=4", "train.save_every=2",
        "train.eval_every=2", "train.log_every=1", "train.keep_last=2", "drafter.block_size=4",
        "eval.heldout_rows=8", "eval.num_prompts=2", "eval.max_new_tokens=8",
        f"regen.num_sequences={args.get('regen', 0)}", "regen.prompt_tokens=16", "regen.new_tokens=8",
        "regen.batch_size=8", *[f"mesh.{axis}={size}" for axis, size in args.get("mesh", {}).items()]])
    result = run_training(cfg, progress=False, final_eval=args.get("final_eval", False),
                          stop_after=args.get("stop_after"))
    return {**result, "regen_meshes": regen_meshes}


SCENARIOS = {"train": train, "regen": regen, "data_order": data_order, "mismatch": mismatch,
             "ckpt_save": ckpt_save, "ckpt_restore": ckpt_restore}

if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    try:
        result = SCENARIOS[scenario](directory)
    except distributed.DistributedError as err:
        print(f"DistributedError: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    if distributed.is_primary():
        (directory / "result.json").write_text(json.dumps(result))
