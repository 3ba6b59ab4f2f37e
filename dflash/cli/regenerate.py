"""``dflash-regenerate``: rewrite a conversation dataset's responses with the target's own."""

from __future__ import annotations

import argparse

from dflash.checks import COUNT, INTEGER, NON_NEGATIVE, flag
from dflash.cli.failures import run_command
from dflash.cli.parser import add_mesh_arg, make_parser, mesh_from_args
from dflash.config import DTYPES
from dflash.decoding import SamplingParams
from dflash.distributed import add_distributed_args, is_primary
from dflash.fingerprint import initialize_from_args
from dflash.io.loading import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.regenerate import regenerate_dataset


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-regenerate", __doc__)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--data", required=True, help="local jsonl/json/parquet file or dir, or a hub dataset id")
    p.add_argument("--split", default="train")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--out", required=True, help="output .jsonl (one {messages: [...]} per line)")
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
    add_mesh_arg(p, help="run the target on a mesh of this process's devices: data=D,fsdp=F,tensor=T, any "
                         "subset, -1 for the rest (tensor-parallel when it does not fit one device; every "
                         "process decodes its own shards of the dataset on its own mesh)")
    add_distributed_args(p)
    args = p.parse_args(argv)
    return run_command("dflash-regenerate", lambda: _regenerate(args), verbose=bool(args.verbose))


def _regenerate(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    tokenizer = load_tokenizer(args.target)
    mesh = mesh_from_args(args.mesh, local=True)
    target = load_target(args.target, dtype=DTYPES[args.dtype], mesh=mesh)
    n = regenerate_dataset(
        target, tokenizer, args.data, args.out, split=args.split, messages_field=args.messages_field,
        max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
        progress=not args.no_progress, sampling=SamplingParams(temperature=args.temperature),
        seed=args.seed, allow_longer_than_context=args.allow_longer_than_context, mesh=mesh)
    if is_primary():
        print(f"wrote {n} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
