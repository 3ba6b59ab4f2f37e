"""configs/launch: the end-to-end pipeline script really runs (2 local processes, tiny target),
and the cluster files around it are well-formed and agree with it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from dflash.cli.launch import run_local

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "configs" / "launch"


@pytest.mark.parametrize("name", ["pipeline.sh", "tpu-vm.sh", "slurm.sbatch"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


def test_slurm_script_runs_the_pipeline_once_per_node():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "srun --kill-on-bad-exit=1 bash configs/launch/pipeline.sh" in text


def test_gke_jobset_is_one_pod_per_host_of_its_slice():
    spec = yaml.safe_load((LAUNCH / "gke-jobset.yaml").read_text())
    assert (spec["apiVersion"], spec["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    (job,) = spec["spec"]["replicatedJobs"]
    jspec = job["template"]["spec"]
    pod = jspec["template"]["spec"]
    (container,) = pod["containers"]
    hosts, chips = jspec["parallelism"], container["resources"]["limits"]["google.com/tpu"]
    assert jspec["completions"] == hosts and jspec["backoffLimit"] == 0
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert math.prod(int(x) for x in topology.split("x")) == hosts * chips  # 4x4 = 4 hosts x 4 chips
    assert "bash configs/launch/pipeline.sh" in container["args"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {"DATA", "WORK"} <= set(env)
    assert int(env["LANES"]) % hosts == 0  # data.lanes must be a multiple of the process count
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == env["WORK"]
    assert pod["volumes"][0]["name"] == mount["name"]


def _chats(path: Path, n: int = 16) -> None:
    heads = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "def parse(line):",
             "with open(path) as f:", "def mean(xs):", "try:"]
    convs = [[{"role": "user", "content": f"{heads[i % len(heads)]}  # {i}"},
              {"role": "assistant", "content": "ORIGINAL"}] for i in range(n)]
    datasets.Dataset.from_dict({"messages": convs}).to_json(str(path), lines=True)


def test_pipeline_regenerates_trains_and_exports_on_two_processes(tmp_path):
    """The script the TPU VM, GKE and SLURM guides run, run here as 2 local processes on the
    shipped tiny target with small settings: every step's output exists, process 0 alone
    exported, and a rerun (as after a preemption) keeps everything and exports nothing again."""
    _chats(tmp_path / "chats.jsonl")
    work = tmp_path / "work"
    env = dict(os.environ, DATA=str(tmp_path / "chats.jsonl"), WORK=str(work), TARGET="tiny-code",
               CONFIG="configs/tiny_code.yaml", NAME="tiny", LANES="2",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               REGEN_FLAGS="--max-new-tokens 24 --batch-size 4 --dtype float32 --shard-size 4 --no-progress",
               TRAIN_FLAGS=" ".join(f"--set {kv}" for kv in (
                   "regen.num_sequences=0", "train.steps=2", "data.seq_len=64", "train.batch_size=4",
                   "train.num_anchors=16", "train.eval_every=2", "train.save_every=2", "eval.heldout_rows=2",
                   "eval.num_prompts=2", "eval.max_new_tokens=16", "eval.prompt_tokens=16",
                   "data.heldout_fraction=0.25")))
    command = ["bash", "configs/launch/pipeline.sh"]
    results = run_local(command, 2, devices_per_process=1, timeout_s=420, env=env, cwd=str(ROOT))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "data" / "tiny_regenerated.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(not r["messages"][1]["content"].startswith("ORIGINAL") for r in rows)
    assert "dflash-regenerate: no mesh (1 device)" in results[0].stdout  # no --mesh: it says what it picked
    run, export = work / "runs" / "tiny", work / "exports" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))
    assert '"out"' in results[0].stdout and '"out"' not in results[1].stdout  # process 0 exported
    again = run_local(command, 2, devices_per_process=1, timeout_s=300,
                      env=dict(env, STEPS="regenerate export"), cwd=str(ROOT))
    assert [r.returncode for r in again] == [0, 0]
    assert f"export: {export} exists, kept" in again[0].stdout
