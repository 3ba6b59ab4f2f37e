"""The MoE speculation ceiling's cost model (dflash.bench.moe_ceiling): distinct experts, bytes
read per pass and the fitted acceptance, against brute force and exact formulas."""

from __future__ import annotations

import itertools

import pytest

from dflash.bench.moe_ceiling import ceiling, expected_tau, fit_alpha
from dflash.config import preset
from dflash.flops import params_read
from dflash.models.moe_mlp import expected_experts


@pytest.mark.parametrize("experts,top_k,tokens", [(4, 2, 2), (5, 1, 3), (6, 3, 2), (5, 2, 3)])
def test_expected_distinct_experts_equals_the_enumeration(experts, top_k, tokens):
    """Every token picks one of the C(E, k) expert sets with equal probability: the mean number of
    distinct experts over all C(E, k)^n outcomes is the formula's."""
    sets = list(itertools.combinations(range(experts), top_k))
    outcomes = list(itertools.product(sets, repeat=tokens))
    mean = sum(len(set().union(*o)) for o in outcomes) / len(outcomes)
    assert expected_experts(experts, top_k, tokens) == pytest.approx(mean, rel=1e-12)


def test_a_pass_reads_the_routed_experts_and_the_looked_up_embedding_rows():
    dense, moe = preset("qwen3_8b"), preset("qwen3_30b_a3b")
    assert not dense.tie_word_embeddings and not moe.tie_word_embeddings
    embed_unread = (dense.vocab_size - 16) * dense.hidden_size
    assert params_read(dense, 16) == dense.num_params() - embed_unread  # a dense pass reads every layer
    spec = moe.layers[0]
    e, k, d, f = (spec.mlp_option("experts"), spec.mlp_option("top_k"), moe.hidden_size,
                  spec.mlp_option("intermediate_size"))
    one = moe.num_params() - moe.num_layers * (e - k) * 3 * d * f - (moe.vocab_size - 1) * d
    assert params_read(moe, 1) == pytest.approx(one, rel=1e-12)  # one token: its k experts per layer
    assert params_read(moe, 1) < params_read(moe, 4) < params_read(moe, 16) < moe.num_params()
    # Qwen3-30B-A3B's "A3B": one token reads ~3.3 B of the 30.5 B parameters.
    assert 3.0e9 < params_read(moe, 1) < 3.6e9


def test_the_fitted_acceptance_gives_the_reference_tau_and_the_ceiling_uses_it():
    alpha = fit_alpha(6.49, 16)
    assert expected_tau(alpha, 16) == pytest.approx(6.49, abs=1e-9)
    assert expected_tau(alpha, 1) == 1.0 and expected_tau(1.0, 8) == 8.0
    plan = {"target": "qwen3_30b_a3b", "topology": "v5e-8", "mesh": {"tensor": 8}, "batch": 1,
            "context": 2048, "per_device_bytes": {"target": 7.6e9, "cache": 0.1e9}, "all_fit": True}
    result = ceiling(plan)
    rows = {r["gamma"]: r for r in result["rows"]}
    assert rows[1]["verify_over_ar"] == 1.0 and rows[1]["experts_per_layer"] == 8.0
    assert rows[16]["tau"] == pytest.approx(6.49, abs=1e-9)
    verify = [rows[g]["verify_over_ar"] for g in (1, 2, 4, 8, 16)]
    assert verify == sorted(verify) and verify[-1] > 2  # 16 tokens reach ~1/2 of 128 experts: >2x the bytes
    for r in rows.values():
        assert r["speedup_ceiling"] == pytest.approx(r["tau"] / r["verify_over_ar"])
