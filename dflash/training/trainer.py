"""Drafter training against a frozen target: the run, top to bottom.

Every drafter kind shares the machinery (``method:`` in the config names one, ``dflash.drafters``):
**DFlash** (a small separate drafter fed with target features), **Orthrus** (diffusion attentions
inside every frozen target layer; only they are trained), and any kind registered beside them.
The pieces live beside this file, one job each:
``setup`` (drafter, devices), ``rundata`` (packed rows, prompts), ``optim``, ``step`` (the
jitted train / eval steps), ``checkpoints`` (Orbax, resume policy) and ``evaluation``
(simulated and real τ). The run lives on a ``data × fsdp × expert × tensor`` mesh (``mesh:``, docs/design.md
§11): the target, the drafter and the optimizer state are created or loaded in their shards, the
batch is split over ``data × fsdp × expert``, so the same config runs on 1 device or many with the same loss,
and a checkpoint restores onto any mesh.

Resume is exact: the data stream and the anchor RNG are pure functions of (seed, step), and
the checkpoint holds the drafter, the optimizer state and the step.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from dflash import sharding
from dflash.config import DTYPES
from dflash.configio import to_dict
from dflash.distributed import host_local, is_primary, show_progress, sync_processes
from dflash.errors import Interrupted, TrainingError
from dflash.fingerprint import check_consistent, fingerprint
from dflash.io.loading import load_target, read_config, resolve
from dflash.io.tokenizer import load_tokenizer
from dflash.models.transformer import Transformer
from dflash.training.accidents import StopRequest, explain_accidents, make_run_dir, replace_dir, write_text
from dflash.training.checkpoints import Checkpoints, decide_resume
from dflash.training.config import ExperimentConfig
from dflash.training.evaluation import heldout_chunks, make_evaluate, measure_tau
from dflash.training.hostdata import LaneBatches, full_batch, gather_lane_sizes, global_batch, process_lanes
from dflash.training.optim import lr_schedule, make_optimizer
from dflash.training.progress import finished_result, log_line, tau_text
from dflash.training.recovery import restore_latest
from dflash.training.rundata import prepare_data
from dflash.training.scalars import Listener, ScalarLog
from dflash.training.setup import build_drafter_config, build_mesh, build_method_drafter, train_state
from dflash.training.step import make_step_fns, mean_metrics, step_options

__all__ = ["TrainingError", "run_training"]

LOGGED_METRICS = ("loss", "ce", "tau_sim", "grad_norm", "accuracy")  # per optimizer step, as means


@explain_accidents  # Ctrl-C, a full or read-only disk: one line, checkpoints intact
def run_training(cfg: ExperimentConfig, *, resume: bool | None = None, progress: bool = True,
                 final_eval: bool = True, export: bool = True,
                 stop_after: int | None = None, extend: bool = False, on_scalars: Listener | None = None,
                 devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Trains a drafter (DFlash or Orthrus) per ``cfg``; returns the final metrics (also in ``metrics.json``).

    ``resume=None`` resumes when the run directory already holds checkpoints. ``stop_after``
    ends the process-level run after that step's checkpoint, exactly as a kill right after it
    would (tests use it; ``--resume`` continues). ``extend`` lets a resumed run take a larger
    step count (the rest of the run follows the LR schedule of the new total); a run already at
    its final step returns its saved result with ``already_complete``. ``on_scalars(step, values)``
    sees every logged batch of scalars (a notebook's live plot); they also go to TensorBoard and
    ``scalars.csv``. ``devices`` (default: all) is what ``mesh:`` spans.
    """
    run_dir = Path(cfg.run_dir)
    if jax.process_count() > 1:  # the processes of one job run the same code, config and data
        check_consistent(fingerprint(to_dict(cfg), [cfg.data.source]))
    cfg.check_context(read_config(resolve(cfg.target.name)).max_position_embeddings)
    resume = decide_resume(run_dir, cfg, resume, extend=extend)
    if resume and (done := finished_result(run_dir, Checkpoints(run_dir / "checkpoints", 1).latest_meta())):
        if not extend or done.get("steps") == (cfg.train.steps or None):
            return done
    sync_processes("dflash run start")  # all have read the run directory before process 0 writes to it
    if is_primary():
        make_run_dir(run_dir)
        write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---- what the run starts from
    mesh = build_mesh(cfg, devices)
    rep = cfg.mesh.replicate_indivisible
    tokenizer = load_tokenizer(cfg.target.name)
    target = load_target(cfg.target.name, dtype=DTYPES[cfg.target.dtype], mesh=mesh,
                         replicate_indivisible=rep)
    drafter = build_method_drafter(cfg, build_drafter_config(cfg, target.cfg, tokenizer), target, mesh)
    dcfg = drafter.cfg
    batch_sharding = sharding.batch_sharding(mesh)
    # Each process reads only the data lanes its devices' batch rows hold (hostdata.py).
    lanes = process_lanes(batch_sharding, cfg.train.batch_size, cfg.data.seq_len, cfg.data.lanes)
    data = prepare_data(cfg, tokenizer, target, run_dir, show_progress(progress), lanes, mesh=mesh)
    if not cfg.drafter.init_from and not resume:  # a continued drafter keeps what it was fitted to
        cfg.kind.fit_data(drafter, [rows.arrays() for rows in data.train.values()])
    sizes = gather_lane_sizes(data.train, cfg.data.lanes)
    if min(sizes) < cfg.train.batch_size // cfg.data.lanes:
        in_lanes = f"in data lanes of {sizes} rows " if cfg.data.lanes > 1 else ""
        raise TrainingError(f"{sum(sizes)} packed training rows of data.seq_len={cfg.data.seq_len} {in_lanes}"
                            f"cannot fill one batch of train.batch_size={cfg.train.batch_size}")
    held = heldout_chunks(data.heldout.arrays(), cfg.eval.heldout_rows, cfg.train.batch_size,
                          sharding.batch_shards(mesh))
    micro = LaneBatches(data.train, cfg.data.lanes, cfg.train.batch_size, cfg.train.seed, sizes)
    accum = cfg.optim.grad_accum
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * micro.steps_per_epoch / accum))
    schedule = lr_schedule(cfg, total)

    # ---- placement (every array in its shards) and the jitted steps
    graphdef, state, state_shardings = train_state(drafter, make_optimizer(cfg, total), mesh, rep)
    tgraph, tstate = nnx.split(target)
    tstate_shardings = sharding.tree_shardings(tstate, mesh, replicate_indivisible=rep)
    train_step, eval_step = make_step_fns(graphdef, tgraph, step_options(cfg, dcfg.block_size),
                                          DTYPES[cfg.train.compute_dtype], mesh=mesh,
                                          state_shardings=state_shardings, tstate_shardings=tstate_shardings)

    def put(local_rows):  # this process's rows of a global batch, straight into their shards
        return global_batch(batch_sharding, local_rows, cfg.train.batch_size)

    evaluate = make_evaluate(eval_step, tstate, [full_batch(batch_sharding, b) for b in held])

    # ---- resume
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.train.keep_last, owner=True)
    start, best_tau, best_step, history = 0, -1.0, None, []
    if resume:  # the newest checkpoint that is whole (a damaged newer one is logged and set aside)
        # Restored straight onto this run's mesh, whatever mesh wrote the checkpoint.
        targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                               state_shardings)
        state, meta, _ = restore_latest(ckpts, targets)
        start, best_tau, best_step = int(meta["step"]), float(meta["best_tau"]), meta.get("best_step")
        history = meta.get("history", [])
        if meta.get("total_steps") not in (None, total) and not (extend and total > start):
            raise TrainingError(f"checkpoint was made for {meta['total_steps']} steps, config says {total}"
                                + ("; --extend needs more steps than the run has done" if extend else ""))
        if is_primary():
            print(f"resuming {run_dir} from step {start} of {total}", flush=True)

    # ---- the loop
    # tb/ and scalars.csv (rows past start dropped), written by process 0 alone
    writer = ScalarLog(run_dir, start, on_write=on_scalars) if is_primary() else _NoLog()
    base_key = jax.random.key(cfg.train.seed)
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train {cfg.method}",
               disable=not show_progress(progress), dynamic_ncols=True)
    last_log, tau_now = time.perf_counter(), (history[-1]["tau_sim_steps"] if history else float("nan"))
    tokens_since = 0
    stop = StopRequest()  # Ctrl-C: the loop ends after the step, saved (accidents.py)
    for step in stop.steps(bar):
        micro_metrics = []
        for i in range(accum):
            m_idx = step * accum + i  # data position and anchor RNG are pure functions of this
            key = jax.random.fold_in(base_key, m_idx)
            state, metrics = train_step(state, tstate, put(micro.local_batch(m_idx)), key)
            micro_metrics.append(metrics)
            tokens_since = tokens_since + metrics["tokens"]  # a device scalar: no host sync per step
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total:
            tokens = float(tokens_since)  # waits for the steps so far: the rate covers finished work
            now = time.perf_counter()
            metrics = mean_metrics(micro_metrics, LOGGED_METRICS)  # the step's micro-batches, all of them
            scalars = {name: float(metrics[name]) for name in ("loss", "ce", "tau_sim", "grad_norm")}
            scalars["lr"] = float(schedule(done))
            scalars["tokens_per_s"] = tokens / max(now - last_log, 1e-9)
            _log_train(writer, scalars, metrics["accuracy"], done)
            last_log, tokens_since = now, 0
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", tau=tau_text(tau_now),
                            tok_s=f"{scalars['tokens_per_s']:.0f}")
            if not progress and is_primary():  # no bar: one plain line per log_every
                print(log_line(done, total, scalars, tau_now), flush=True)
        if done % cfg.train.eval_every == 0 or done == total:
            ev = evaluate(state)
            tau_now = ev["tau_sim_steps"]
            history.append({"step": done, **ev})
            _log_eval(writer, ev, done)
            if not progress:
                print(f"eval at step {done}: tau_sim {tau_now:.2f} per verify step", flush=True)
            if ev["tau_sim_steps"] > best_tau:  # the per-step estimate tracks decoding tau best
                best_tau, best_step = ev["tau_sim_steps"], done
        # A new best is saved at once (kept beside the last k), even between save_every steps.
        if done % cfg.train.save_every == 0 or done == total or best_step == done or stop.requested:
            meta = {"step": done, "best_tau": best_tau, "best_step": best_step, "total_steps": total,
                    "seed": cfg.train.seed, "data_position": done * accum, "history": history}
            ckpts.save(done, state, meta)
        if stop.requested:
            writer.close()
            bar.close()
            raise Interrupted(f"interrupted at step {done} of {total}, saved as a checkpoint: rerun the same "
                              "command to resume from it")
        if stop_after is not None and done >= stop_after:
            writer.close()
            bar.close()
            return {"stopped_at": done}
    writer.flush()
    bar.close()

    # ---- the result: real tau decoded on the training mesh by every process (target and drafter
    # stay in their shards), then the export and metrics.json on process 0
    trained, _ = nnx.merge(graphdef, state)  # the drafter in its shards
    result: dict[str, Any] = {"method": cfg.method, "block_size": dcfg.block_size, "steps": total,
                              "final_eval": history[-1] if history else None,
                              "best_step": best_step, "best_tau_sim": best_tau}
    if final_eval:
        result.update(measure_tau(target, trained, data.prompts, cfg.eval.max_new_tokens, mesh=mesh))
    if export:  # collectives, on every process: process 0 writes the export from its own copy of the
        # drafter's parameters (small); what the kind reads from the sharded target (Orthrus: a
        # fingerprint of its weights) is gathered here too
        dgraph, dparams = nnx.split(trained)
        drafter = nnx.merge(dgraph, host_local(dparams))
        prepared = cfg.kind.prepare_export(target)
    if not is_primary():
        return result
    if export:
        result["export_dir"] = str(_export(cfg, drafter, target, run_dir / "export", prepared))
    if final_eval:
        writer.scalars(total, {"eval/tau_real" if name == "tau" else f"eval/{name}": result[name]
                               for name in ("tau", "tau_ngram", "tau_with_ngram") if name in result})
        writer.histogram("decode/acceptance", result["acceptance_histogram"], total)
    writer.close()
    write_text(run_dir / "metrics.json", json.dumps(result, indent=2))
    _check_outputs_agree(result, target, cfg, run_dir)
    return result


