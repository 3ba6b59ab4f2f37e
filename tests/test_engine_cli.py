"""dflash-generate --drafter and dflash-bench end to end on the shipped target."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recount import tau_from_steps

from dflash.cli.bench import main as bench_main
from dflash.cli.generate import main as generate_main
from dflash.config import ModelConfig
from dflash.drafters.dflash import DFlashConfig, build_drafter
from dflash.drafters.dflash.hf import save_drafter
from dflash.errors import CheckpointError, ConfigError
from dflash.io import load_target
from dflash.io.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    """An untrained drafter exported for the shipped target (lossless whatever its quality)."""
    target = load_target("tiny-code")
    tok = load_tokenizer("tiny-code")
    cfg = DFlashConfig.for_target(target.cfg, mask_token_id=tok.mask_token_id, block_size=8, num_layers=1)
    return save_drafter(build_drafter(cfg, seed=0), tmp_path_factory.mktemp("drafter"),
                        target_name="tiny-code", target_cfg=target.cfg)


def run_bench(tmp_path, *args: str) -> tuple[dict, dict[str, list[list[int]]]]:
    """``dflash-bench ARGS --json``: the methods' results, and each method's tokens per prompt."""
    out = tmp_path / "bench.json"
    assert bench_main([*args, "--json", str(out)]) == 0
    methods = json.loads(out.read_text())["methods"]
    return methods, {name: [p["tokens"] for p in m["per_prompt"]] for name, m in methods.items()}


def _gen(capsys, *args):
    assert generate_main(["--prompt", "def area(r):\n", "--max-new-tokens", "40", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_with_drafters_is_lossless_and_reports_tau(capsys, drafter_dir):
    ar = _gen(capsys)
    for extra in (["--drafter", "ngram"], ["--drafter", str(drafter_dir)],
                  ["--drafter", str(drafter_dir), "--ngram-branch"]):
        out = _gen(capsys, *extra, "--block-size", "6")
        assert out["tokens"] == ar["tokens"] and out["text"] == ar["text"]
        assert out["block_size"] == 6
        assert len(out["acceptance_lengths"]) == out["target_forwards"] - 1  # + the prefill pass
        steps = out["acceptance_lengths"]
        # tau counts the tokens the verify steps emitted (all but the prefill's first); the per-step
        # list may claim more where EOS or the budget cut the last step, never less.
        assert out["tau"] == pytest.approx((out["num_tokens"] - 1) / len(steps))
        assert sum(steps[:-1]) < out["num_tokens"] - 1 <= sum(steps)
        assert out["tau"] <= out["mean_acceptance_length"] == pytest.approx(np.mean(steps))
    sampled = _gen(capsys, "--drafter", str(drafter_dir), "--temperature", "0.9", "--verify", "block",
                   "--seed", "4")
    assert sampled["tau"] == tau_from_steps([sampled["tokens"]], [sampled["acceptance_lengths"]])
    assert generate_main(["--prompt", "x", "--drafter", "ngram", "--ngram-branch"]) == 2  # needs DFlash
    err = capsys.readouterr().err
    assert "needs a drafter with argmax drafts of per-position distributions, not NgramDraft" in err
    assert generate_main(["--prompt", "x", "--drafter", str(drafter_dir), "--stochastic-drafts",
                          "--temperature", "1", "--tree-width", "2"]) == 2
    assert "not stochastic drafts" in capsys.readouterr().err


def test_drafter_for_another_target_is_refused(tmp_path):
    other = ModelConfig(model_type="qwen3", vocab_size=4096, hidden_size=64, intermediate_size=96,
                        num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16)
    d = save_drafter(build_drafter(DFlashConfig.for_target(other, mask_token_id=1, block_size=4)), tmp_path)
    from dflash.drafters import load_drafter

    with pytest.raises(CheckpointError, match="hidden_size=64"):
        load_drafter(d, load_target("tiny-code").cfg)


def test_bench_writes_all_methods_from_jsonl_prompts(tmp_path, drafter_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "import os\n\n\ndef main():\n"},
            {"messages": [{"role": "user", "content": "def add(a, b):"}]},
            {"prompt": "class Point:\n    def __init__(self, x, y):\n"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    methods, tokens = run_bench(tmp_path, "--drafter", str(drafter_dir), "--prompts", str(prompts),
                                "--max-new-tokens", "24", "--batch-size", "2", "--plots", str(tmp_path / "f"))
    table = capsys.readouterr().out
    figures = {"acceptance_histogram", "acceptance_by_position", "tau_per_prompt", "speedup_vs_block"}
    assert {p.name for p in (tmp_path / "f").iterdir()} == {f"{n}.png" for n in figures}  # --plots
    assert "speedup" in table and "ngram" in table
    assert set(methods) == {"ar", "ngram", "drafter"}
    for name, r in methods.items():
        assert {"tau", "tokens_per_s", "speedup", "generated_tokens", "per_prompt"} <= set(r), name
        assert len(r["per_prompt"]) == 3 and r["generated_tokens"] > 0
    assert methods["ar"]["tau"] == 1.0 and methods["ar"]["speedup"] == 1.0
    assert tokens["ngram"] == tokens["ar"] == tokens["drafter"]  # greedy: every method gives the AR tokens


def test_bench_compares_drafters_of_different_kinds_side_by_side(tmp_path, drafter_dir, capsys):
    """An MTP head (no mask token) beside a DFlash drafter: the one mask token there is (DFlash's)
    is every row's, and all rows' greedy tokens are AR's; two different mask tokens are refused."""
    from types import SimpleNamespace

    from dflash.cli.bench import _shared_mask_token
    from dflash.drafters.mtp import MTP, MTPConfig, build_head

    target = load_target("tiny-code")
    mtp = MTP.save(build_head(MTPConfig.for_target(target.cfg, block_size=3), seed=1), None, target.cfg,
                   tmp_path / "mtp", target_name="tiny-code")
    methods, tokens = run_bench(tmp_path, "--drafter", str(mtp), "--also", str(drafter_dir),
                                "--num-prompts", "1", "--max-new-tokens", "12")
    assert set(methods) == {"ar", "ngram", "drafter", f"also:{drafter_dir}"}
    assert all(t == tokens["ar"] for t in tokens.values())
    assert f"also:{drafter_dir}" in capsys.readouterr().out
    masks = {n: (None, SimpleNamespace(cfg=SimpleNamespace(mask_token_id=m))) for n, m in (("a", 5), ("b", 7),
                                                                                           ("c", None))}
    with pytest.raises(ConfigError, match="mask tokens differ .*a: 5, b: 7"):
        _shared_mask_token(masks)


def test_generate_with_pallas_kernels_in_interpret_mode_equals_reference(capsys):
    args = ("--drafter", "tiny-code-dflash", "--block-size", "8")
    ref = _gen(capsys, *args, "--attention-impl", "reference")
    pallas = _gen(capsys, *args, "--attention-impl", "pallas")
    assert pallas["tokens"] == ref["tokens"] and pallas["acceptance_lengths"] == ref["acceptance_lengths"]


def test_step_costs_measure_every_pass_of_the_loop():
    from dflash.bench import step_costs
    from dflash.models import build

    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    drafter = build_drafter(DFlashConfig.for_target(cfg, mask_token_id=63, block_size=4,
                                                    target_layer_ids=(1, 2)), seed=1)
    costs = step_costs(build(cfg, seed=0), drafter, block_size=4, context=20, iters=3)
    assert set(costs) == {"ar_step_s", "verify_s", "draft_s", "draft_verify_s", "verify_over_ar"}
    # Ranges, not the formula restated: every pass takes time (a pass XLA had hoisted out of its
    # loop would time as ~0), and none takes a second at this size.
    assert all(0 < v < 1 for name, v in costs.items() if name.endswith("_s"))
    assert np.isfinite(costs["verify_over_ar"]) and costs["verify_over_ar"] > 0


def test_pass_costs_time_every_kind_of_step_and_refuse_a_too_small_cache():
    from dflash.bench import pass_costs
    from dflash.decoding.methods import NgramDraft, NoDraft
    from dflash.decoding.tree import BeamTreeDraft
    from dflash.drafters.dflash import DFlashDraft
    from dflash.errors import CacheOverflowError
    from dflash.models import build

    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    drafter = build_drafter(DFlashConfig.for_target(cfg, mask_token_id=63, block_size=4,
                                                    target_layer_ids=(1, 2)), seed=1)
    chain = DFlashDraft.of(drafter)
    methods = {"ar": (NoDraft(), None, 64), "ngram": (NgramDraft(block_size=4), None, 64),
               "drafter": (chain, drafter, 64),
               "hybrid": (BeamTreeDraft.around(chain, 2, lookup=True), drafter, 64)}
    costs = pass_costs(build(cfg, seed=0), methods, batch=2, context=30, iters=2, repeats=2, mask_token_id=63)
    assert set(costs) == set(methods) and all(0 < c < 10 for c in costs.values())
    with pytest.raises(CacheOverflowError, match="a timed step needs 40 cache slots"):  # 30 + 1 + 3 * 3
        pass_costs(build(cfg, seed=0), {"hybrid": (*methods["hybrid"][:2], 39)}, context=30, mask_token_id=63)


def test_bench_takes_turns_and_reports_the_ceiling(tmp_path, capsys, monkeypatch):
    import dflash.bench.methods as bench_methods  # where bench_methods looks the engine up

    calls = []
    real = bench_methods.speculative_generate

    def recording(target, batch, **kw):
        calls.append((len(batch[0]), type(kw["method"]).__name__))
        return real(target, batch, **kw)

    monkeypatch.setattr(bench_methods, "speculative_generate", recording)
    methods, tokens = run_bench(tmp_path, "--drafter", "tiny-code-dflash", "--num-prompts", "2",
                                "--max-new-tokens", "8", "--block-size", "4", "--ceiling")
    # Batch by batch, every method in turn (run once untimed, then timed), not method by method.
    kinds = ["NoDraft", "NoDraft", "NgramDraft", "NgramDraft", "DFlashDraft", "DFlashDraft"]
    assert [k for _, k in calls] == kinds * 2
    assert len({n for n, _ in calls[:6]}) == 1 and calls[0][0] != calls[6][0]  # two different prompts
    ar = methods["ar"]
    assert ar["ceiling"] == 1.0 and ar["efficiency"] == 1.0
    for r in methods.values():
        assert r["pass_ms"] > 0 and r["max_len"] >= 8
        assert r["ceiling"] == pytest.approx(r["tau"] * ar["pass_ms"] / r["pass_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ceiling"])
    out = capsys.readouterr().out
    assert "ceiling" in out and "achieved" in out


def test_anchor_profile_reproduces_the_engines_steps(tmp_path, capsys):
    """The per-anchor profile walks exactly the verify steps the engine took, for the drafter, for
    prompt lookup, and (the longer of the two per anchor) for the tree with the lookup branch."""
    profile_path = tmp_path / "profile.json"
    methods, tokens = run_bench(tmp_path, "--drafter", "tiny-code-dflash", "--num-prompts", "2",
                                "--max-new-tokens", "40", "--block-size", "8", "--ngram-branch",
                                "--anchor-profile", str(profile_path))
    assert "anchor profile (80 anchors, greedy)" in capsys.readouterr().out
    profile = json.loads(profile_path.read_text())
    for name, method in (("drafter", "drafter"), ("ngram", "ngram"), ("best", "drafter+ngram")):
        engine = [p["acceptance_lengths"] for p in methods[method]["per_prompt"]]
        assert [row["steps"][name] for row in profile["rows"]] == engine, name
        assert profile["summary"][f"tau_{name}"] == pytest.approx(methods[method]["tau"])
        assert profile["summary"][f"mean_acceptance_length_{name}"] == pytest.approx(
            methods[method]["mean_acceptance_length"])
    assert any(a > 1 for row in profile["rows"] for a in row["steps"]["drafter"])  # a real drafter accepts
    row = profile["rows"][0]
    assert len(row["drafter"]) == len(row["ngram"]) == len(row["target_top1"]) == 40
    assert bench_main(["--drafter", "ngram", "--anchor-profile", str(profile_path)]) == 2  # not DFlash
    assert bench_main(["--temperature", "1", "--anchor-profile", str(profile_path)]) == 2  # greedy only
