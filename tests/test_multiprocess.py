"""Multi-process runs (jax.distributed on 127.0.0.1, gloo): N processes == one process.

Each test starts real processes through ``dflash.cli.launch.run_local`` and bounds their wall time,
so a hang is a failure within the bound, never a stuck suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from recount import tau_from_metrics

from dflash.cli.launch import run_local
from dflash.distributed import DistributedError, Launch, detect_launch

WORKER = Path(__file__).with_name("mp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _launch(scenario: str, directory: Path, processes: int, devices: int, timeout_s: float = 240.0):
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    start = time.monotonic()
    results = run_local([sys.executable, str(WORKER), scenario, str(directory)], processes,
                        devices_per_process=devices, timeout_s=timeout_s, env={**os.environ, **env},
                        grace_s=20)
    return results, time.monotonic() - start


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0, f"process {r.process_id} exited {r.returncode}:\n{r.stderr[-3000:]}"


def _docs(directory: Path, n: int = 40) -> None:
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {'y' * (i % 7)}\n" * (1 + i % 3)})
             for i in range(n)]
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n")


def test_two_processes_build_the_same_global_batches_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        _docs(d)
    results, _ = _launch("data_order", one, processes=1, devices=8)
    _ok(results)
    results, _ = _launch("data_order", two, processes=2, devices=4)
    _ok(results)
    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert (a["processes"], a["devices"], b["processes"], b["devices"]) == (1, 8, 2, 8)
    assert a["lanes_here"] == [0, 1, 2, 3] and b["lanes_here"] == [0, 1]  # process 0 read half the lanes
    assert a["one_lane_error"] == "no error"
    assert "set data.lanes to a multiple of 2" in b["one_lane_error"]
    assert a["rows_by_step"] == b["rows_by_step"]
    assert a["sums"] == b["sums"]  # the sharded computation, bit for bit
    assert len({tuple(s) for s in a["rows_by_step"]}) == len(a["rows_by_step"])  # the batches do move on


def test_training_across_two_processes_equals_one_and_resumes_on_another_process_count(tiny_target, tmp_path):
    """Mesh (2, 2, 2): parameters and optimizer state split over fsdp and tensor, data across the
    processes. The same mesh in one process gives the same bits: in-run regenerated data (decoded on
    that mesh, each row once in the job), held-out eval, real-tau decoding, the export (gathered).
    The 2-process checkpoint exports in this process; a 2-process run killed after step 2 resumes on
    one process and ends with the same bits. (One test: every run here costs process start-ups and
    compiles, so the 1-process runs serve all three comparisons.)"""
    from safetensors.numpy import load_file

    mesh = {"data": 2, "fsdp": 2, "tensor": 2}

    def run(name: str, processes: int, devices: int, **args) -> dict:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "args.json").write_text(json.dumps({"target": str(tiny_target), "mesh": mesh, "regen": 32,
                                                 "final_eval": True, **args}))
        results, _ = _launch("train", d, processes=processes, devices=devices, timeout_s=500)
        _ok(results)
        return json.loads((d / "result.json").read_text())

    def params(name: str) -> dict:
        return load_file(str(tmp_path / name / "run" / "export" / "model.safetensors"))

    one, two = run("one", 1, 8), run("two", 2, 4)
    # Regeneration ran on the training mesh (8 devices, across both processes in "two"): train and
    # held-out continuations, byte for byte the same documents.
    for result in (one, two):
        assert result["regen_meshes"] == [mesh] * 6, result["regen_meshes"]
    for stored in ("regenerated.npz", "regenerated_eval.npz"):
        with np.load(tmp_path / "one" / "run" / stored) as a, np.load(tmp_path / "two" / "run" / stored) as b:
            assert set(a.files) == set(b.files) == {"ids", "mask", "lengths"}
            for key in a.files:
                assert a[key].tobytes() == b[key].tobytes(), (stored, key)
            assert len(a["lengths"]) == (32 if stored == "regenerated.npz" else 16)
    assert one["final_eval"] == two["final_eval"]  # held-out loss, tau, accuracies: bit for bit
    # The real-tau decoding ran on the (2, 2, 2) mesh on both processes (no gathered target): the
    # same tokens, so the same acceptance, as in one process.
    for key in ("tau", "tau_ngram", "tau_with_ngram", "acceptance_histogram", "eval_new_tokens"):
        assert one[key] == two[key], key
    assert "outputs_differ" not in two
    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())  # decoded on process 0
    assert metrics["eval_prompts"] == 2 and "outputs_differ" not in metrics
    assert metrics["tau"] == tau_from_metrics(metrics)  # design §7, recounted from tokens and steps
    assert metrics["tau_ngram"] == tau_from_metrics(metrics, "acceptance_histogram_ngram")
    a, b = params("one"), params("two")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Process 0 alone wrote TensorBoard events (one file) and the export.
    assert len(list((tmp_path / "two" / "run" / "tb").glob("events.out.tfevents.*"))) == 1
    # The 2-process checkpoint restores in this one process: dflash-export gives the run's own export.
    from dflash.cli.export import main as export_main

    assert export_main(["--run", str(tmp_path / "two" / "run"), "--out", str(tmp_path / "exported")]) == 0
    e = load_file(str(tmp_path / "exported" / "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], e[name], err_msg=name)
    # Killed after step 2 on 2 processes, resumed on 1 process: the same global batches follow.
    assert run("kill", 2, 4, stop_after=2, final_eval=False)["stopped_at"] == 2
    resumed = run("kill", 1, 8)
    assert resumed["regen_meshes"] == []  # the regenerated data was kept, not made again
    assert resumed["final_eval"] == one["final_eval"]
    c = params("kill")
    for name in a:
        np.testing.assert_array_equal(a[name], c[name], err_msg=name)


def test_a_config_mismatch_is_a_clear_error_on_every_process_within_seconds(tmp_path):
    results, took = _launch("mismatch", tmp_path, processes=2, devices=1, timeout_s=120)
    assert [r.returncode for r in results] == [3, 3], [r.stderr[-2000:] for r in results]
    for r in results:
        assert "process 1 differs from process 0 in config (train.steps: 10 vs 11)" in r.stderr
    assert took < 90


def test_a_two_process_checkpoint_survives_a_damaged_step_and_restores_on_other_process_counts(tmp_path):
    results, _ = _launch("ckpt_save", tmp_path, processes=2, devices=4)
    _ok(results)
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == [1, 2]
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):  # step 2 half-written
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    w = (np.arange(48, dtype=np.float32).reshape(8, 6) / 7.0).tolist()
    for processes, devices in ((2, 4), (1, 8), (1, 1)):
        results, _ = _launch("ckpt_restore", tmp_path, processes=processes, devices=devices)
        _ok(results)
        got = json.loads((tmp_path / "result.json").read_text())
        assert (got["step"], got["meta"], got["steps_after"]) == (1, {"step": 1}, [1]), (processes, devices)
        assert got["state"] == {"w": w, "b": [0.0, 1.0, 2.0, 3.0, 4.0]}
        assert got["w_sharding"] == "P('data',)"
        if processes == 2:  # the run that found the damaged step logged it (process 0)
            assert "resumed from checkpoint step 1" in results[0].stderr and "step 2" in results[0].stderr
    damaged = [p.name.split("-")[0] for p in (tmp_path / "checkpoints-damaged").iterdir()]
    assert damaged == ["2"]  # moved once, by the 2-process resume


def test_regeneration_over_two_processes_equals_one_and_resumes_without_redoing_shards(tmp_path):
    """2 devices per process: without --mesh each process decodes on the mesh it picks over its own
    (data=2: CPU memory is unknown, so no tensor split), and says so."""
    import datasets

    convs = [[{"role": "user", "content": f"def f{i}(x):"}, {"role": "assistant", "content": "OLD"}]
             for i in range(5)]
    outs = []
    for processes, name in ((1, "one"), (2, "two")):
        d = tmp_path / name
        d.mkdir()
        datasets.Dataset.from_dict({"messages": convs}).to_json(str(d / "chats.jsonl"), lines=True)
        results, _ = _launch("regen", d, processes=processes, devices=2)
        _ok(results)
        assert json.loads((d / "result.json").read_text())["code"] == 0
        assert "dflash-regenerate: mesh data=2,tensor=1 over 2 devices" in results[0].stdout
        outs.append((d / "regen.jsonl").read_text())
    assert outs[0] == outs[1] and outs[0].count("\n") == 5 and "OLD" not in outs[0]
    # Killed after some shards: only the missing ones are made again.
    shards = tmp_path / "two" / "regen.jsonl.shards"
    assert sorted(p.name for p in shards.glob("shard-*")) == [f"shard-0000{k}.jsonl" for k in range(3)]
    (shards / "shard-00001.jsonl").unlink()
    (tmp_path / "two" / "regen.jsonl").unlink()
    kept = {k: (shards / f"shard-0000{k}.jsonl").stat().st_mtime_ns for k in (0, 2)}
    results, _ = _launch("regen", tmp_path / "two", processes=2, devices=2)
    _ok(results)
    assert (tmp_path / "two" / "regen.jsonl").read_text() == outs[0]
    assert {k: (shards / f"shard-0000{k}.jsonl").stat().st_mtime_ns for k in (0, 2)} == kept


@pytest.mark.parametrize("env, how", [
    ({}, "single"),
    ({"DFLASH_COORDINATOR": "10.0.0.1:1234", "DFLASH_NUM_PROCESSES": "4", "DFLASH_PROCESS_ID": "3"},
     "explicit"),
    ({"DFLASH_NUM_PROCESSES": "1"}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0", "DFLASH_DISTRIBUTED": "off"}, "single"),
])
def test_detect_launch_reads_the_environment(env, how):
    assert detect_launch(environ=env).how == how


@pytest.mark.parametrize("env, on_tpu_vm, how", [
    ({}, True, "cloud-tpu"),  # a GCE TPU VM: jax reads the slice from the metadata server
    ({}, False, "single"),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2", "TPU_SKIP_MDS_QUERY": "true"}, True,
     "cloud-tpu"),  # GKE JobSet on a v5e-16: 4 hosts listed, no metadata server
    ({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476", "TPU_SKIP_MDS_QUERY": "true"}, True, "cloud-tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "true"}, True, "single"),  # one host
    ({"TPU_SKIP_MDS_QUERY": "true"}, True, "single"),
])
def test_detect_launch_on_cloud_tpu(env, on_tpu_vm, how):
    assert detect_launch(environ=env, on_tpu_vm=on_tpu_vm).how == how


def test_detect_launch_flags_win_and_bad_ones_are_named():
    env = {"DFLASH_COORDINATOR": "10.0.0.1:1234", "DFLASH_NUM_PROCESSES": "4", "DFLASH_PROCESS_ID": "3"}
    assert detect_launch("127.0.0.1:5", 2, 0, environ=env) == Launch("explicit", "127.0.0.1:5", 2, 0)
    with pytest.raises(DistributedError, match="missing: --process-id"):
        detect_launch("127.0.0.1:5", 2, environ={})
    with pytest.raises(DistributedError, match="HOST:PORT"):
        detect_launch("127.0.0.1", 2, 0, environ={})
    with pytest.raises(DistributedError, match=r"\[0, 2\)"):
        detect_launch("127.0.0.1:5", 2, 2, environ={})
    with pytest.raises(DistributedError, match="integer"):
        detect_launch(environ={"DFLASH_NUM_PROCESSES": "two"})


def test_launcher_sets_each_process_and_stops_the_rest_when_one_fails(capsys):
    from dflash.cli.launch import main

    show = "import os; print(os.environ['DFLASH_PROCESS_ID'], os.environ['DFLASH_NUM_PROCESSES'])"
    assert main(["--local-processes", "2", "--", sys.executable, "-c", show]) == 0
    assert "[process 1] 1 2" in capsys.readouterr().err
    fail = "import os, sys, time; sys.exit(3) if os.environ['DFLASH_PROCESS_ID'] == '1' else time.sleep(120)"
    start = time.monotonic()
    results = run_local([sys.executable, "-c", fail], 2, timeout_s=100, grace_s=1)
    assert [r.returncode for r in results] == [-9, 3] and time.monotonic() - start < 30


def test_local_env_simulates_cpu_devices_and_keeps_explicit_settings():
    from dflash.cli.launch import local_env

    env = local_env(1, 2, 1234, 4, base={"XLA_FLAGS": "--foo"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"  # an installed libtpu must not probe for a TPU
    assert (env["DFLASH_COORDINATOR"], env["DFLASH_NUM_PROCESSES"], env["DFLASH_PROCESS_ID"]) == (
        "127.0.0.1:1234", "2", "1")
    assert local_env(0, 2, 1, 4, base={"JAX_PLATFORMS": "cuda"})["JAX_PLATFORMS"] == "cuda"
    assert "JAX_PLATFORMS" not in local_env(0, 2, 1, 0, base={})  # real devices: left to JAX


def test_a_cpu_only_host_with_libtpu_installed_starts_quietly_on_the_cpu():
    """libtpu (the test extra, for TPU plans) made every command print a page of TPU-probe errors
    on a CPU-only host; importing dflash now pins JAX to the CPU there, and only there."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import dflash, jax; print(jax.config.jax_platforms, jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "libtpu" not in out.stderr and "TPU" not in out.stderr, out.stderr
    code = "import dflash, jax; print(jax.config.jax_platforms)"  # (no backend started: tpu is absent)
    explicit = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu,tpu"),
                              capture_output=True, text=True, timeout=120)
    assert explicit.stdout.split() == ["cpu,tpu"], explicit.stderr  # the user's choice stands
    from dflash.distributed import skip_absent_tpu

    assert not skip_absent_tpu({}, on_tpu_vm=True)  # TPU chips: JAX chooses
