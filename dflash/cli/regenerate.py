"""``dflash-regenerate``: rewrite a conversation dataset's responses with the target's own."""

from __future__ import annotations

import json
import sys

from dflash.cli.parser import add_mesh_arg, make_parser, mesh_from_args
from dflash.decoding import SamplingParams
from dflash.distributed import add_distributed_args, is_primary
from dflash.errors import DflashError
from dflash.fingerprint import initialize_from_args
from dflash.models import load_target
from dflash.models.loading import DTYPES
from dflash.models.tokenizer import load_tokenizer
from dflash.training.regenerate import regenerate_dataset


def json_object(text: str) -> dict:
    """A JSON object given on the command line (the chat template's keyword arguments)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-regenerate", __doc__)
    p.add_argument("--target", default="tiny-code")
    p.add_argument("--data", required=True, help="local jsonl/json/parquet file or dir, or a hub dataset id")
    p.add_argument("--split", default="train")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--out", required=True, help="output .jsonl (one {messages: [...]} per line)")
    p.add_argument("--max-examples", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="keep the last this-many prompt tokens (default: the target's context minus "
                        "--max-new-tokens)")
    p.add_argument("--allow-longer-than-context", action="store_true",
                   help="allow prompt + new tokens past the target's context (expect wrong output)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256,
                   help="conversations per output shard (OUT.shards/): the unit of resuming and of the "
                        "split over processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                   help="extra arguments of the chat template, e.g. '{\"enable_thinking\": false}' for the "
                        "non-thinking Qwen3 recipe (dflash-prepare-data prints a recipe's)")
    add_mesh_arg(p, help="run the target on a mesh of this process's devices: data=D,fsdp=F,tensor=T, any "
                         "subset, -1 for the rest (tensor-parallel when it does not fit one device; every "
                         "process decodes its own shards of the dataset on its own mesh)")
    add_distributed_args(p)
    args = p.parse_args(argv)
    try:
        initialize_from_args(args)
        tokenizer = load_tokenizer(args.target)
        mesh = mesh_from_args(args.mesh, local=True)
        target = load_target(args.target, dtype=DTYPES[args.dtype], mesh=mesh)
        n = regenerate_dataset(
            target, tokenizer, args.data, args.out, split=args.split, messages_field=args.messages_field,
            max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
            progress=not args.no_progress, sampling=SamplingParams(temperature=args.temperature),
            seed=args.seed, allow_longer_than_context=args.allow_longer_than_context, mesh=mesh,
            chat_template_kwargs=args.chat_template_kwargs)
    except (DflashError, FileNotFoundError) as err:  # anything else is a bug: traceback
        print(f"dflash-regenerate: error: {err}", file=sys.stderr)
        return 2
    if is_primary():
        print(f"wrote {n} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
