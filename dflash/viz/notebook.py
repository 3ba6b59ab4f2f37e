"""What the notebooks call: runtime detection, running several methods on the same prompts, a
training config from a few parameters, a live training plot, and showing figures as PNGs.

Notebooks hold no library code (docs/design.md §12): anything longer than a few lines is here.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

from dflash.viz.errors import VizError

REPOSITORY = "dflash/dflash"  # GitHub owner/name the Colab badges and the install cell point at
NOTEBOOKS = ("01_quickstart", "02_train_a_drafter", "03_export_and_serve")
# Every notebook's first code cell, verbatim (tests/test_notebooks.py checks; tests/test_packaging.py
# runs it against a wheel of this checkout). Where dflash is missing (Colab) it installs dflash
# with the JAX build of the runtime: Colab's own jax is another version, whose CUDA plugin or
# libtpu would not match ours. The TPU device files are those of dflash.distributed.
INSTALL_CELL = f"""\
# Colab: install dflash from its repository (skipped where dflash is already importable), with JAX
# for the runtime's accelerator: the [tpu] extra on a TPU VM, [gpu] (CUDA 12) where nvidia-smi is
import importlib.util, os, shutil, subprocess, sys
source = "git+https://github.com/{REPOSITORY}"
if importlib.util.find_spec("dflash") is None:
    tpu = any(os.path.exists(f) for f in ("/dev/accel0", "/dev/vfio/0"))
    extra = "[tpu]" if tpu else "[gpu]" if shutil.which("nvidia-smi") else ""
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"dflash{{extra}} @ {{source}}"])"""


# The notebooks' default training sizes: a run of a few steps on a CPU in about a minute.
TINY_OVERRIDES = (
    "data.format=text", "data.seq_len=128", "data.heldout_fraction=0.0", "eval.eval_split=heldout",
    "regen.num_sequences=32", "regen.prompt_tokens=32", "regen.new_tokens=32", "regen.batch_size=8",
    "drafter.num_target_features=3", "train.batch_size=4", "train.num_anchors=16", "train.log_every=2",
    "train.eval_every=4", "train.save_every=4", "eval.heldout_rows=4", "eval.num_prompts=2",
    "eval.max_new_tokens=32", "eval.prompt_tokens=64")


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{notebook}.ipynb"


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The accelerator this process sees, and the settings a notebook picks for it."""

    platform: str  # "cpu" | "gpu" | "tpu"
    num_devices: int
    dtype: str  # "float32" on a CPU; "bfloat16" on a GPU or TPU
    device_kind: str

    def __str__(self) -> str:
        return f"{self.platform} x{self.num_devices} ({self.device_kind}), dtype {self.dtype}"


def detect_runtime() -> Runtime:
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    return Runtime(platform, len(devices), "float32" if platform == "cpu" else "bfloat16",
                   devices[0].device_kind)


def show(fig: Any, dpi: int | None = None) -> None:
    """Displays a matplotlib figure as a PNG output (no GUI backend, same in Colab and nbclient)."""
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi)
    display(Image(data=buf.getvalue(), format="png"))


# ----------------------------------------------------------------------------- decoding
def demo_methods(target: Any, *, dflash: str = "tiny-code-dflash", orthrus: str | None = "tiny-code-orthrus",
                 tree_width: int = 2, block_size: int | None = None) -> dict[str, tuple[Any, Any]]:
    """name -> ``(method, drafter)`` for ``speculative_generate``: prompt lookup, DFlash, a DFlash
    beam tree of ``tree_width`` paths per depth, and Orthrus (when given)."""
    from dflash.decoding.tree import BeamTreeDraft
    from dflash.drafters import resolve_method

    method, drafter = resolve_method(dflash, target, block_size=block_size)
    out = {"ngram": resolve_method("ngram", target, block_size=method.block_size),
           "dflash": (method, drafter)}
    if tree_width:
        out[f"tree (width {tree_width})"] = (BeamTreeDraft.around(method, tree_width), drafter)
    if orthrus:
        out["orthrus"] = resolve_method(orthrus, target, block_size=block_size)
    return out


