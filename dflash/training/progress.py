"""What a run tells its user: one plain line per ``train.log_every`` steps when there is no
progress bar, "—" rather than ``nan`` before the first evaluation, and that a run is complete."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def tau_text(tau: float) -> str:
    """The last evaluation's τ, or "—" before there is one."""
    return "—" if math.isnan(tau) else f"{tau:.2f}"


def log_line(step: int, total: int, scalars: dict[str, float], tau: float) -> str:
    """``step 20/300  loss 4.512  tau_sim 1.31  lr 2.9e-03  grad_norm 0.81  tok/s 6120``."""
    return (f"step {step}/{total}  loss {scalars['loss']:.3f}  tau_sim {tau_text(tau)}  "
            f"lr {scalars['lr']:.2e}  grad_norm {scalars['grad_norm']:.2f}  "
            f"tok/s {scalars['tokens_per_s']:.0f}")


def finished_result(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of a run whose last checkpoint is its final step, else None.

    Re-running such a run would only redo the final evaluation and add an events file; the
    caller says it is complete instead (``--extend`` with more steps trains further).
    """
    metrics = run_dir / "metrics.json"
    if meta.get("total_steps") is None or meta.get("step") != meta["total_steps"] or not metrics.exists():
        return None
    return {**json.loads(metrics.read_text()), "already_complete": True}