class _NoLog:
    """The scalar log of the processes other than 0: they log nothing (process 0 logs for the job)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _log_train(writer: ScalarLog, scalars: dict[str, float], accuracy: Any, step: int) -> None:
    accuracy = {f"train_accuracy/pos_{j + 1}": float(acc) for j, acc in enumerate(np.asarray(accuracy))}
    writer.scalars(step, {f"train/{name}": value for name, value in scalars.items()} | accuracy)


def _log_eval(writer: ScalarLog, ev: dict[str, Any], step: int) -> None:
    names = ("tau_sim", "tau_sim_steps", "tau_sim_labels", "loss")
    writer.scalars(step, {f"eval/{name}": ev[name] for name in names}
                   | {f"eval_accuracy/pos_{j + 1}": acc for j, acc in enumerate(ev["accuracy"])})
    writer.histogram("eval/acceptance", ev["acceptance_counts"], step)  # held-out blocks' simulated lengths


def _export(cfg: ExperimentConfig, drafter: Any, target: Transformer, out: Path,
            prepared: dict[str, Any]) -> Path:
    """The trained drafter in its kind's serving layout (Orthrus: a delta export referencing the
    target); an earlier export is replaced only once the new one is complete."""
    new = out.with_name(out.name + ".partial")
    shutil.rmtree(new, ignore_errors=True)
    cfg.kind.save(drafter, target, target.cfg, new, target_name=cfg.target.name, **prepared)
    replace_dir(new, out)
    return out


def _check_outputs_agree(result: dict[str, Any], target: Transformer, cfg: ExperimentConfig,
                         run_dir: Path) -> None:
    """All decoders of ``measure_tau`` are lossless: in fp32 differing outputs are a bug."""
    if not result.get("outputs_differ"):  # checked after metrics.json: the results are kept either way
        return
    message = (f"speculative outputs differ between methods ({', '.join(result['outputs_differ'])}) on "
               f"the held-out prompts")
    if target.dtype == jnp.float32:
        raise TrainingError(message + f"; results are in {run_dir / 'metrics.json'}")
    # In bf16 the verify passes of different shapes round differently, so a near-tied greedy
    # argmax can flip: worth a warning, not the loss of a finished run.
    warnings.warn(message + f" ({cfg.target.dtype} target: rounding at near-ties)", stacklevel=3)
