"""``dflash-export``: a training checkpoint -> HF-format drafter directory.

DFlash runs give the "DFlashDraftModel" layout vLLM and SGLang load; Orthrus runs the Orthrus
layout (delta or full); EAGLE-3 runs LlamaForCausalLMEagle3; MTP runs an MTPDraftModel directory
(delta) or, on a Qwen3-Next / Qwen3.5 target, the target's checkpoint with the head (full). See
docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser
from dflash.export.from_run import EXPORT_DTYPES, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-export", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory of dflash-train (uses --step)")
    src.add_argument("--checkpoint", type=Path, help="one checkpoint: RUN/checkpoints/<step>")
    p.add_argument("--step", default="latest",
                   help="with --run: latest (default), best (by eval tau) or a step number")
    p.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    p.add_argument("--form", default="delta", choices=["delta", "full"],
                   help="Orthrus runs: diffusion tensors only + target reference (delta), or with the "
                        "target; MTP runs: an MTPDraftModel directory (delta), or, on a Qwen3-Next / Qwen3.5 "
                        "target, the target's checkpoint (files linked) with the head as its mtp.*, as vLLM "
                        "serves it")
    p.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES), help="weight dtype in the file")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--with-target", dest="with_target", action="store_true", default=None,
                        help="also copy the target to OUT/target (default: only for shipped targets)")
    target.add_argument("--no-target", dest="with_target", action="store_false")
    p.add_argument("--check-with", choices=["vllm"], default=None,
                   help="then run the export in vLLM (own venv, built on first use) and compare tokens and "
                        "acceptance with ours (docs/serving.md)")
    p.add_argument("--verbose", action="store_true", help="on an error, also print its full detail")
    args = p.parse_args(argv)
    return run_command("dflash-export", lambda: _export(args), verbose=args.verbose)


def _export(args: argparse.Namespace) -> int:
    info = export_checkpoint(args.out, run_dir=args.run, checkpoint=args.checkpoint, step=args.step,
                             dtype=args.dtype, with_target=args.with_target, form=args.form)
    for line in info["damaged_steps"]:  # the newest steps were damaged: say so, and what was exported
        print(f"dflash-export: {line}; skipped", file=sys.stderr)
    if info["damaged_steps"]:
        print(f"dflash-export: exported step {info['step']}, the newest that restores", file=sys.stderr)
    if info.get("note"):
        print(f"dflash-export: {info['note']}", file=sys.stderr)
    print(json.dumps(info))
    if args.check_with == "vllm":
        from dflash.export.vllm_check import VllmCheckError, cli_check
        from dflash.export.vllm_env import VllmSetupError

        try:
            return cli_check(info)
        except (VllmCheckError, VllmSetupError) as err:
            print(f"dflash-export: --check-with vllm: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
