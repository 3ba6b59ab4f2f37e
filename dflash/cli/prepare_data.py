"""``dflash-prepare-data``: the conversations of a published DFlash recipe as one prompts file.

The output (jsonl, one ``{"messages": [...], "source": ...}`` per line, every assistant turn an
empty slot) is what ``dflash-regenerate --data`` reads; regenerate it with the settings this
command prints (docs/quickstart-tpu.md, "The data"). Gated datasets (Nemotron v2) need their
terms accepted on the hub and ``HF_TOKEN`` set.
"""

from __future__ import annotations

import argparse
import json

from dflash.checks import COUNT, INTEGER, flag
from dflash.cli.failures import run_command
from dflash.cli.parser import make_parser
from dflash.training.recipe_data import RECIPES, REGEN_SETTINGS, prepare_recipe_data


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-prepare-data", __doc__)
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True,
                   help="qwen3: Nemotron v2 + CodeAlpaca (~800K); llama3: UltraChat-200K + ShareGPT")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--total", type=flag(COUNT), default=None,
                   help="conversations to draw (default: the recipe's: 800000 for qwen3, all for llama3; "
                        "the smoke run takes 256)")
    p.add_argument("--seed", type=flag(INTEGER), default=0)
    args = p.parse_args(argv)
    return run_command("dflash-prepare-data", lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    counts = prepare_recipe_data(recipe, args.out, total=args.total, seed=args.seed)
    print(f"wrote {sum(counts.values())} conversations to {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    kwargs = recipe.chat_template_kwargs
    flag = f" --chat-template-kwargs '{json.dumps(kwargs)}'" if kwargs else ""
    print(f"regenerate with: dflash-regenerate --target TARGET --data {args.out} --out OUT "
          f"{' '.join(REGEN_SETTINGS)}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
