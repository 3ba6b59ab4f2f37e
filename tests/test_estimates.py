"""The estimates of docs/scaling.md: arithmetic on the compiled plans, with the stated assumptions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dflash.bench.estimates import Assumptions, Run, main, regen_estimate, table, train_estimate

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "scaling"


def test_train_and_regen_estimates_follow_the_plans():
    a = Assumptions(mfu=0.5, decode_efficiency=0.25, prompt_tokens=1000, response_tokens=2072)
    run = Run(conversations=3200, seq_len=3072, batch_size=32, epochs=2)  # 3200 rows of 3072 tokens
    t = train_estimate({"est_step_s": 3.0, "chips": 8}, run, a)
    assert t["steps"] == 200 and t["step_s"] == 6.0 and t["hours"] == pytest.approx(200 * 6 / 3600)
    assert t["chip_hours"] == pytest.approx(8 * t["hours"])
    assert train_estimate({"est_step_s": 3.0, "chips": 8}, Run(1, 3072, 8, 0, steps=20), a)["steps"] == 20
    decode = {"batch": 64, "chips": 8, "passes": {"ar": {"est_s": 0.02}}}  # 3200 tok/s at the bound
    r = regen_estimate(decode, run, chips=16, a=a)  # twice the chips of the plan: twice the rate
    assert r["tokens_per_s_bound"] == pytest.approx(6400) and r["tokens_per_s"] == pytest.approx(1600)
    assert r["hours"] == pytest.approx(3200 * 2072 / 1600 / 3600)


def test_the_table_of_the_shipped_plans(capsys):
    text = table(RESULTS)
    assert "qwen3_8b_dflash (v5e-8)" in text and "qwen3_4b_dflash (v5e-8)" in text
    assert main(["--results", str(RESULTS), "--mfu", "0.7"]) == 0
    faster = capsys.readouterr().out
    row = lambda t: next(line for line in t.splitlines() if line.startswith("| qwen3_8b_dflash"))  # noqa: E731
    hours = lambda line: float(line.split("|")[5].split()[0])  # noqa: E731  ("172.0 h")
    assert math.isclose(hours(row(faster)) * 2, hours(row(text)), rel_tol=0.01)  # 2x MFU: half the time
