"""``dflash-bench``: AR vs prompt lookup vs a drafter, same prompts, same engine, one process."""

from __future__ import annotations

import argparse
import sys

from dflash.bench import anchor_profile, bench_methods, load_prompts, write_json
from dflash.checks import BLOCK, COUNT, INTEGER, NON_NEGATIVE, flag
from dflash.cli.failures import compile_only, run_command
from dflash.cli.parser import (
    add_compile_only_args,
    add_dynamic_tree_arg,
    add_mesh_arg,
    make_parser,
    mesh_from_args,
)
from dflash.config import DTYPES
from dflash.decoding import SamplingParams
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
from dflash.viz.figures import bench_figures


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-bench", __doc__)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--drafter", default="tiny-code-dflash",
                   help="exported drafter dir / dflash-train run dir (its export/) / hub id / shipped name")
    p.add_argument("--also", action="append", default=[], metavar="DRAFTER",
                   help="another drafter, of any kind, to run side by side on the same prompts (repeatable; "
                        "method name 'also:DRAFTER' in the table and JSON; drafters with a mask token must "
                        "share it)")
    p.add_argument("--prompts", default="tiny-code-heldout",
                   help="jsonl file ({'prompt'} or {'messages'} rows), a datasets id, or tiny-code-heldout")
    p.add_argument("--split", default="train", help="split when --prompts is a datasets id")
    p.add_argument("--field", default="prompt", help="prompt column when --prompts is a dataset")
    p.add_argument("--num-prompts", type=flag(COUNT), default=16)
    p.add_argument("--max-new-tokens", type=flag(COUNT), default=256)
    p.add_argument("--batch-size", type=flag(COUNT), default=1)
    p.add_argument("--block-size", type=flag(BLOCK), default=None,
                   help="draft block (default: the drafter's)")
    p.add_argument("--temperature", type=flag(NON_NEGATIVE), default=0.0)
    p.add_argument("--verify", choices=RULES, default=None)
    p.add_argument("--stochastic-drafts", action="store_true")
    p.add_argument("--tree-width", type=flag(COUNT.with_special(0, "no tree")), default=0,
                   help="also run the drafter as a beam tree of this width per depth (method 'tree')")
    p.add_argument("--ngram-branch", action="store_true",
                   help="also run the drafter with the prompt-lookup chain as one more tree branch, verified "
                        "in the same pass (method 'drafter+ngram'; tree width --tree-width or 1)")
    add_dynamic_tree_arg(p, "also run the drafter as an EAGLE-2 dynamic tree (method 'dynamic-tree'; a "
                            "drafter that drafts one token per step): depth, top-k children per node, nodes "
                            "verified")
    p.add_argument("--no-compact", action="store_true",
                   help="keep finished rows in the device batch (default: drop them once half are done)")
    p.add_argument("--ceiling", action="store_true",
                   help="also time each method's bare step (draft + verify + commit, no loop) and report the "
                        "speedup ceiling tau * t_ar / t_step and the share of it achieved")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    p.add_argument("--seed", type=flag(INTEGER), default=0)
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="auto: Pallas kernels on TPU/GPU, jnp reference on CPU (see docs/kernels.md)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", default=None, help="write the full result here")
    p.add_argument("--allow-longer-than-context", action="store_true",
                   help="run prompts + new tokens longer than the target's context (expect wrong output)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write the figures as PNGs here: acceptance histogram, by draft position, tau per "
                        "prompt, speedup (docs/viz.md)")
    p.add_argument("--anchor-profile", default=None, metavar="JSON",
                   help="also write the greedy acceptance of the DFlash drafter and of prompt lookup at "
                        "every anchor of the target's own continuations, and the steps each takes "
                        "(dflash.bench.anchor_profile), and print its summary")
    add_compile_only_args(p, "compile one verify pass (--block-size, default 16) and one AR step of "
                             "--target-config for --topology and print memory / time estimates (no weights; "
                             "needs libtpu)", json=False)  # --json above writes the plan too
    p.add_argument("--context", type=flag(COUNT), default=2048, help="--compile-only: cached positions")
    add_mesh_arg(p, help="decode on a device mesh: data=D,fsdp=F,expert=E,tensor=T, any subset, -1 for the "
                         "rest of the devices (batch over data x fsdp x expert, a MoE's experts over expert, "
                         "the models over tensor; docs/multihost.md); with --compile-only, the mesh over the "
                         "topology's chips (default tensor=all)")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.compile_only:
        return _compile_only(args)
    if args.anchor_profile and args.temperature > 0:
        print("dflash-bench: error: --anchor-profile measures greedy acceptance; use --temperature 0",
              file=sys.stderr)
        return 2
    if args.mesh is not None and (args.ceiling or args.anchor_profile):
        print("dflash-bench: error: --ceiling and --anchor-profile run unsharded; drop --mesh for them",
              file=sys.stderr)
        return 2
    return run_command("dflash-bench", lambda: _bench(args), verbose=bool(args.verbose))


