"""Every notebook runs top to bottom on a CPU with its default (tiny) parameters, within a stated
time, without an error cell, and shows the figures it should (image outputs). The training
notebook's run then gets a ``dflash-report`` with every section."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from recount import tau_from_metrics, tau_from_steps

from dflash.viz.notebook import INSTALL_CELL, NOTEBOOKS, colab_url

ROOT = Path(__file__).resolve().parents[1]
# Wall-time bounds per notebook on a 2-core CPU host: a hang guard with room for a contended host
# (measured times are in docs/viz.md; ~5x slower at a load average of 18 on 2 cores).
TIME_BOUND_S = {"01_quickstart": 300, "02_train_a_drafter": 600, "03_export_and_serve": 400}


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


# Appended to a notebook by ``execute(..., dump=VAR)``: VAR's SpecResults to spec_results.json.
DUMP = """import json
with open("spec_results.json", "w") as f:
    json.dump({n: {"tau": r.tau, "tokens": r.tokens, "acceptance_lengths": r.acceptance_lengths}
               for n, r in {var}.items()}, f)"""


def execute(name: str, cwd: Path, dump: str | None = None, **params) -> tuple[nbformat.NotebookNode, float]:
    """Runs a notebook in ``cwd`` with ``params`` injected after its ``parameters`` cell (as
    papermill does), and ``dump``'s results written to ``cwd/spec_results.json`` at the end;
    returns the executed notebook and its wall time."""
    nb = load(name)
    if params:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    if dump:
        nb.cells.append(nbformat.v4.new_code_cell(DUMP.replace("{var}", dump)))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    client = NotebookClient(nb, timeout=TIME_BOUND_S[name], kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first error cell
    return nb, time.perf_counter() - start


def recounted_taus(cwd: Path) -> dict[str, float]:
    """Each dumped method's τ, checked against a recount from its tokens and verify steps."""
    results = json.loads((cwd / "spec_results.json").read_text())
    for name, r in results.items():
        assert r["tau"] == tau_from_steps(r["tokens"], r["acceptance_lengths"]), name
    return {name: r["tau"] for name, r in results.items()}


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for out in c.outputs)


def test_notebooks_are_thin_and_link_to_colab():
    for name in NOTEBOOKS:
        nb = load(name)
        assert colab_url(name) in nb.cells[0].source  # the badge points at the notebook's own path
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, name
        assert all(not c.outputs for c in nb.cells if c.cell_type == "code"), f"{name} is committed executed"
        # No library code: no definitions in notebooks, and no cell longer than a screenful.
        for c in nb.cells:
            if c.cell_type == "code":
                assert "def " not in c.source and "class " not in c.source, (name, c.source[:60])
                assert c.source.count("\n") < 20, (name, c.source[:60])
    assert not (ROOT / "notebooks" / "quickstart.ipynb").exists()


def test_what_the_notebooks_write_is_ignored_by_git():
    """Run in notebooks/ (Jupyter's working directory), a notebook's run and export directories never
    show up in ``git status``."""
    written = set()
    for name in NOTEBOOKS:
        (params,) = [c for c in load(name).cells if "parameters" in c.metadata.get("tags", [])]
        written |= set(re.findall(r'^\w+_dir = "([^"]+)"', params.source, re.M))
    assert {"runs/notebook_drafter", "exported/notebook_drafter"} <= written  # the pattern still reads them
    paths = sorted(f"notebooks/{d}/file" for d in written)
    listed = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                            text=True).stdout.split()
    assert sorted(set(paths) - set(listed)) == []


@pytest.mark.parametrize(("device_file", "nvidia_smi", "extra"), [
    (None, None, ""), (None, "/usr/bin/nvidia-smi", "[gpu]"), ("/dev/accel0", None, "[tpu]"),
    ("/dev/vfio/0", "/usr/bin/nvidia-smi", "[tpu]")])
def test_the_install_cell_installs_jax_for_the_runtime(monkeypatch, device_file, nvidia_smi, extra):
    """Every notebook opens with ``INSTALL_CELL``; where dflash is missing it installs the extra of the
    runtime's accelerator (the TPU device files are those ``dflash.distributed`` looks for)."""
    from dflash.distributed import _TPU_DEVICE_FILES

    assert all(load(name).cells[1].source == INSTALL_CELL for name in NOTEBOOKS)
    assert device_file is None or device_file in _TPU_DEVICE_FILES
    calls = []
    monkeypatch.setattr(subprocess, "check_call", calls.append)
    monkeypatch.setattr(shutil, "which", lambda name: nvidia_smi if name == "nvidia-smi" else None)
    monkeypatch.setattr(os.path, "exists", lambda path: path == device_file)
    exec(INSTALL_CELL, {})  # dflash is importable here: nothing to install
    assert calls == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    exec(INSTALL_CELL, {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                      f"dflash{extra} @ git+https://github.com/dflash/dflash"]]


@pytest.mark.slow
def test_quickstart_notebook_runs_and_shows_the_figures(tmp_path):
    nb, seconds = execute("01_quickstart", tmp_path, dump="results")
    assert seconds < TIME_BOUND_S["01_quickstart"]
    taus = recounted_taus(tmp_path)
    assert set(taus) == {"ngram", "dflash", "tree (width 2)", "orthrus"}
    assert min(taus.values()) > 1.5  # shipped trained drafters, and prompt lookup on the looping target
    assert images(nb) >= 3  # acceptance histogram, by position, tau per prompt
    html = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert len(html) == 2 and 'data-kind="bonus"' in html[0]["data"]["text/html"]  # the token views


@pytest.mark.slow
def test_train_and_export_notebooks_run_and_the_run_gets_a_report(tmp_path):
    from dflash.cli.report import main as report_main
    from dflash.viz.report import SECTIONS

    run_dir = str(tmp_path / "runs" / "nb")
    nb, seconds = execute("02_train_a_drafter", tmp_path, dump="check", run_dir=run_dir, steps=6)
    assert seconds < TIME_BOUND_S["02_train_a_drafter"]
    assert images(nb) >= 4  # the live plot, curves, tau vs lookup, the export's histogram
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    assert metrics["steps"] == 6 and "outputs_differ" not in metrics
    assert metrics["tau"] == tau_from_metrics(metrics)  # design §7, recounted from tokens and steps
    assert metrics["tau_ngram"] == tau_from_metrics(metrics, "acceptance_histogram_ngram") > 1
    taus = recounted_taus(tmp_path)  # the reloaded export and prompt lookup
    assert taus["prompt lookup"] > 1
    nb, seconds = execute("03_export_and_serve", tmp_path, dump="spec", run_dir=run_dir)
    assert seconds < TIME_BOUND_S["03_export_and_serve"]
    assert images(nb) >= 1
    assert set(recounted_taus(tmp_path)) == {"exported"}
    assert (tmp_path / "exported" / "notebook_drafter" / "model.safetensors").exists()

    out = tmp_path / "report"
    assert report_main([run_dir, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"\n## {section}\n" in text and "_Not available" not in text, section
    for png in ("training_curves.png", "tau.png", "acceptance.png", "positions.png"):
        assert f"]({png})" in text and (out / png).stat().st_size > 10_000, png
    assert report_main([str(tmp_path)]) == 2  # not a run directory
