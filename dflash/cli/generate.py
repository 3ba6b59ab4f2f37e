"""``dflash-generate``: complete a prompt with a target (AR, or speculative with a drafter)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from dflash.checks import BLOCK, COUNT, INTEGER, NON_NEGATIVE, PROBABILITY, flag
from dflash.cli.failures import run_command
from dflash.cli.parser import add_dynamic_tree_arg, add_mesh_arg, make_parser, mesh_from_args
from dflash.config import DTYPES
from dflash.decoding import SamplingParams, generate
from dflash.decoding.speculative import speculative_generate
from dflash.decoding.tree import BeamTreeDraft
from dflash.decoding.verify import RULES
from dflash.distributed import add_distributed_args, is_primary
from dflash.drafters import dynamic_tree_method_for, resolve_method
from dflash.errors import ConfigError
from dflash.fingerprint import initialize_from_args
from dflash.io.loading import load_target
from dflash.io.tokenizer import eos_ids, load_tokenizer
from dflash.kernels.dispatch import ATTENTION_IMPLS
from dflash.models.kinds import check_tree
from dflash.viz.tokens import COLOR_MODES, show_steps, split_steps, wants_color


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("dflash-generate", __doc__)
    p.add_argument("--target", default="tiny-code", help="HF directory, shipped name or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file whose whole content is the prompt")
    p.add_argument("--max-new-tokens", type=flag(COUNT), default=128)
    p.add_argument("--max-len", type=flag(COUNT), default=None,
                   help="KV cache slots (default: fit the request)")
    p.add_argument("--allow-longer-than-context", action="store_true",
                   help="run a prompt + new tokens longer than the target's context "
                        "(max_position_embeddings; positions past it were never trained: expect wrong "
                        "output) instead of refusing it")
    p.add_argument("--temperature", type=flag(NON_NEGATIVE), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=flag(COUNT.with_special(0, "off")), default=0)
    p.add_argument("--top-p", type=flag(PROBABILITY), default=1.0, help="1 = off")
    p.add_argument("--seed", type=flag(INTEGER), default=0)
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="auto: Pallas kernels on TPU/GPU, jnp reference on CPU (see docs/kernels.md)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--drafter", default=None,
                   help="speculative decoding: an exported drafter (dir, a dflash-train run dir for its "
                        "export/, hub id or shipped name such as tiny-code-dflash) or 'ngram' (prompt "
                        "lookup); default: plain AR decoding")
    p.add_argument("--block-size", type=flag(BLOCK), default=None,
                   help="draft block size (default: the drafter's)")
    p.add_argument("--verify", choices=RULES, default=None,
                   help="verification rule (default: greedy at temperature 0, else token)")
    p.add_argument("--tree-width", type=flag(COUNT.with_special(0, "no tree")), default=0,
                   help="draft a beam tree with this many paths per depth (DFlash; greedy or token rule)")
    p.add_argument("--ngram-branch", action="store_true",
                   help="verify the prompt-lookup chain beside the DFlash draft, as one more tree branch "
                        "(tree width 1 unless --tree-width)")
    add_dynamic_tree_arg(p, "draft an EAGLE-2 dynamic tree: depth, top-k children per node, nodes verified "
                            "(a drafter that drafts one token per step; greedy or token rule)")
    p.add_argument("--stochastic-drafts", action="store_true",
                   help="when sampling, draw DFlash drafts from the drafter's distribution")
    p.add_argument("--show-steps", action="store_true",
                   help="colour what each verify step emitted: accepted drafts green, the target's own token "
                        "bold yellow; without colour the target's tokens in brackets (with --json: a 'steps' "
                        "list of {drafts, bonus})")
    p.add_argument("--color", choices=COLOR_MODES, default="auto",
                   help="--show-steps colours: auto colours a terminal only, unless NO_COLOR (off) or "
                        "FORCE_COLOR (on) is set")
    add_mesh_arg(p)
    add_distributed_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.drafter is None:  # speculative-only options would be silently dropped
        options = (("--block-size", args.block_size), ("--verify", args.verify),
                   ("--tree-width", args.tree_width), ("--ngram-branch", args.ngram_branch),
                   ("--dynamic-tree", args.dynamic_tree),
                   ("--stochastic-drafts", args.stochastic_drafts), ("--show-steps", args.show_steps))
        given = [flag for flag, value in options if value]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            parser.error(f"{', '.join(given)} {verb} only to speculative decoding: add --drafter")
    others = (args.tree_width, args.ngram_branch, args.block_size, args.stochastic_drafts)
    if args.dynamic_tree and any(others):
        parser.error("--dynamic-tree sets its own tree, depth and drafts: drop --tree-width, --ngram-branch, "
                     "--block-size, --stochastic-drafts")
    return run_command("dflash-generate", lambda: _generate(args), verbose=bool(args.verbose))


def _generate(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    tokenizer = load_tokenizer(args.target)
    mesh = mesh_from_args(args.mesh)
    model = load_target(args.target, dtype=DTYPES[args.dtype], attention_impl=args.attention_impl,
                        mesh=mesh)
    if args.tree_width or args.ngram_branch or args.dynamic_tree:
        check_tree(model.cfg)  # before the drafter loads and anything compiles
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids  # length: checked below
    if not ids:
        raise ConfigError("the prompt encodes to zero tokens")
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed),
                  eos_ids=eos_ids(tokenizer, model.cfg.eos_token_id), max_len=args.max_len,
                  pad_id=tokenizer.pad_token_id or 0,
                  allow_longer_than_context=args.allow_longer_than_context, mesh=mesh)
    if args.drafter is None:
        result = generate(model, [ids], **common)
    else:
        method, drafter = resolve_method(args.drafter, model, block_size=args.block_size,
                                         stochastic=args.stochastic_drafts, mesh=mesh)  # target's impl
        if args.tree_width or args.ngram_branch:
            method = BeamTreeDraft.around(method, args.tree_width or 1, lookup=args.ngram_branch)
        if args.dynamic_tree:
            method = dynamic_tree_method_for(drafter, *args.dynamic_tree)
        result = speculative_generate(model, [ids], method=method, drafter=drafter, rule=args.verify,
                                      **common)
    if not is_primary():
        return 0
    tokens = result.tokens[0]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        out = {"text": text, "prompt_tokens": ids, "tokens": tokens, "num_tokens": len(tokens),
               "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s,
               "compile_s": result.compile_s}
        if args.drafter is not None:
            out.update(tau=result.tau, mean_acceptance_length=result.mean_acceptance_length,
                       acceptance_lengths=result.acceptance_lengths[0],
                       target_forwards=result.target_forwards[0], block_size=result.block_size)
        if args.show_steps:
            out["steps"] = [dataclasses.asdict(s) for s in split_steps(tokens, result.acceptance_lengths[0])]
        print(json.dumps(out))
    elif args.show_steps:
        print(show_steps(tokenizer, prompt, tokens, result.acceptance_lengths[0],
                         color=wants_color(args.color, sys.stdout)))
    else:
        print(prompt + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