def _bench(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    tokenizer = load_tokenizer(args.target)
    mesh = mesh_from_args(args.mesh)
    target = load_target(args.target, dtype=DTYPES[args.dtype], attention_impl=args.attention_impl,
                         mesh=mesh)  # drafters resolved below take its attention_impl and mesh
    if args.tree_width or args.ngram_branch or args.dynamic_tree:
        check_tree(target.cfg)  # before the drafter loads and anything compiles
    prompts = load_prompts(args.prompts, tokenizer, field=args.field, split=args.split,
                           limit=args.num_prompts)
    drafter_method, drafter = resolve_method(args.drafter, target, block_size=args.block_size,
                                             stochastic=args.stochastic_drafts, mesh=mesh)
    k = drafter_method.block_size
    if args.anchor_profile and drafter is None:
        raise ConfigError(f"--anchor-profile profiles a drafter; {args.drafter!r} is not one")
    stop = () if args.ignore_eos else eos_ids(tokenizer, target.cfg.eos_token_id)
    methods = {"ar": resolve_method("ar", target), "ngram": resolve_method("ngram", target, block_size=k),
               "drafter": (drafter_method, drafter)}
    if args.tree_width:
        methods["tree"] = (BeamTreeDraft.around(drafter_method, args.tree_width), drafter)
    if args.ngram_branch:
        hybrid = BeamTreeDraft.around(drafter_method, args.tree_width or 1, lookup=True)
        methods["drafter+ngram"] = (hybrid, drafter)
    if args.dynamic_tree:
        methods["dynamic-tree"] = (dynamic_tree_method_for(drafter, *args.dynamic_tree), drafter)
    for other in args.also:
        also_method, also_drafter = resolve_method(other, target, block_size=args.block_size,
                                                   stochastic=args.stochastic_drafts, mesh=mesh)
        if drafter is None or also_drafter is None:
            raise ConfigError("--also compares exported drafters: give drafters, not ar/ngram")
        methods[f"also:{other}"] = (also_method, also_drafter)
    mask_token_id = _shared_mask_token(methods)
    sampling = SamplingParams(temperature=args.temperature)
    result = bench_methods(
        target, prompts, methods, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        sampling=sampling, rule=args.verify, seed=args.seed, compact=not args.no_compact,
        ceiling=args.ceiling, allow_longer_than_context=args.allow_longer_than_context,
        eos_ids=stop, mask_token_id=mask_token_id, mesh=mesh)
    profile = None
    if args.anchor_profile:
        profile = anchor_profile(target, drafter, prompts, max_new_tokens=args.max_new_tokens,
                                 block_size=k, eos_ids=stop)
    if not is_primary():  # every process ran the same benchmark; process 0 reports it
        return 0
    result.update(target=args.target, drafter=args.drafter, prompts=args.prompts)
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"T={args.temperature}, B={k}, backend {result['backend']}")
    width = max(8, *(len(name) for name in result["methods"]))
    extra = f" {'step ms':>8} {'ceiling':>8} {'achieved':>8}" if args.ceiling else ""
    print(f"{'method':>{width}} {'tau':>6} {'tok/s':>9} {'ms/token':>9} {'speedup':>8} {'fwd':>6}{extra}")
    for name, r in result["methods"].items():
        line = (f"{name:>{width}} {r['tau']:>6.2f} {r['tokens_per_s']:>9.1f} "
                f"{r['time_per_output_token_ms']:>9.2f} {r['speedup']:>7.2f}x {r['target_forwards']:>6}")
        if "ceiling" in r:
            line += f" {r['pass_ms']:>8.2f} {r['ceiling']:>7.2f}x {100 * r['efficiency']:>7.0f}%"
        print(line)
    if args.ceiling:
        print(f"step ms: one bare engine step (draft, verify, commit) at {result['ceiling_context']} "
              "committed tokens; ceiling: tau * t_ar / t_step; achieved: speedup / ceiling")
    if args.json:
        write_json(result, args.json)
    if args.plots:
        print("figures:", ", ".join(str(p) for p in bench_figures(result, args.plots)))
    if profile is not None:
        write_json(profile, args.anchor_profile)
        sm = profile["summary"]
        print(f"anchor profile ({sm['anchors']} anchors, greedy): tau drafter {sm['tau_drafter']:.2f} | "
              f"n-gram {sm['tau_ngram']:.2f} | the longer of the two per step {sm['tau_best']:.2f}")
        print(f"  full blocks (all {k - 1} drafts accepted): drafter {sm['drafter_full_blocks']}, n-gram "
              f"{sm['ngram_full_blocks']}")
        print("  drafter's accepted drafts where n-gram's block is full: "
              f"{sm['drafter_accepted_where_ngram_full']}")
        print(f"  n-gram's accepted drafts where the drafter's block is full: "
              f"{sm['ngram_accepted_where_drafter_full']}")
    return 0


def _shared_mask_token(methods: dict[str, tuple]) -> int | None:
    """The one mask token every row never emits (so all rows' tokens compare): the drafters' own, of
    those that have one (DFlash, Orthrus; EAGLE-3 and MTP have none); two different ones cannot share."""
    own = {name: d.cfg.mask_token_id for name, (_, d) in methods.items()
           if d is not None and d.cfg.mask_token_id is not None}
    if len(set(own.values())) > 1:
        named = ", ".join(f"{n}: {m}" for n, m in own.items())
        raise ConfigError(f"--also: the drafters' mask tokens differ ({named}); compare drafters that "
                          "share one")
    return next(iter(own.values()), None)


def _compile_only(args: argparse.Namespace) -> int:
    from dflash.plan import decode_plan

    return compile_only("dflash-bench", args, lambda: decode_plan(
        args.target_config, args.topology, args.mesh, dtype=args.dtype, batch=args.batch_size,
        block_size=args.block_size or 16, context=args.context), needs=("target_config", "topology"))


if __name__ == "__main__":
    raise SystemExit(main())
