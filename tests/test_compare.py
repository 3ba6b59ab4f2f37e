"""``dflash-compare``: recipes x seeds trained on one budget, then decoded side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dflash.bench.compare import Recipe, not_lossless, summarize, train_all
from dflash.cli.compare import main
from dflash.viz.figures import block_curves

ROOT = Path(__file__).resolve().parents[1]

# The recipes shrunk to seconds (the shapes of conftest's tiny_run_config, so compiles are shared):
# 2 steps on 64-token rows, 8 regenerated continuations.
SHRINK = ["data.max_examples=40", "data.seq_len=64", "train.batch_size=4", "train.num_anchors=8",
          "train.save_every=2", "train.eval_every=100", "train.log_every=1", "drafter.block_size=4",
          "regen.num_sequences=8", "regen.prompt_tokens=16", "regen.new_tokens=8", "regen.batch_size=8",
          "eval.heldout_rows=2", "eval.num_prompts=2"]


def test_summary_statistics():
    """mean / min / max / sample sd over seeds; histograms add up; the seed suffix groups runs."""
    hist = [3, 1, 0, 2]
    result = {"methods": {f"a/s{s}": {"tau": t, "block_size": 4, "acceptance_histogram": hist}
                          for s, t in [(0, 1.5), (1, 2.5), (2, 2.0)]}}
    result["methods"]["ar"] = {"tau": 1.0, "block_size": 1, "acceptance_histogram": [5]}
    g = summarize({"0": result})["0"]
    assert g["a"]["taus"] == [1.5, 2.5, 2.0] and g["a"]["seeds"] == [0, 1, 2]
    assert g["a"]["mean"] == pytest.approx(2.0) and (g["a"]["min"], g["a"]["max"]) == (1.5, 2.5)
    assert g["a"]["std"] == pytest.approx(np.std([1.5, 2.5, 2.0], ddof=1))
    assert g["a"]["acceptance_histogram"] == [9, 3, 0, 6]
    assert g["ar"]["seeds"] == [None] and g["ar"]["std"] == 0.0


def test_compare_trains_seeds_on_shared_data_and_decodes_losslessly(tiny_target, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--config", "tiny_code", "--config", str(ROOT / "configs/tiny_code_mtp.yaml"),
            "--seeds", "1", "--steps", "2", "--out", str(out), "--set", f"target.name={tiny_target}",
            *[a for s in SHRINK for a in ("--set", s)], "--temperatures", "0", "--block-sizes", "2,8",
            "--num-prompts", "2", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress",
            "--json", str(tmp_path / "cmp.json"), "--plots", str(tmp_path / "fig")]
    assert main(args) == 0
    record = json.loads((tmp_path / "cmp.json").read_text())
    runs = ["tiny_code-seed1", "tiny_code_mtp-seed1"]
    first = out / runs[0] / "regenerated.npz"
    for run in runs:  # every run trained its 2 steps under seed 1, on the first run's regenerated data
        assert json.loads((out / run / "metrics.json").read_text())["steps"] == 2
        assert "seed: 1" in (out / run / "config.yaml").read_text().split("train:")[1]
        assert (out / run / "regenerated.npz").read_bytes() == first.read_bytes()
    result = record["results"]["0"]["methods"]
    # each drafter at its own block and at 2 (MTP: a chain of 1 step); 8 is not smaller than either's
    variants = ("tiny_code", "tiny_code@B2", "tiny_code_mtp", "tiny_code_mtp@B2")
    assert set(result) == {"ar", "ngram", *(f"{r}/s1" for r in variants)}
    ar = [p["tokens"] for p in result["ar"]["per_prompt"]]
    for name, r in result.items():  # greedy: every method emits the target's own tokens
        assert [p["tokens"] for p in r["per_prompt"]] == ar, name
    assert record["results"]["0"]["not_lossless"] == []  # and the command found so
    summary = record["summary"]["0"]
    assert summary["tiny_code"]["taus"] == [result["tiny_code/s1"]["tau"]]
    assert summary["tiny_code"]["seeds"] == [1]
    curves = block_curves(summary)  # tau_by_block.png's points: drafts per step of each chain
    drafts = {r: [k for k, _ in pts] for r, pts in curves.items()}
    assert drafts == {"tiny_code": [1, 3], "tiny_code_mtp": [1, 3], "ngram": [3]}
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["acceptance_T0.png", "tau_by_block.png",
                                                              "tau_by_method.png"]
    assert "tiny_code_mtp" in capsys.readouterr().out

    # Called again, nothing trains (every run is complete): the runs come back as they are.
    logs: list[str] = []
    recipes = [Recipe(n, ROOT / f"configs/{n}.yaml") for n in ("tiny_code", "tiny_code_mtp")]
    overrides = [f"target.name={tiny_target}", *SHRINK, "train.steps=2"]
    again = train_all(recipes, [1], out, overrides, progress=False, log=logs.append)
    assert sorted(p.name for p in again.values()) == sorted(runs)
    assert sum("already complete" in line for line in logs) == 2


def test_a_method_whose_greedy_tokens_differ_from_ar_is_named():
    rows = lambda *toks: {"per_prompt": [{"tokens": t} for t in toks]}  # noqa: E731
    result = {"methods": {"ar": rows([1, 2], [3]), "ok": rows([1, 2], [3]), "bad": rows([1, 2], [4]),
                          "short": rows([1], [3])}}
    assert not_lossless(result) == ["bad", "short"]


def test_compare_refuses_runs_on_different_targets(tmp_path, capsys):
    code = main(["--config", str(ROOT / "configs/tiny_code.yaml"), "--config",
                 str(ROOT / "configs/qwen3_8b_eagle3.yaml"), "--out", str(tmp_path), "--eval-only"])
    assert code != 0
    assert "different targets" in capsys.readouterr().err
    code = main(["--config", "tiny_code", "--config", "tiny_code_mtp", "--out", str(tmp_path), "--eval-only"])
    assert code != 0
    assert "have no export yet" in capsys.readouterr().err
