"""Figures are checked on the data behind them (and their PNG size); the token view round-trips to
the same token ids; the scalars log is resume-safe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dflash.training.scalars import ScalarLog, histogram_counts, read_scalars
from dflash.viz import figures as F
from dflash.viz import tokens as T
from dflash.viz.errors import VizError


def png_size(fig, tmp_path, name="f.png") -> tuple[int, int]:
    with Image.open(F.save(fig, tmp_path / name)) as im:
        return im.size


def bar_heights(ax) -> list[np.ndarray]:
    return [np.array([p.get_height() for p in c]) for c in ax.containers]


def bench_result(block: int, lengths: dict[str, list[list[int]]], speedup: dict[str, float],
                 ceiling: dict[str, float] | None = None) -> dict:
    """A dflash-bench --json result of the shape bench_methods writes (no step cut by EOS or the
    budget: τ is the mean acceptance length)."""
    ar_prompt = {"tau": 1.0, "acceptance_lengths": [1]}
    methods = {"ar": {"block_size": 1, "speedup": 1.0, "tau": 1.0, "per_prompt": [ar_prompt]}}
    for name, rows in lengths.items():
        methods[name] = {"block_size": block, "speedup": speedup[name], "tau": float(np.mean(sum(rows, []))),
                         "per_prompt": [{"tau": float(np.mean(r)), "acceptance_lengths": r} for r in rows]}
        if ceiling:
            methods[name]["ceiling"] = ceiling[name]
    return {"methods": methods}


def test_acceptance_histogram_counts_the_lengths(tmp_path):
    rng = np.random.default_rng(0)
    k = 7
    lengths = {"drafter": rng.integers(1, k + 1, 53).tolist(), "ngram": [1, 1, 2, 7, 7, 3]}
    expected = {n: np.array([v.count(i) for i in range(1, k + 1)]) for n, v in lengths.items()}
    for name, v in lengths.items():
        assert F.acceptance_counts(v, k).tolist() == expected[name].tolist()
    # τ comes with the lengths (they overstate it where a last step was cut): the legend shows it as given.
    fig = F.acceptance_histogram(lengths, k, taus={"ngram": 3.25})
    (ax,) = fig.axes
    for heights, name in zip(bar_heights(ax), lengths, strict=True):
        np.testing.assert_allclose(heights, expected[name] / len(lengths[name]))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["drafter", "ngram (τ 3.25)"]
    assert png_size(fig, tmp_path) == (800, 450)
    with pytest.raises(VizError, match="exceeds the block size 7"):
        F.acceptance_histogram({"x": [8]}, 7)
    with pytest.raises(VizError, match="1..4"):
        F.acceptance_counts([0, 2], 4)


def test_the_report_histogram_shows_the_summary_tau(tmp_path, monkeypatch):
    """Prompt lookup's last step was cut (lengths 1, 1, 2, 4, 4: mean 2.4, but 11 tokens in 5 steps):
    the histogram's legend gives the τ of the summary table (design §7), not the lengths' mean."""
    from dflash.viz.report import write_report

    (tmp_path / "config.yaml").write_text("method: dflash\n")
    (tmp_path / "metrics.json").write_text(json.dumps({
        "block_size": 4, "tau": 1.5, "tau_ngram": 2.2, "acceptance_histogram": [1, 1, 0, 0],
        "acceptance_histogram_ngram": [2, 1, 0, 2]}))
    figures = {}
    monkeypatch.setattr(F, "save", lambda fig, path: figures.setdefault(Path(path).name, fig))
    text = write_report(tmp_path).read_text()
    assert "| held-out τ, prompt lookup | 2.20 |" in text
    legend = [t.get_text() for t in figures["acceptance.png"].axes[0].get_legend().get_texts()]
    assert legend == ["drafter, decoding (τ 1.50)", "prompt lookup, decoding (τ 2.20)"]


def test_position_acceptance_is_the_share_of_steps_past_each_draft(tmp_path):
    lengths, k = [1, 3, 3, 5, 2], 5
    # draft k accepted <=> length >= k + 1
    expected = [np.mean([a >= j + 1 for a in lengths]) for j in range(1, k)]
    got = F.position_acceptance(lengths, k)
    np.testing.assert_allclose(got, expected)
    assert got.sum() == pytest.approx(np.mean(lengths) - 1)  # sums to the mean accepted drafts
    fig = F.position_plot({"a": lengths, "b": [5, 5]}, k)
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), expected)
    np.testing.assert_allclose(lines[1].get_ydata(), [1, 1, 1, 1])
    assert lines[0].get_xdata().tolist() == [1, 2, 3, 4]
    assert png_size(fig, tmp_path) == (800, 450)


def test_bench_figures_read_bench_results(tmp_path):
    rows = {"drafter": [[1, 4, 2], [3, 3]], "ngram": [[2, 2, 2, 1], [1]]}
    b8 = bench_result(8, rows, {"drafter": 1.3, "ngram": 1.6}, {"drafter": 1.5, "ngram": 1.7})
    b4 = bench_result(4, rows, {"drafter": 1.1, "ngram": 1.4})
    assert F.lengths_from_bench(b8) == {"drafter": [1, 4, 2, 3, 3], "ngram": [2, 2, 2, 1, 1]}  # AR left out
    taus = F.taus_from_bench(b8)
    assert taus == {"drafter": [7 / 3, 3.0], "ngram": [7 / 4, 1.0]}
    fig = F.tau_per_prompt(taus)
    for heights, name in zip(bar_heights(fig.axes[0]), taus, strict=True):
        np.testing.assert_allclose(heights, taus[name])
    assert png_size(fig, tmp_path) == (800, 450)
    points = F.speedup_points([b8, b4])
    assert points["drafter"]["block"] == [4, 8] and points["drafter"]["speedup"] == [1.1, 1.3]
    assert np.isnan(points["drafter"]["ceiling"][0]) and points["drafter"]["ceiling"][1] == 1.5
    fig = F.speedup_vs_block([b8, b4])
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert lines["ngram"].get_ydata().tolist() == [1.4, 1.6]
    assert lines["ngram ceiling"].get_ydata()[1] == 1.7 and lines["AR"].get_ydata()[0] == 1.0
    assert png_size(fig, tmp_path) == (800, 450)
    with pytest.raises(VizError, match="same block size"):
        F.speedup_points([b8, b8])
    with pytest.raises(VizError, match="not a dflash-bench result"):
        F.lengths_from_bench({"tau": 1})
    paths = F.bench_figures(b8, tmp_path / "plots")  # dflash-bench --plots DIR
    assert [p.name for p in paths] == ["acceptance_histogram.png", "acceptance_by_position.png",
                                       "tau_per_prompt.png", "speedup_vs_block.png"]
    assert all(Image.open(p).size == (800, 450) for p in paths)
    fig = F.tau_comparison({"drafter": 1.4, "lookup": 3.6})
    np.testing.assert_allclose(bar_heights(fig.axes[0])[0], [1.4, 3.6])
    assert png_size(fig, tmp_path) == (800, 450)


def test_scalars_log_is_resume_safe_and_feeds_the_training_curves(tmp_path):
    log = ScalarLog(tmp_path, tensorboard=True)
    for step in (10, 20, 30):
        log.scalars(step, {"train/loss": 5.0 - step / 10, "train/tau_sim": 1 + step / 100})
    log.scalars(20, {"eval/loss": 4.2, "eval/tau_sim": 1.5, "eval/tau_sim_steps": 1.2,
                     "eval_accuracy/pos_1": 0.5, "eval_accuracy/pos_2": 0.25})
    log.histogram("eval/acceptance", [3, 0, 2], 20)
    log.close()
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events beside the CSV
    # A run killed after step 30, resumed from its step-20 checkpoint: rows past 20 are dropped.
    seen = []
    log = ScalarLog(tmp_path, start_step=20, tensorboard=False,
                    on_write=lambda s, v: seen.append((s, dict(v))))
    log.scalars(30, {"train/loss": 1.75})
    log.close()
    assert seen == [(30, {"train/loss": 1.75})]
    s = read_scalars(tmp_path)
    assert s["train/loss"][0].tolist() == [10, 20, 30] and s["train/loss"][1].tolist() == [4.0, 3.0, 1.75]
    assert histogram_counts(s, "eval/acceptance").tolist() == [3, 0, 2]
    fig = F.training_curves(s, {"tau": 1.4, "tau_ngram": 3.6})
    loss_ax, tau_ax, acc_ax = fig.axes[:3]
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert lines["train"].get_ydata().tolist() == [4.0, 3.0, 1.75]
    assert lines["eval"].get_ydata().tolist() == [4.2]
    tau_lines = {ln.get_label(): ln for ln in tau_ax.get_lines()}
    assert tau_lines["eval, per verify step"].get_ydata().tolist() == [1.2]
    assert tau_lines["real τ (prompt lookup)"].get_xdata().tolist() == [30]
    np.testing.assert_allclose(np.asarray(acc_ax.collections[0].get_array()).reshape(2, 1), [[0.5], [0.25]])
    # Each column spans the steps since the previous eval: the axis runs from 0 to the last eval step.
    assert acc_ax.get_xlim() == (0, 20)
    assert F._edges(np.array([10, 20])).tolist() == [0, 10, 20]  # a 20-step run: not 5 .. 25
    assert F._edges(np.array([4, 6, 10])).tolist() == [0, 4, 6, 10]
    assert png_size(fig, tmp_path) == (1200, 400)
    fresh = ScalarLog(tmp_path, tensorboard=False)  # a new run starts the file over
    fresh.close()
    assert read_scalars(tmp_path) == {}


def test_steps_split_and_render_round_trip_to_the_token_ids():
    from dflash.io.tokenizer import load_tokenizer

    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    steps = T.split_steps(tokens, [3, 1, 4])  # the last step was cut after 3 of its 4 tokens
    assert steps == [T.Step((), 5), T.Step((6, 7), 8), T.Step((), 9), T.Step((10, 11, 12), None)]
    assert [t for s in steps for t in s.tokens] == tokens
    with pytest.raises(VizError, match="not the last"):
        T.split_steps(tokens, [5, 4, 1])
    with pytest.raises(VizError, match="account for 5 of 8"):
        T.split_steps(tokens, [2, 2])
    tok = load_tokenizer("tiny-code")
    texts = T.TokenTexts(tok)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(tok), 300).tolist()  # every kind of token, special ones included
    lengths = [int(a) for a in rng.integers(1, 9, 100)]
    while sum(lengths) > len(ids) - 2:  # leave at least one token for the cut last step
        lengths.pop()
    lengths.append(len(ids) - 1 - sum(lengths) + 2)  # a last step cut before its bonus
    steps = T.split_steps(ids, lengths)
    rendered = "prompt text\n" + T.render_terminal(steps, texts)
    assert T.parse_terminal(rendered, texts) == steps
    html = T.render_html(steps, texts, prompt="p")
    assert html.count("data-id=") == len(ids) and 'data-kind="bonus"' in html
    plain = T.render_plain(steps, texts)
    assert "\x1b" not in plain
    assert T.parse_plain(plain) == [("".join(map(texts.text, s.drafts)),
                                     None if s.bonus is None else texts.text(s.bonus)) for s in steps]


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("mode", "tty", "env", "expected"), [
    ("auto", True, {}, True), ("auto", False, {}, False),  # a terminal only
    ("auto", True, {"NO_COLOR": "1"}, False), ("auto", True, {"NO_COLOR": ""}, True),  # empty: unset
    ("auto", False, {"FORCE_COLOR": "1"}, True), ("auto", True, {"NO_COLOR": "1", "FORCE_COLOR": "1"}, False),
    ("always", False, {"NO_COLOR": "1"}, True), ("never", True, {"FORCE_COLOR": "1"}, False),
])
def test_colour_only_for_a_terminal_unless_told(mode, tty, env, expected):
    assert T.wants_color(mode, _Stream(tty), env) is expected


def test_generate_show_steps_round_trips_to_the_same_token_ids(capsys):
    from dflash.cli.generate import main
    from dflash.io.tokenizer import load_tokenizer

    args = ["--drafter", "tiny-code-dflash", "--block-size", "8", "--prompt", "def area(r):\n",
            "--max-new-tokens", "40"]
    assert main([*args, "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main([*args, "--show-steps", "--color", "always"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("def area(r):\n") and "\x1b[32m" in shown  # some drafts were accepted
    texts = T.TokenTexts(load_tokenizer("tiny-code"))
    steps = T.parse_terminal(shown, texts)
    assert [t for s in steps for t in s.tokens] == ref["tokens"]
    lens = [len(s.tokens) for s in steps[1:]]
    assert lens[:-1] == ref["acceptance_lengths"][:-1]
    # The budget cut the last step (1 + 3 + 4 x 8 = 36 tokens, then 4 of its 8): drafts, no bonus.
    assert lens[-1] < ref["acceptance_lengths"][-1] and steps[-1].bonus is None
    assert main([*args, "--json", "--show-steps"]) == 0
    as_json = json.loads(capsys.readouterr().out)["steps"]
    assert [T.Step(tuple(s["drafts"]), s["bonus"]) for s in as_json] == steps
    # Captured stdout is no terminal: the same steps, bracketed, and not one escape code.
    assert main([*args, "--show-steps"]) == 0
    plain = capsys.readouterr().out
    assert "\x1b" not in plain and T.PLAIN_LEGEND in plain
    body = plain.removeprefix("def area(r):\n").split("\n\n")[0]
    assert T.parse_plain(body) == T.parse_plain(T.render_plain(steps, texts))
    assert len(T.parse_plain(body)) == len(steps)


def test_speedup_command_reads_committed_bench_results(tmp_path):
    from dflash.viz.__main__ import main

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    results = sorted(docs.glob("bench_ceiling_b*_stage5.json"))
    assert len(results) == 3
    assert main(["speedup", str(tmp_path / "s.png"), *map(str, results)]) == 0
    assert Image.open(tmp_path / "s.png").size == (800, 450)
    assert main(["speedup", str(tmp_path / "t.png"), str(results[0]), str(results[0])]) == 2  # same B twice
