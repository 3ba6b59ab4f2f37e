"""configs/launch: the end-to-end pipeline script really runs (2 local processes, tiny target),
and the cluster files around it are well-formed and agree with it."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from clihelp import unknown_flags

from dflash.cli.launch import run_local
from dflash.plan import TOPOLOGIES
from dflash.training.recipe_data import RECIPES, REGEN_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "configs" / "launch"


SCRIPTS = ["pipeline.sh", "tpu-vm.sh", "tpu-startup.sh", "slurm.sbatch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    subprocess.run(["shellcheck", *(str(LAUNCH / n) for n in SCRIPTS)], check=True)


def _dry(script: str, *args: str, cwd: Path = ROOT, **env: str) -> list[list[str]]:
    """The commands ``script`` would run (DRY_RUN=1), each as its words."""
    out = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", **env}, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]


def _only(commands: list[list[str]], name: str) -> list[str]:
    (words,) = [c for c in commands if c[0] == name]
    return words


def _flag(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


@pytest.mark.parametrize("preset, target, config", [
    ("qwen3_8b", "Qwen/Qwen3-8B", "configs/qwen3_8b_dflash.yaml"),
    ("smoke", "Qwen/Qwen3-0.6B", "configs/qwen3_0_6b_smoke.yaml"),
    ("llama3_1_8b", "meta-llama/Llama-3.1-8B-Instruct", "configs/llama3_1_8b_dflash.yaml")])
def test_pipeline_dry_run_names_real_commands_flags_and_the_recipe(preset, target, config, tmp_path):
    """Every step of a fresh run, printed: the weights staged once into WORK/models, the recipe's
    prompts made once, regeneration with the recipe's settings (Qwen3: thinking off) on a mesh,
    training on the staged weights, export; every command and flag exists."""
    commands = _dry("pipeline.sh", WORK=str(tmp_path), PRESET=preset)
    assert [c[0] for c in commands] == ["hf", "touch", "dflash-prepare-data", "dflash-regenerate",
                                        "dflash-train", "dflash-export"]
    staged = str(tmp_path / "models" / target)
    assert commands[0][:4] == ["hf", "download", target, "--local-dir"] and commands[0][4] == staged
    # hf's --include takes one pattern: a second word would be a file name, and turn --include off
    options = commands[0][5:]
    assert options[::2] == ["--include"] * (len(options) // 2) and "*.safetensors" in options[1::2]
    for words in commands[2:]:
        assert unknown_flags(words) == [], words
    recipe = "llama3" if preset.startswith("llama") else "qwen3"
    prep, regen = _only(commands, "dflash-prepare-data"), _only(commands, "dflash-regenerate")
    assert _flag(prep, "--recipe") == recipe and _flag(regen, "--data") == _flag(prep, "--out")
    assert _flag(regen, "--target") == staged
    assert all(_flag(regen, k) == v for k, v in zip(REGEN_SETTINGS[::2], REGEN_SETTINGS[1::2], strict=True))
    assert _flag(regen, "--mesh") == "tensor=-1"  # the split the AOT plan of these settings fits
    assert _flag(regen, "--batch-size") == ("32" if preset == "smoke" else "64")  # what fits (scaling.md)
    kwargs = json.loads(_flag(regen, "--chat-template-kwargs")) if "--chat-template-kwargs" in regen else {}
    assert kwargs == RECIPES[recipe].chat_template_kwargs
    train = _only(commands, "dflash-train")
    assert _flag(train, "--config") == config and f"target.name={staged}" in train
    assert f"data.source={_flag(regen, '--out')}" in train
    # Staged weights and prepared data are reused: nothing to stage or prepare the second time.
    (tmp_path / "models" / target).mkdir(parents=True)
    (tmp_path / "models" / target / ".staged").touch()
    Path(_flag(prep, "--out")).parent.mkdir(parents=True)
    Path(_flag(prep, "--out")).touch()
    again = _dry("pipeline.sh", WORK=str(tmp_path), PRESET=preset, TPU_WORKER_ID="1")
    assert [c[0] for c in again] == ["dflash-regenerate", "dflash-train"]  # worker 1 does not export


def test_tpu_vm_dry_run_up_resume_teardown():
    env = {"BUCKET": "my-bucket", "PRESET": "smoke", "HF_TOKEN": "hf_x"}
    up = _dry("tpu-vm.sh", "up", **env)
    assert "archive" in up[0][2] and "gs://my-bucket/code/dflash-smoke.tar.gz" in up[0][2]
    create = up[1]
    assert create[:4] == ["gcloud", "compute", "tpus", "queued-resources"] and create[4] == "create"
    assert _flag(create, "--accelerator-type") == "v5litepod-8"  # the slice the plans say fits (below)
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert _flag(create, "--metadata-from-file") == f"startup-script={LAUNCH / 'tpu-startup.sh'}"
    meta = dict(kv.split("=", 1) for kv in _flag(create, "--metadata").split(","))
    assert meta == {"dflash-bucket": "my-bucket", "dflash-preset": "smoke", "dflash-name": "dflash-smoke",
                    "dflash-env": "", "dflash-hf-token": "hf_x"}
    assert "--spot" not in create and "--spot" in _dry("tpu-vm.sh", "up", SPOT="1", **env)[1]
    for state in ("SUSPENDED", "FAILED"):  # preempted: delete, then the same request again
        resumed = _dry("tpu-vm.sh", "resume", DRY_RUN_STATE=state, **env)
        assert resumed[0][4:6] == ["delete", "dflash-smoke"] and "--force" in resumed[0]
        assert resumed[1] == create
    assert _dry("tpu-vm.sh", "resume", DRY_RUN_STATE="NONE", **env) == [create]
    assert _dry("tpu-vm.sh", "resume", DRY_RUN_STATE="ACTIVE", **env)[0][-3:] == ["nothing", "to", "do"]
    (down,) = _dry("tpu-vm.sh", "teardown", **env)
    assert down[4:6] == ["delete", "dflash-smoke"] and "--force" in down


def test_tpu_startup_installs_python_gcsfuse_venv_and_starts_the_pipeline_detached():
    commands = _dry("tpu-startup.sh", DFLASH_BUCKET="my-bucket", DFLASH_NAME="dflash-smoke",
                    DFLASH_PRESET="smoke", AGENT_WORKER_NUMBER="1", DFLASH_ENV="LANES=4",
                    DFLASH_HF_TOKEN="hf_x")
    text = "\n".join(" ".join(c) for c in commands)
    assert "apt-get install -yq gcsfuse" in text
    assert "gcsfuse --implicit-dirs -o allow_other my-bucket /mnt/bucket" in text
    assert "astral.sh/uv/install.sh" in text and "uv venv --python 3.12 .venv" in text
    assert "uv pip install --python .venv/bin/python -q -e .[tpu] gcsfs" in text
    assert "tar -xzf /mnt/bucket/code/dflash-smoke.tar.gz" in text
    start = next(c for c in commands if c[:2] == ["setsid", "nohup"] and c[2] == "env")
    env = dict(w.split("=", 1) for w in start[3:] if "=" in w and not w.startswith("-"))
    assert {k: env[k] for k in ("WORK", "PRESET", "NAME", "TPU_WORKER_ID", "LANES", "HF_TOKEN")} == {
        "WORK": "/mnt/bucket", "PRESET": "smoke", "NAME": "dflash-smoke", "TPU_WORKER_ID": "1", "LANES": "4",
        "HF_TOKEN": "hf_x"}
    assert "configs/launch/pipeline.sh" in start[-1]
    assert "/mnt/bucket/logs/dflash-smoke/worker-1.log" in text  # the log, copied into the bucket


def test_slurm_dry_run_builds_the_venv_then_runs_the_pipeline_once_per_node(tmp_path):
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --requeue" in text
    commands = _dry("slurm.sbatch", cwd=tmp_path, WORK=str(tmp_path / "w"), SLURM_JOB_ID="7")
    words = [" ".join(c) for c in commands]
    assert "uv venv --python 3.12 .venv" in words
    assert "uv pip install --python .venv/bin/python -e .[gpu]" in words
    assert commands[-1][:2] == ["srun", "--kill-on-bad-exit=1"]
    log = f"--output={tmp_path / 'w'}/logs/dflash-7.log"
    assert commands[-1][2:] == [log, "bash", "configs/launch/pipeline.sh"]


def test_default_slices_are_the_ones_the_plans_say_fit():
    """tpu-vm.sh and the JobSet default to v5e-8, where docs/scaling.md's plan of the Qwen3-8B preset fits."""
    rows = json.loads((ROOT / "docs/results/scaling/scaling.json").read_text())
    assert rows["qwen3_8b_dflash@v5e-8"]["fits"]
    create = _dry("tpu-vm.sh", "up", BUCKET="b")[1]
    assert _flag(create, "--accelerator-type") == "v5litepod-8" and TOPOLOGIES["v5e-8"].chips == 8
    spec = yaml.safe_load((LAUNCH / "gke-jobset.yaml").read_text())
    pod = spec["spec"]["replicatedJobs"][0]["template"]["spec"]
    topology = pod["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert topology == TOPOLOGIES["v5e-8"].libtpu_name.split(":")[1]


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
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"PRESET", "WORK"} <= set(env)
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
               REGEN_MESH="", CONFIG="configs/tiny_code.yaml", NAME="tiny", LANES="2",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               REGEN_FLAGS="--max-prompt-tokens 64 --max-new-tokens 24 --batch-size 4 --dtype float32 "
                           "--shard-size 4 --no-progress",
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
