"""Wall-clock and chip-hour ESTIMATES of a preset's run, from its compiled plans (docs/scaling.md).

Nothing here is measured: the plans give a step's FLOPs (training) and a decode step's time at
peak FLOP/s or HBM bandwidth (regeneration), and the rest are stated assumptions:

- ``mfu``: the fraction of peak bf16 FLOP/s a train step reaches (default 35%);
- ``decode_efficiency``: the fraction of the decode plan's roofline bound regeneration reaches
  (default 50%);
- the data: ``conversations`` (the recipe's count) of ``prompt_tokens + response_tokens`` tokens
  on average (defaults 500 + 1000), packed into ``seq_len`` rows without waste, one new response
  per conversation.

``python -m dflash.bench.estimates`` writes the table of docs/scaling.md ("Estimates") from
docs/results/scaling/ (train plans in scaling.json and plan_*.json, decode plans in decode_*.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.35
    decode_efficiency: float = 0.5
    prompt_tokens: float = 500.0  # mean per conversation
    response_tokens: float = 1000.0  # mean per regenerated response


@dataclasses.dataclass(frozen=True)
class Run:
    """What a preset trains on: its conversations, row length, batch and epochs (or steps)."""

    conversations: int
    seq_len: int
    batch_size: int
    epochs: float
    steps: int = 0  # > 0: fixed steps (the smoke preset), epochs ignored


def train_estimate(plan: dict[str, Any], run: Run, a: Assumptions) -> dict[str, float]:
    """Steps, seconds per step at ``a.mfu`` and hours of training for ``run`` on ``plan``'s slice."""
    rows = run.conversations * (a.prompt_tokens + a.response_tokens) / run.seq_len
    steps = run.steps or math.ceil(run.epochs * rows / run.batch_size)
    step_s = plan["est_step_s"] / a.mfu
    hours = steps * step_s / 3600
    return {"steps": steps, "step_s": step_s, "hours": hours, "chip_hours": hours * plan["chips"]}


def regen_estimate(decode: dict[str, Any], run: Run, chips: int, a: Assumptions) -> dict[str, float]:
    """Tokens/s of regeneration on ``chips`` chips from a decode plan of one AR step (its batch over
    its chips; hosts decode their shards independently, so the rate scales with the chips) and
    the hours to write ``run.conversations`` responses."""
    ar = decode["passes"]["ar"]
    bound = decode["batch"] / ar["est_s"] * chips / decode["chips"]  # tokens/s at the roofline
    rate = bound * a.decode_efficiency
    hours = run.conversations * a.response_tokens / rate / 3600
    return {"tokens_per_s_bound": bound, "tokens_per_s": rate, "hours": hours, "chip_hours": hours * chips}


# preset -> (its data, its train plan: a key of scaling.json or a plan file, its decode plan file). The
# Llama recipe: UltraChat-200K train_sft has 207,865 conversations; ShareGPT is counted as ~92K
# (not checked): 300K.
PRESETS: dict[str, tuple[Run, str, str]] = {
    "qwen3_0_6b_smoke": (Run(256, 3072, 8, 0, steps=20), "plan_qwen3_0_6b_smoke_v5e-4.json",
                         "decode_qwen3_0_6b_v5e-4.json"),
    "qwen3_8b_dflash": (Run(800_000, 3072, 32, 6), "qwen3_8b_dflash@v5e-8", "decode_qwen3_8b_v5e-8.json"),
    "qwen3_4b_dflash": (Run(800_000, 3072, 32, 6), "qwen3_4b_dflash@v5e-8", "decode_qwen3_4b_v5e-8.json"),
    "llama3_1_8b_dflash": (Run(300_000, 3072, 32, 6), "llama3_1_8b_dflash@v5e-8",
                           "decode_llama3_1_8b_v5e-8.json"),
}


def load_plan(results: Path, key: str) -> dict[str, Any] | None:
    if key.endswith(".json"):
        path = results / key
        return json.loads(path.read_text()) if path.exists() else None
    rows = json.loads((results / "scaling.json").read_text())
    return rows.get(key)


def duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def table(results: Path, a: Assumptions = Assumptions()) -> str:
    """The Markdown table of every preset whose train plan is in ``results``."""
    head = ("| preset (slice) | conversations x tokens | steps | s/step at peak -> at MFU | training | "
            "regeneration (tok/s: bound -> assumed) | total | chip-hours |")
    lines = [head, "|" + "---|" * 8]
    for name, (run, train_key, decode_key) in PRESETS.items():
        plan = load_plan(results, train_key)
        if plan is None:
            continue
        t = train_estimate(plan, run, a)
        decode = load_plan(results, decode_key) if decode_key else None
        if decode is not None:
            r = regen_estimate(decode, run, plan["chips"], a)
            regen = f"{duration(r['hours'])} ({r['tokens_per_s_bound']:,.0f} -> {r['tokens_per_s']:,.0f})"
            total, chip_hours = t["hours"] + r["hours"], t["chip_hours"] + r["chip_hours"]
        else:
            regen, total, chip_hours = "no decode plan", t["hours"], t["chip_hours"]
        tokens = f"{run.conversations:,} x {a.prompt_tokens + a.response_tokens:,.0f}"
        lines.append(f"| {name} ({plan['topology']}) | {tokens} | {t['steps']:,} | "
                     f"{plan['est_step_s']:.2f} -> {t['step_s']:.2f} | {duration(t['hours'])} | {regen} | "
                     f"{duration(total)} | {chip_hours:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.bench.estimates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="docs/results/scaling", help="directory of the plan JSONs")
    p.add_argument("--out", default=None, help="also write the table here")
    for f in dataclasses.fields(Assumptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default)
    args = p.parse_args(argv)
    a = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
    text = table(Path(args.results), a)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
