"""``dflash-regenerate``: rewrite a conversation dataset's responses with the target's own."""

from __future__ import annotations

import argparse
import json

import jax
from jax.sharding import Mesh

from dflash.checks import COUNT, INTEGER, NON_NEGATIVE, flag
from dflash.cli.failures import compile_only, run_command
from dflash.cli.parser import add_compile_only_args, add_mesh_arg, make_parser, mesh_from_args
from dflash.config import DTYPES
from dflash.decoding import SamplingParams
from dflash.distributed import add_distributed_args, is_primary
from dflash.fingerprint import initialize_from_args
from dflash.io.loading import load_target, read_config, resolve
from dflash.io.tokenizer import load_tokenizer
from dflash.training.regenerate import SIZING_PROMPT_TOKENS, pick_regen_mesh, regenerate_dataset


def json_object(text: str) -> dict:
    """A JSON object given on the command line (the chat template's keyword arguments)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-regenerate", __doc__)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--data", help="local jsonl/json/parquet file or dir, or a hub dataset id (required)")
    p.add_argument("--split", default="train")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--out", help="output .jsonl (one {messages: [...]} per line) (required)")
    p.add_argument("--max-examples", type=flag(COUNT.with_special(0, "all")), default=0)
    p.add_argument("--max-new-tokens", type=flag(COUNT), default=512)
    p.add_argument("--max-prompt-tokens", type=flag(COUNT), default=None,
                   help="keep the last this-many prompt tokens (default: the target's context minus "
                        "--max-new-tokens)")
    p.add_argument("--allow-longer-than-context", action="store_true",
                   help="allow prompt + new tokens past the target's context (expect wrong output)")
    p.add_argument("--batch-size", type=flag(COUNT), default=16)
    p.add_argument("--shard-size", type=flag(COUNT), default=256,
                   help="conversations per output shard (OUT.shards/): the unit of resuming and of the "
                        "split over processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--temperature", type=flag(NON_NEGATIVE), default=0.0)
    p.add_argument("--seed", type=flag(INTEGER), default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                   help="extra arguments of the chat template, e.g. '{\"enable_thinking\": false}' for the "
                        "non-thinking Qwen3 recipe (dflash-prepare-data prints a recipe's)")
    add_mesh_arg(p, help="run the target on a mesh of this process's devices: data=D,fsdp=F,expert=E,"
                         "tensor=T, any subset, -1 for the rest (every process decodes its own shards of the "
                         "dataset on its own mesh). Default: the least tensor parallelism whose weights and "
                         "KV cache fit each device (said in one line), data-parallel over the rest")
    add_compile_only_args(p, "compile the regeneration program for --topology (--target-config, "
                             "--batch-size, --max-prompt-tokens, --max-new-tokens) on the mesh it would pick "
                             "there, and print its memory per chip (no weights, no data)")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.compile_only:
        return _compile_only(args)
    if not args.data or not args.out:
        p.error("--data and --out are required")
    return run_command("dflash-regenerate", lambda: _regenerate(args), verbose=bool(args.verbose))


def _regenerate(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    tokenizer = load_tokenizer(args.target)
    mesh = _mesh(args)
    target = load_target(args.target, dtype=DTYPES[args.dtype], mesh=mesh)
    n = regenerate_dataset(
        target, tokenizer, args.data, args.out, split=args.split, messages_field=args.messages_field,
        max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
        progress=not args.no_progress, sampling=SamplingParams(temperature=args.temperature),
        seed=args.seed, allow_longer_than_context=args.allow_longer_than_context, mesh=mesh,
        chat_template_kwargs=args.chat_template_kwargs)
    if is_primary():
        print(f"wrote {n} conversations to {args.out}")
    return 0


def _mesh(args: argparse.Namespace) -> Mesh | None:
    """``--mesh`` over this process's devices, or the one picked to fit the target (said in one line)."""
    if args.mesh is not None:
        return mesh_from_args(args.mesh, local=True)
    cfg = read_config(resolve(args.target))
    pick = pick_regen_mesh(cfg, DTYPES[args.dtype], jax.local_devices(), batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    if is_primary():
        print(f"dflash-regenerate: {pick.line} (--mesh to choose)", flush=True)
    return mesh_from_args(pick.config, local=True)


def _compile_only(args: argparse.Namespace) -> int:
    from dflash.plan import regen_plan

    return compile_only("dflash-regenerate", args, lambda: regen_plan(
        args.target_config, args.topology, args.mesh, dtype=args.dtype, batch=args.batch_size,
        prompt_tokens=args.max_prompt_tokens or SIZING_PROMPT_TOKENS, new_tokens=args.max_new_tokens),
        needs=("target_config", "topology"))


if __name__ == "__main__":
    raise SystemExit(main())