def speculate_all(target: Any, prompts: Sequence[Sequence[int]], methods: Mapping[str, tuple[Any, Any]], *,
                  max_new_tokens: int = 64, reference: Sequence[Sequence[int]] | None = None,
                  **kw: Any) -> dict[str, Any]:
    """Greedy speculative decoding of ``prompts`` with every method -> name -> ``SpecResult``.

    ``reference`` (the target's own greedy tokens, e.g. ``generate(...).tokens``): each method's
    output must equal it — greedy speculation is lossless — or a ``VizError`` names the method."""
    from dflash.decoding.speculative import speculative_generate

    out = {}
    for name, (method, drafter) in methods.items():
        mask = drafter.cfg.mask_token_id if drafter is not None else None
        res = speculative_generate(target, prompts, method=method, drafter=drafter, mask_token_id=mask,
                                   max_new_tokens=max_new_tokens, **kw)
        if reference is not None and [list(r) for r in reference] != res.tokens:
            raise VizError(f"{name}: speculative output differs from the target's greedy output")
        out[name] = res
    return out


def lengths_of(results: Mapping[str, Any]) -> dict[str, list[int]]:
    """name -> all acceptance lengths of a ``SpecResult`` (every row, every verify step)."""
    return {name: [a for row in r.acceptance_lengths for a in row] for name, r in results.items()}


def taus_of(results: Mapping[str, Any]) -> dict[str, float]:
    """name -> the result's τ (tokens emitted by verify steps / verify steps, design.md §7)."""
    return {name: r.tau for name, r in results.items()}


def prompt_taus_of(results: Mapping[str, Any]) -> dict[str, list[float]]:
    """name -> τ of each row: as ``SpecResult.tau``, one row at a time (the prefill's token is not a
    verify step's; ``acceptance_lengths`` overstate a step that EOS or the budget cut)."""
    return {name: [(len(toks) - 1) / len(row) if row else float("nan")
                   for toks, row in zip(r.tokens, r.acceptance_lengths, strict=True)]
            for name, r in results.items()}


# ----------------------------------------------------------------------------- training
def training_config(*, target: str = "tiny-code", dataset: str = "tiny-code", method: str = "dflash",
                    steps: int = 20, run_dir: str = "runs/notebook", runtime: Runtime | None = None,
                    overrides: Sequence[str] = ()) -> Any:
    """An ``ExperimentConfig`` from a notebook's parameters: the config defaults, then the
    runtime's dtype (bf16 target and compute on a GPU/TPU) and all its devices on the data axis
    (the batch rounded up to a multiple of them), then ``overrides`` (``key=value``, as ``--set``)."""
    from dflash.configio import apply_overrides, from_dict
    from dflash.training.config import ExperimentConfig

    runtime = runtime or detect_runtime()
    data: dict[str, Any] = {"method": method, "run_dir": run_dir,
                            "target": {"name": target, "dtype": runtime.dtype},
                            "data": {"source": dataset}, "train": {"steps": steps,
                                                                   "compute_dtype": runtime.dtype}}
    cfg = from_dict(ExperimentConfig, apply_overrides(data, list(overrides)))
    batch = -(-cfg.train.batch_size // runtime.num_devices) * runtime.num_devices
    return from_dict(ExperimentConfig, apply_overrides(data, [*overrides, f"train.batch_size={batch}"]))


class LivePlot:
    """A ``ScalarLog`` listener for notebooks: redraws the loss and simulated tau as they arrive.

    ``run_training(cfg, on_scalars=LivePlot())``; ``every`` skips redraws between log steps."""

    SERIES = ("train/loss", "eval/loss", "train/tau_sim", "eval/tau_sim", "eval/tau_sim_steps")

    def __init__(self, every: int = 1):
        from IPython.display import display

        self.every, self.calls = every, 0
        self.data: dict[str, tuple[list[int], list[float]]] = {}
        self.handle = display("training starts...", display_id=True)

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            if tag in self.SERIES:
                steps, vals = self.data.setdefault(tag, ([], []))
                steps.append(step)
                vals.append(float(v))
        self.calls += 1
        if self.calls % self.every == 0:
            self.redraw()

    def figure(self) -> Any:
        from dflash.viz.figures import FIGSIZE, new_figure

        fig, (loss_ax, tau_ax) = new_figure((FIGSIZE[0], FIGSIZE[1] * 0.7), ncols=2)
        for tag, (steps, vals) in self.data.items():
            ax = loss_ax if tag.endswith("loss") else tau_ax
            ax.plot(steps, vals, marker="o" if tag.startswith("eval") else None, label=tag)
        loss_ax.set(title="loss", xlabel="step")
        tau_ax.set(title="simulated τ", xlabel="step")
        for ax in (loss_ax, tau_ax):
            if ax.lines:
                ax.legend(fontsize="small")
        return fig

    def redraw(self) -> None:
        from IPython.display import Image

        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        self.handle.update(Image(data=buf.getvalue(), format="png"))
