"""Train-step time of one config on the same devices split over different process counts.

``python -m dflash.bench.processes --layout 1x8 --layout 2x4 --mesh 8,1,1`` runs
``dflash.bench.mesh_step`` once as 1 process x 8 simulated CPU devices and once as 2 local
processes x 4 devices (``jax.distributed`` with gloo, started by ``dflash-launch``'s
``run_local``), side by side in one run, and prints each layout's seconds per step and their
ratio. On CPU this shows the cross-process overhead (collectives through gloo instead of
in-process copies), not accelerator scaling: simulated devices share the host's cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dflash.distributed import run_local


def parse_layout(text: str) -> tuple[int, int]:
    """``"2x4"`` -> (2 processes, 4 devices each)."""
    try:
        procs, devices = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layout {text!r}: expected PROCESSESxDEVICES, e.g. 2x4") from None
    if procs < 1 or devices < 1:
        raise SystemExit(f"--layout {text!r}: both numbers must be >= 1")
    return procs, devices


def run_layout(procs: int, devices: int, mesh: str, config: str, steps: int, overrides: list[str],
               timeout_s: float) -> dict[str, Any]:
    """Process 0's JSON line of ``mesh_step`` run as ``procs`` processes x ``devices`` devices."""
    command = [sys.executable, "-m", "dflash.bench.mesh_step", "--config", config, "--mesh", mesh,
               "--steps", str(steps), *[a for kv in overrides for a in ("--set", kv)]]
    results = run_local(command, procs, devices_per_process=devices, timeout_s=timeout_s)
    bad = [r for r in results if r.returncode != 0]
    if bad:
        raise SystemExit(f"layout {procs}x{devices}: process {bad[0].process_id} exited with "
                         f"{bad[0].returncode}:\n{bad[0].stderr[-3000:]}")
    lines = [line for line in results[0].stdout.splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1]), layout=f"{procs}x{devices}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_code.yaml")
    p.add_argument("--layout", action="append", default=[], help="PROCESSESxDEVICES (repeatable; 1x8, 2x4)")
    p.add_argument("--mesh", default="8,1,1", help="data,fsdp,tensor over all devices of a layout")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per layout")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    for text in args.layout or ["1x8", "2x4"]:
        procs, devices = parse_layout(text)
        rows.append(run_layout(procs, devices, args.mesh, args.config, args.steps, args.overrides,
                               args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['layout']} vs {base['layout']}: step time x{row['step_s'] / base['step_s']:.2f}, "
              f"CPU s x{row['cpu_s'] / base['cpu_s']:.2f}, loss {row['loss']:.6f} vs {base['loss']:.6f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "mesh": args.mesh, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
