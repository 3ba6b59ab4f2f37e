"""The arithmetic of ``dflash.bench.draft_costs`` on hand-computed numbers (no compile)."""

import pytest

from dflash.bench.draft_costs import method_rows, speedup_ceiling, step_over_ar


def test_step_cost_and_ceiling():
    assert step_over_ar(1.2e-3, 0.3e-3, 1.0e-3) == pytest.approx(1.5)  # breaks even at tau 1.5
    assert speedup_ceiling(3.0, 1.5, max_tau=8) == pytest.approx(2.0)
    assert speedup_ceiling(9.0, 1.5, max_tau=4) == pytest.approx(4 / 1.5)  # a step commits <= its width
    with pytest.raises(ValueError, match="AR step"):
        step_over_ar(1.0, 0.0, 0.0)


def test_method_rows():
    verify = {1: 10.0, 2: 10.5, 3: 11.0, 4: 11.5, 8: 13.0}
    rows = method_rows(verify, 10.0, {8: 2.0}, {"assistant": 0.5}, taus=(3.0,), ks=(1, 3), lookups=(4,))
    got = {r["method"]: r for r in rows}
    assert list(got) == ["lookup γ=4", "assistant k=1", "assistant k=3", "DFlash B=8"]
    assert got["lookup γ=4"]["step_over_ar"] == pytest.approx(1.15)
    k3 = got["assistant k=3"]  # verify of 4 tokens + 3 sequential steps of 0.5
    assert (k3["verify_tokens"], k3["draft_s"]) == (4, pytest.approx(1.5))
    assert k3["break_even_tau"] == pytest.approx(1.3)
    assert k3["ceiling"]["3.0"] == pytest.approx(3.0 / 1.3)
    assert got["assistant k=1"]["ceiling"]["3.0"] == pytest.approx(2.0 / 1.1)  # tau capped at k + 1
    assert got["DFlash B=8"]["step_over_ar"] == pytest.approx(1.5)


def test_a_target_without_an_assistant_is_refused_before_compiling():
    from dflash.bench.draft_costs import draft_costs
    from dflash.errors import ConfigError

    with pytest.raises(ConfigError, match="--target 'qwen3_8b' is not a Gemma 4 target"):
        draft_costs("qwen3_8b", "v5e-8")
