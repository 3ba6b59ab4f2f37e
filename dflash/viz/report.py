"""``write_report(run_dir)``: a one-page Markdown report of a training run, with its figures.

It reads what the run wrote — ``config.yaml``, ``scalars.csv`` (dflash.training.scalars) and,
once the run finished, ``metrics.json`` — and writes ``RUN_DIR/report/report.md`` next to its
PNGs. Every section is always present (``SECTIONS``); one whose data the run does not have
yet says so instead of a figure, so an unfinished run still gets a report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dflash.training.scalars import histogram_counts, read_scalars
from dflash.viz import figures as F
from dflash.viz.errors import VizError

SECTIONS = ("Summary", "Training curves", "Held-out τ vs prompt lookup", "Acceptance histogram",
            "Acceptance by draft position", "Config")
EVAL_HISTOGRAM = "eval/acceptance"  # the ScalarLog histogram tag of the simulated acceptance lengths


def _lengths(counts: Any) -> list[int]:
    """Counts of lengths 1..K -> the lengths themselves (what the acceptance figures take)."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(1, len(counts) + 1), counts).tolist()


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def report_data(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, read from the run directory (no figures)."""
    if not (run_dir / "config.yaml").exists():
        raise VizError(f"{run_dir} is not a training run directory (no config.yaml)")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    scalars = read_scalars(run_dir / "scalars.csv") if (run_dir / "scalars.csv").exists() else {}
    lengths: dict[str, list[int]] = {}
    if metrics.get("acceptance_histogram"):
        lengths["drafter, decoding"] = _lengths(metrics["acceptance_histogram"])
    if metrics.get("acceptance_histogram_ngram"):
        lengths["prompt lookup, decoding"] = _lengths(metrics["acceptance_histogram_ngram"])
    sim = histogram_counts(scalars, EVAL_HISTOGRAM)
    if sim.size:
        lengths["drafter, simulated (last eval)"] = _lengths(sim)
    taus = {name: metrics[key] for key, name in (("tau", "drafter"), ("tau_ngram", "prompt lookup"),
                                                 ("tau_with_ngram", "drafter + lookup branch"))
            if key in metrics}
    # The histogram's legend gives the decoding τ of the summary (design §7), not the lengths' mean.
    length_taus = {name: metrics[key] for key, name in (("tau", "drafter, decoding"),
                                                        ("tau_ngram", "prompt lookup, decoding"))
                   if key in metrics and name in lengths}
    return {"config": (run_dir / "config.yaml").read_text(), "metrics": metrics, "scalars": scalars,
            "lengths": lengths, "taus": taus, "length_taus": length_taus,
            "block_size": metrics.get("block_size")}


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``report.md`` and its PNGs under ``out`` (default ``RUN_DIR/report``); returns report.md."""
    run_dir = Path(run_dir)
    d = report_data(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    m = d["metrics"]
    parts = [f"# Training run `{run_dir}`", ""]

    parts += ["## Summary", ""]
    rows = [("method", m.get("method")), ("block size", m.get("block_size")), ("steps", m.get("steps")),
            ("best step (simulated τ per verify step)", m.get("best_step")),
            ("best simulated τ", m.get("best_tau_sim"))]
    final = m.get("final_eval") or {}
    rows += [("final simulated τ per anchor / per step",
              f"{_fmt(final['tau_sim'])} / {_fmt(final['tau_sim_steps'])}" if final else None)]
    rows += [(f"held-out τ, {name}", value) for name, value in d["taus"].items()]
    rows += [("export", m.get("export_dir")),
             ("outputs differ", ", ".join(m.get("outputs_differ", [])) or None)]
    if m:
        parts += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    else:
        parts += ["The run has not finished: no `metrics.json` yet. The curves below are the steps so far."]

    def figure(section: str, name: str, fig: Any, caption: str) -> None:
        F.save(fig, out / name)
        parts.extend(["", f"## {section}", "", caption, "", f"![{section}]({name})"])

    def missing(section: str, why: str) -> None:
        parts.extend(["", f"## {section}", "", f"_Not available: {why}._"])

    if d["scalars"]:
        figure("Training curves", "training_curves.png", F.training_curves(d["scalars"], m),
               "Train and eval loss; simulated τ (per anchor and per verify step) with the real held-out τ "
               "at the end; eval accuracy of each draft position over the steps.")
    else:
        missing("Training curves", "the run has no scalars.csv")
    if d["taus"]:
        figure("Held-out τ vs prompt lookup", "tau.png", F.tau_comparison(d["taus"]),
               f"Greedy speculative decoding of {m.get('eval_prompts', '?')} held-out prompts "
               "(tokens per verify step).")
    else:
        missing("Held-out τ vs prompt lookup", "no final evaluation in metrics.json")
    if d["lengths"]:
        k = d["block_size"] or F.block_size_of(d["lengths"], None)
        figure("Acceptance histogram", "acceptance.png",
               F.acceptance_histogram(d["lengths"], k, taus=d["length_taus"]),
               "Share of verify steps (decoding) or of held-out blocks (simulated) accepting 1 .. B tokens.")
        figure("Acceptance by draft position", "positions.png", F.position_plot(d["lengths"], k),
               "Share of steps whose draft at each position was accepted: where in the block drafts fail.")
    else:
        missing("Acceptance histogram", "no acceptance counts in metrics.json or scalars.csv")
        missing("Acceptance by draft position", "no acceptance counts in metrics.json or scalars.csv")
    parts += ["", "## Config", "", "```yaml", d["config"].rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
