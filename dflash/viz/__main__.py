"""``python -m dflash.viz readme OUT_DIR``: the README's pictures, from a real run on the tiny target.

Greedy speculative decoding of held-out prompts with prompt lookup, the shipped DFlash drafter
(alone and as a width-2 beam tree) and the shipped Orthrus drafter, all checked lossless
against the target's own greedy output; writes ``acceptance_histogram.png``,
``acceptance_by_position.png`` and the numbers behind them (``readme_figures.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash.viz.errors import VizError


def readme_figures(out: Path, *, num_prompts: int = 4, max_new_tokens: int = 128) -> list[Path]:
    from dflash.decoding import generate
    from dflash.io.loading import load_target
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.tiny_corpus import heldout_prompts
    from dflash.viz import figures as F
    from dflash.viz.notebook import demo_methods, lengths_of, prompt_taus_of, speculate_all, taus_of

    target = load_target("tiny-code")
    tok = load_tokenizer("tiny-code")
    prompts = [tok(t, add_special_tokens=False).input_ids[-128:] for t in heldout_prompts(num_prompts)]
    eos = tuple(target.cfg.eos_token_id)
    ar = generate(target, prompts, max_new_tokens=max_new_tokens, eos_ids=eos)
    methods = demo_methods(target, block_size=16)
    results = speculate_all(target, prompts, methods, max_new_tokens=max_new_tokens, reference=ar.tokens,
                            eos_ids=eos)
    lengths, taus = lengths_of(results), taus_of(results)
    paths = [F.save(F.acceptance_histogram(lengths, 16, taus=taus), out / "acceptance_histogram.png"),
             F.save(F.position_plot(lengths, 16), out / "acceptance_by_position.png")]
    data = {"command": "python -m dflash.viz readme " + str(out), "target": "tiny-code", "block_size": 16,
            "num_prompts": num_prompts, "max_new_tokens": max_new_tokens, "tau": taus,
            "tau_per_prompt": prompt_taus_of(results), "acceptance_lengths": lengths}
    (out / "readme_figures.json").write_text(json.dumps(data, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflash.viz", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    readme = sub.add_parser("readme", help="regenerate the README's pictures")
    readme.add_argument("out", type=Path, help="directory for the PNGs (docs/img)")
    readme.add_argument("--num-prompts", type=int, default=4)
    readme.add_argument("--max-new-tokens", type=int, default=128)
    speedup = sub.add_parser("speedup", help="speedup vs block size (with ceilings) from dflash-bench JSONs")
    speedup.add_argument("out", type=Path, help="the PNG to write")
    speedup.add_argument("results", type=Path, nargs="+", help="dflash-bench --json files, one per block")
    args = p.parse_args(argv)
    try:
        if args.command == "speedup":
            from dflash.viz import figures as F

            results = [json.loads(path.read_text()) for path in args.results]
            paths = [F.save(F.speedup_vs_block(results), args.out)]
        else:
            paths = readme_figures(args.out, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens)
    except (VizError, OSError, ValueError) as err:  # ValueError: a file that is not JSON
        print(f"python -m dflash.viz: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
