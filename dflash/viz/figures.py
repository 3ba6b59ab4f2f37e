"""Figures of speculative decoding and training (matplotlib, no display needed).

Every figure takes what the CLIs already write (``dflash-bench --json`` results, a run's
``scalars.csv`` and ``metrics.json``) or the engine's ``SpecResult`` lists, and returns a
``matplotlib.figure.Figure`` of a fixed size (``FIGSIZE`` at ``DPI``). The numbers each one
plots come from a small pure function next to it (``acceptance_counts``, ``position_acceptance``,
...), which the tests check against hand-computed values and against the artists in the figure.
No pyplot: figures are plain ``Figure`` objects, so nothing depends on a GUI backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dflash.viz.errors import VizError

DPI = 100
FIGSIZE = (8.0, 4.5)  # inches: 800 x 450 PNGs
WIDE = (12.0, 4.0)  # the three-panel training curves: 1200 x 400


def new_figure(size: tuple[float, float] = FIGSIZE, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save(fig: Figure, path: str | Path) -> Path:
    """Writes ``fig`` as a PNG of exactly its size in pixels (figsize x DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


# ----------------------------------------------------------------------------- inputs
def _methods(result: Mapping[str, Any]) -> Mapping[str, Any]:
    if "methods" not in result:
        raise VizError(f"not a dflash-bench result (no 'methods' key; keys: {sorted(result)})")
    return result["methods"]


def lengths_from_bench(result: Mapping[str, Any], *, drafting_only: bool = True) -> dict[str, list[int]]:
    """``dflash-bench --json`` -> method -> acceptance lengths of all its verify steps, all prompts.

    ``drafting_only`` leaves out AR (block size 1: every step accepts exactly one token)."""
    out = {}
    for name, m in _methods(result).items():
        if drafting_only and m.get("block_size", 1) <= 1:
            continue
        out[name] = [a for p in m["per_prompt"] for a in p["acceptance_lengths"]]
    return out


def taus_from_bench(result: Mapping[str, Any], *, drafting_only: bool = True) -> dict[str, list[float]]:
    """``dflash-bench --json`` -> method -> tau of each prompt (in prompt order)."""
    return {name: [float(p["tau"]) for p in m["per_prompt"]] for name, m in _methods(result).items()
            if not (drafting_only and m.get("block_size", 1) <= 1)}


def block_size_of(lengths: Mapping[str, Sequence[int]], block_size: int | None) -> int:
    """The block size to plot: as given, else the longest acceptance length seen."""
    longest = max((max(v) for v in lengths.values() if len(v)), default=1)
    if block_size is not None and longest > block_size:
        raise VizError(f"an acceptance length of {longest} exceeds the block size {block_size}")
    return block_size or longest


# ----------------------------------------------------------------------------- acceptance
def acceptance_counts(lengths: Sequence[int], block_size: int) -> np.ndarray:
    """``[K]`` counts of verify steps that accepted 1 .. K tokens (drafts + the bonus)."""
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.size and (arr.min() < 1 or arr.max() > block_size):
        raise VizError(f"acceptance lengths must lie in 1..{block_size}; got {arr.min()}..{arr.max()}")
    return np.bincount(arr - 1, minlength=block_size)[:block_size] if arr.size else np.zeros(block_size, int)


def acceptance_histogram(lengths: Mapping[str, Sequence[int]], block_size: int | None = None,
                         *, taus: Mapping[str, float] | None = None,
                         title: str = "Tokens accepted per verify step") -> Figure:
    """Grouped bars: for each method, the share of its verify steps that accepted 1 .. K tokens
    (the data behind the bars: ``acceptance_counts`` / steps). A method in ``taus`` shows its τ in
    the legend. τ is given, not computed here: it counts the tokens the steps emitted (design §7),
    which the lengths alone overstate when EOS or the budget cut a last step."""
    k = block_size_of(lengths, block_size)
    taus = taus or {}
    fig, (ax,) = new_figure()
    width = 0.8 / max(len(lengths), 1)
    x = np.arange(1, k + 1)
    for i, (name, values) in enumerate(lengths.items()):
        counts = acceptance_counts(values, k)
        share = counts / max(counts.sum(), 1)
        label = f"{name} (τ {taus[name]:.2f})" if name in taus else name
        ax.bar(x + (i - (len(lengths) - 1) / 2) * width, share, width, label=label)
    ax.set(xlabel="tokens accepted in the step (accepted drafts + 1)", ylabel="share of verify steps",
           title=title, xticks=x)
    ax.legend()
    return fig


def position_acceptance(lengths: Sequence[int], block_size: int) -> np.ndarray:
    """``[K-1]``: the share of verify steps whose draft at position k (1 .. K-1) was accepted.

    A step of acceptance length a accepted drafts 1 .. a-1, so the values fall with k and sum
    to the mean number of accepted drafts (the mean acceptance length - 1)."""
    counts = acceptance_counts(lengths, block_size)  # [K]: steps with length 1..K
    steps = max(counts.sum(), 1)
    # draft k accepted <=> length >= k + 1: the tail sums of the counts from index k on.
    return np.cumsum(counts[::-1])[::-1][1:] / steps


def position_plot(lengths: Mapping[str, Sequence[int]], block_size: int | None = None) -> Figure:
    """Lines: for each method, the share of verify steps that accepted each draft position —
    where in the block the drafter stops being right."""
    k = block_size_of(lengths, block_size)
    fig, (ax,) = new_figure()
    x = np.arange(1, k)
    for name, values in lengths.items():
        ax.plot(x, position_acceptance(values, k), marker="o", label=name)
    ax.set(xlabel="draft position in the block", ylabel="share of steps accepting it",
           title="Acceptance by draft position", ylim=(0, 1.02), xticks=x)
    ax.legend()
    return fig


def tau_per_prompt(taus: Mapping[str, Sequence[float]]) -> Figure:
    """Grouped bars: each method's tau on each prompt (same prompt order for all methods)."""
    n = {len(v) for v in taus.values()}
    if len(n) > 1:
        raise VizError(f"methods have different prompt counts: { {k: len(v) for k, v in taus.items()} }")
    fig, (ax,) = new_figure()
    count = n.pop() if n else 0
    width = 0.8 / max(len(taus), 1)
    x = np.arange(count)
    for i, (name, values) in enumerate(taus.items()):
        ax.bar(x + (i - (len(taus) - 1) / 2) * width, values, width, label=name)
    ax.set(xlabel="prompt", ylabel="τ (tokens per verify step)", title="τ per prompt", xticks=x)
    ax.legend()
    return fig


def tau_comparison(taus: Mapping[str, float], *, title: str = "Held-out τ") -> Figure:
    """Bars: one tau per method (e.g. a run's drafter against prompt lookup)."""
    fig, (ax,) = new_figure()
    names = list(taus)
    bars = ax.bar(names, [taus[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.2f")
    ax.set(ylabel="τ (tokens per verify step)", title=title)
    return fig


# ----------------------------------------------------------------------------- speedup
def speedup_points(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Several ``dflash-bench --json`` results (one per block size) -> method -> sorted
    ``block``, ``speedup`` and (``--ceiling`` runs) ``ceiling`` lists. AR is the 1.0 line."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for result in results:
        for name, m in _methods(result).items():
            if m.get("block_size", 1) > 1:
                points.setdefault(name, []).append(
                    (int(m["block_size"]), float(m["speedup"]), float(m.get("ceiling", np.nan))))
    out = {}
    for name, pts in points.items():
        pts.sort()
        blocks = [p[0] for p in pts]
        if len(set(blocks)) != len(blocks):
            raise VizError(f"method {name!r} has two results at the same block size: {blocks}")
        out[name] = {"block": blocks, "speedup": [p[1] for p in pts], "ceiling": [p[2] for p in pts]}
    return out


def speedup_vs_block(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Speedup over AR against the block size, per method (solid), with the measured ceiling
    ``tau * t_ar / t_step`` (dashed, from ``dflash-bench --ceiling``) where the results have one."""
    fig, (ax,) = new_figure()
    points = speedup_points(results)
    for i, (name, p) in enumerate(points.items()):
        ax.plot(p["block"], p["speedup"], marker="o", color=f"C{i}", label=name)
        if not np.all(np.isnan(p["ceiling"])):
            ax.plot(p["block"], p["ceiling"], ls="--", marker="x", color=f"C{i}", label=f"{name} ceiling")
    ax.axhline(1.0, color="grey", lw=1, label="AR")
    ax.set(xlabel="block size B", ylabel="speedup over AR (same engine)", title="Speedup vs block size",
           xscale="log", ylim=(0, None))
    blocks = sorted({b for p in points.values() for b in p["block"]})
    ax.minorticks_off()
    ax.set_xticks(blocks, [str(b) for b in blocks])
    ax.legend(fontsize="small")
    return fig


# ----------------------------------------------------------------------------- training
def accuracy_matrix(scalars: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    prefix: str = "eval_accuracy/pos_") -> tuple[np.ndarray, np.ndarray]:
    """``(steps [S], accuracy [K-1, S])`` from the per-position accuracy series."""
    names = sorted((n for n in scalars if n.startswith(prefix)), key=lambda n: int(n[len(prefix):]))
    if not names:
        return np.zeros(0), np.zeros((0, 0))
    steps = scalars[names[0]][0]
    for n in names:
        if not np.array_equal(scalars[n][0], steps):
            raise VizError(f"{n} was logged at other steps than {names[0]}")
    return steps, np.stack([scalars[n][1] for n in names])


def _edges(steps: np.ndarray) -> np.ndarray:
    """``[S+1]`` cell edges for ``S`` sorted eval steps: each cell spans the training steps since
    the previous eval (the first from step 0) up to its own, so the axis ends at the last step."""
    s = np.asarray(steps, dtype=float)
    if len(s) and s[0] <= 0:
        raise VizError(f"eval steps must be positive (an eval follows a training step); got {s[0]:g}")
    return np.concatenate([[0.0], s])


TAU_SERIES = {"eval/tau_sim": "eval, per anchor", "eval/tau_sim_steps": "eval, per verify step",
              "train/tau_sim": "train, per anchor"}


def training_curves(scalars: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    final: Mapping[str, float] | None = None) -> Figure:
    """Three panels from a run's scalars (``dflash.training.scalars.read_scalars``): the train and
    eval loss; the simulated tau (per anchor and per verify step, with the real tau of the
    drafter and of prompt lookup as points at the last step when ``final`` has them); the eval
    accuracy of each draft position over the steps (positions x eval steps)."""
    fig, (loss_ax, tau_ax, acc_ax) = new_figure(WIDE, ncols=3)
    for name, label in (("train/loss", "train"), ("eval/loss", "eval")):
        if name in scalars:
            loss_ax.plot(*scalars[name], label=label, marker="o" if name.startswith("eval") else None)
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    loss_ax.legend()
    for name, label in TAU_SERIES.items():
        if name in scalars:
            tau_ax.plot(*scalars[name], label=label, marker="o" if name.startswith("eval") else None)
    last = max((s[0][-1] for s in scalars.values() if len(s[0])), default=0)
    for key, label, marker in (("tau", "real τ (drafter)", "*"),
                               ("tau_ngram", "real τ (prompt lookup)", "s")):
        if final and key in final:
            tau_ax.plot([last], [final[key]], ls="none", marker=marker, ms=10, label=label)
    tau_ax.set(xlabel="step", ylabel="τ", title="Simulated τ")
    tau_ax.legend(fontsize="small")
    steps, acc = accuracy_matrix(scalars)
    if acc.size:  # one column per eval step, over the steps since the previous eval
        edges = _edges(steps)
        mesh = acc_ax.pcolormesh(edges, np.arange(acc.shape[0] + 1) + 0.5, acc, vmin=0, vmax=1)
        acc_ax.set_xlim(edges[0], edges[-1])
        acc_ax.invert_yaxis()
        fig.colorbar(mesh, ax=acc_ax, label="accuracy")
    acc_ax.set(xlabel="step", ylabel="draft position", title="Eval accuracy by position")
    return fig


def seed_taus(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Figure:
    """``dflash-compare``'s summary -> bars of each method's mean τ per temperature with every
    seed's τ as a dot on its bar: the ordering and the seed spread in one view."""
    temps = list(summary)
    names = sorted({n for groups in summary.values() for n in groups},
                   key=lambda n: -max(g[n]["mean"] for g in summary.values() if n in g))
    fig, (ax,) = new_figure()
    width = 0.8 / max(len(temps), 1)
    x = np.arange(len(names))
    for i, t in enumerate(temps):
        offset = x + (i - (len(temps) - 1) / 2) * width
        means = [summary[t][n]["mean"] if n in summary[t] else np.nan for n in names]
        ax.bar(offset, means, width, color=f"C{i}", alpha=0.6, label=f"T={t} (mean over seeds)")
        for j, n in enumerate(names):
            taus = summary[t].get(n, {}).get("taus", [])
            ax.scatter([offset[j]] * len(taus), taus, color="k", s=10, zorder=3)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="τ (tokens per verify step)", title="Equal-budget comparison: τ per method, seeds as dots")
    ax.legend()
    return fig


def block_curves(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, list[tuple[int, Mapping[str, Any]]]]:
    """One temperature's summary -> recipe -> ``(drafts per step, group)`` sorted, from each recipe's
    own chain and its ``@B<k>`` variants (``dflash-compare --block-sizes``); trees are left out."""
    curves: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for name, g in groups.items():
        recipe, _, variant = name.partition("@")
        if g["block_size"] > 1 and (not variant or variant[1:].isdigit() and variant[0] == "B"):
            curves.setdefault(recipe, []).append((g["block_size"] - 1, g))
    return {r: sorted(points, key=lambda p: p[0]) for r, points in curves.items()}


def tau_vs_block(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Figure:
    """τ against the drafts per verify step (block size - 1) for each recipe, one panel per
    temperature, the bars spanning the seeds' min..max: where a stepwise drafter's k sequential
    steps and a block drafter's one pass of the same length stand (issue 34's assistant k = 1..7)."""
    fig, axes = new_figure((FIGSIZE[0] * max(len(summary), 1) * 0.75, FIGSIZE[1]), ncols=len(summary))
    for ax, (t, groups) in zip(axes, summary.items(), strict=True):
        for i, (recipe, points) in enumerate(sorted(block_curves(groups).items())):
            ks = [k for k, _ in points]
            means = np.array([g["mean"] for _, g in points])
            spread = np.array([[g["mean"] - g["min"] for _, g in points],
                               [g["max"] - g["mean"] for _, g in points]])  # [2, points]
            ax.errorbar(ks, means, yerr=spread, marker="o", capsize=3, color=f"C{i}", label=recipe)
        ax.set(xlabel="drafts per verify step (block size - 1)", ylabel="τ (tokens per verify step)",
               title=f"T={t}")
        ax.legend()
    return fig


def compare_figures(record: Mapping[str, Any], out: str | Path) -> list[Path]:
    """``dflash-compare --plots DIR``: τ per method with the seed spread; τ against the block when
    some recipe was decoded at several (``--block-sizes``); and per temperature the acceptance
    histogram of each method at its own block (all seeds' verify steps together)."""
    out = Path(out)
    summary = record["summary"]
    paths = [save(seed_taus(summary), out / "tau_by_method.png")]
    if any(len(points) > 1 for groups in summary.values() for points in block_curves(groups).values()):
        paths.append(save(tau_vs_block(summary), out / "tau_by_block.png"))
    for t, groups in summary.items():
        lengths = {n: [a + 1 for a, c in enumerate(g["acceptance_histogram"]) for _ in range(c)]
                   for n, g in groups.items() if g["block_size"] > 1 and "@B" not in n}
        k = max(g["block_size"] for g in groups.values())
        taus = {n: groups[n]["mean"] for n in lengths}
        fig = acceptance_histogram(lengths, k, taus=taus, title=f"Tokens accepted per verify step, T={t}")
        paths.append(save(fig, out / f"acceptance_T{t}.png"))
    return paths


def bench_figures(result: Mapping[str, Any], out: str | Path) -> list[Path]:
    """``dflash-bench --plots DIR``: the figures of one bench result, as PNGs under ``out``."""
    out = Path(out)
    lengths = lengths_from_bench(result)
    if not lengths:
        raise VizError("the bench result has no drafting method to plot (only AR)")
    k = max(m["block_size"] for m in _methods(result).values())
    taus = {name: float(_methods(result)[name]["tau"]) for name in lengths}
    return [save(acceptance_histogram(lengths, k, taus=taus), out / "acceptance_histogram.png"),
            save(position_plot(lengths, k), out / "acceptance_by_position.png"),
            save(tau_per_prompt(taus_from_bench(result)), out / "tau_per_prompt.png"),
            save(speedup_vs_block([result]), out / "speedup_vs_block.png")]
