"""The scaling table of docs/scaling.md: real presets x TPU slices, compiled ahead of time.

``python -m dflash.bench.scaling --out docs/results/scaling`` compiles each preset's real train
step for each slice (``dflash.plan.train_plan``; no weights, data or hardware) and writes
``scaling.json`` (every plan, in full) and ``scaling.md`` (the table). A compile takes minutes
on a small host, so results accumulate: rows already in the JSON are kept unless ``--redo``,
and ``--only CONFIG@TOPOLOGY`` (repeatable) restricts the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# (config, topologies); the mesh per slice is MESHES[topology] unless a row overrides it.
PRESETS: dict[str, tuple[str, ...]] = {
    "qwen3_4b_dflash": ("v5e-8", "v5e-16", "v4-8", "v5p-8", "v6e-8"),
    "qwen3_8b_dflash": ("v5e-8", "v5e-16", "v4-8", "v5p-8", "v6e-8"),
    "llama3_1_8b_dflash": ("v5e-8", "v5e-16", "v4-8", "v5p-8", "v6e-8"),
    "qwen3_8b_orthrus": ("v5e-8", "v5e-16", "v4-8", "v5p-8", "v6e-8"),
    "llama3_3_70b_dflash": ("v5p-32", "v5e-64"),
}
# (data, fsdp, tensor): ZeRO-3 over every chip where the batch of 32 divides; v5e-64 adds
# tensor=2 (32 rows cannot split 64 ways). docs/scaling.md says why.
MESHES: dict[str, tuple[int, int, int]] = {
    "v5e-8": (1, 8, 1), "v5e-16": (1, 16, 1), "v4-8": (1, 4, 1), "v5p-8": (1, 4, 1), "v6e-8": (1, 8, 1),
    "v5p-32": (1, 16, 1), "v5e-64": (1, 32, 2),
}


def row_key(config: str, topology: str) -> str:
    return f"{config}@{topology}"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """The table: one line per (preset, slice) in PRESETS order."""
    head = ("| preset | slice | mesh (data, fsdp, tensor) | GB/chip: target + drafter + optimizer + temp "
            "= total | HBM/chip | fits (headroom) | TFLOP/step | est. step (s) at peak | compile (s) |")
    lines = [head, "|" + "---|" * 9]
    for config, topologies in PRESETS.items():
        for topology in topologies:
            r = rows.get(row_key(config, topology))
            if r is None:
                lines.append(f"| {config} | {topology} | {MESHES[topology]} | not run | | | | | |")
                continue
            p = r["per_device_bytes"]
            gb = lambda n: f"{n / 1e9:.1f}"  # noqa: E731
            mesh = tuple(r["mesh"][a] for a in ("data", "fsdp", "tensor"))
            refused = " (compiler: out of memory)" if "compiler_refused" in r["memory_analysis"] else ""
            lines.append(
                f"| {config} | {topology} | {mesh} | {gb(p['target'])} + {gb(p['drafter'])} + "
                f"{gb(p['optimizer'])} + {gb(p['temp'])} = **{gb(p['total'])}** | {gb(r['hbm_bytes'])} | "
                f"{'yes' if r['fits'] else 'NO'} ({100 * r['headroom']:.0f}%){refused} | "
                f"{r['flops_per_step'] / 1e12:.0f} | {r['est_step_s']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from dflash.configio import load_yaml
    from dflash.plan import summary, train_plan
    from dflash.training.config import ExperimentConfig

    p = argparse.ArgumentParser(prog="python -m dflash.bench.scaling", description=__doc__)
    p.add_argument("--out", default="docs/results/scaling", help="directory for scaling.json / scaling.md")
    p.add_argument("--configs", default="configs", help="directory of the preset YAML files")
    p.add_argument("--only", action="append", default=[], metavar="CONFIG@TOPOLOGY")
    p.add_argument("--redo", action="store_true", help="recompile rows already in the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    for config, topologies in PRESETS.items():
        for topology in topologies:
            key = row_key(config, topology)
            if (args.only and key not in args.only) or (key in rows and not args.redo):
                continue
            cfg = load_yaml(ExperimentConfig, Path(args.configs) / f"{config}.yaml")
            start = time.perf_counter()
            rows[key] = train_plan(cfg, topology, MESHES[topology], config_name=config)
            print(f"== {key} ({time.perf_counter() - start:.0f} s)\n{summary(rows[key])}", flush=True)
            path.write_text(json.dumps(rows, indent=1))  # after every row: a long run keeps its progress
    (out / "scaling.md").write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
