"""Seconds per train step of a config on device meshes: the trainer's own step, random packed rows.

``python -m dflash.bench.mesh_step --config configs/tiny_code.yaml --mesh 1,1,1 --mesh 2,2,2``
(with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for simulated CPU devices). Each
mesh spans the first ``data*fsdp*tensor`` devices; the target is the config's, loaded into its
shards, the drafter and optimizer state are made as ``run_training`` makes them. It runs as one
of several processes too (``dflash.bench.processes`` launches it so, process 0 reports).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from dflash import sharding
from dflash.config import DTYPES
from dflash.configio import load_yaml
from dflash.distributed import add_distributed_args, initialize, is_primary
from dflash.drafters.objective import default_gamma
from dflash.io.loading import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.config import ExperimentConfig
from dflash.training.optim import make_optimizer
from dflash.training.setup import build_drafter_config, build_method_drafter, train_state
from dflash.training.step import make_step_fns


def random_rows(cfg: ExperimentConfig, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of packed rows (two documents per row) shaped like the config's."""
    b, s = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    seg = np.where(np.arange(s) < s // 2, 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(s), np.arange(s) - s // 2).astype(np.int32)
    return {"tokens": rng.integers(0, vocab, (b, s)).astype(np.int32), "loss_mask": np.ones((b, s), bool),
            "segment_ids": np.tile(seg, (b, 1)), "positions": np.tile(pos, (b, 1))}


def step_seconds(cfg: ExperimentConfig, shape: tuple[int, int, int], steps: int = 5) -> dict[str, Any]:
    """Median seconds of ``steps`` train steps on mesh ``shape`` (after one compiling step)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape), jax.devices()[: math.prod(shape)])
    target = load_target(cfg.target.name, dtype=DTYPES[cfg.target.dtype], mesh=mesh)
    drafter = build_method_drafter(cfg, build_drafter_config(cfg, target.cfg,
                                                             load_tokenizer(cfg.target.name)),
                                   target, mesh)
    graphdef, state, shardings = train_state(drafter, make_optimizer(cfg, 1000), mesh)
    tgraph, tstate = nnx.split(target)
    ce, kl = cfg.loss_weights
    step_kw = dict(num_anchors=min(cfg.train.num_anchors, cfg.data.seq_len - 1),
                   gamma=cfg.train.gamma or default_gamma(drafter.cfg.block_size), ce_weight=ce, kl_weight=kl,
                   target_labels=cfg.train.labels == "target")
    train_step, _ = make_step_fns(graphdef, tgraph, step_kw, DTYPES[cfg.train.compute_dtype], mesh=mesh,
                                  state_shardings=shardings,
                                  tstate_shardings=sharding.tree_shardings(tstate, mesh))
    put = sharding.batch_sharding(mesh)
    # Every process makes the same global rows and contributes the slices its devices hold.
    rows = random_rows(cfg, target.cfg.vocab_size)
    batch = {k: jax.make_array_from_callback(v.shape, put, lambda idx, v=v: v[idx]) for k, v in rows.items()}
    start = time.perf_counter()
    state, metrics = train_step(state, tstate, batch, jax.random.key(0))
    jax.block_until_ready(metrics["loss"])
    first = time.perf_counter() - start
    times, cpu = [], []
    for i in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = train_step(state, tstate, batch, jax.random.key(i + 1))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    # cpu_s: CPU seconds of all threads; on a shared host step_s can be mostly waiting for cores.
    return {"mesh": list(shape), "devices": math.prod(shape), "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu), "first_step_s": first, "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_code.yaml")
    p.add_argument("--mesh", action="append", default=[], help="data,fsdp,tensor (repeatable)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_distributed_args(p)
    args = p.parse_args(argv)
    initialize(args.coordinator, args.num_processes, args.process_id, verbose=args.verbose)
    cfg = load_yaml(ExperimentConfig, args.config, args.overrides)
    for text in args.mesh or ["1,1,1"]:
        shape = tuple(int(x) for x in text.split(","))
        if len(shape) != 3:
            raise SystemExit(f"--mesh {text!r}: expected data,fsdp,tensor")
        result = step_seconds(cfg, shape, args.steps)  # type: ignore[arg-type]
        if is_primary():
            print(json.dumps(dict(result, processes=jax.process_count())), flush=True)


if __name__ == "__main__":
    main()
