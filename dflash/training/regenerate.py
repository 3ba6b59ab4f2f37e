"""Regenerate a conversation dataset's responses with the target itself.

The published DFlash recipe trains on conversations whose assistant turns were rewritten by
the target, so the drafter learns the target's own distribution rather than another model's.
Turns are regenerated in order (a later turn sees the regenerated earlier ones), batched
across conversations and decoded on device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from dflash.checks import COUNT, check
from dflash.config import ModelConfig
from dflash.decoding import SamplingParams, generate
from dflash.decoding.autoregressive import ContextLengthError, bucket
from dflash.decoding.mesh import MeshPick, pick_decode_mesh
from dflash.errors import ConfigError
from dflash.fingerprint import check_consistent, fingerprint
from dflash.models.transformer import Transformer
from dflash.training.chat import clean_messages
from dflash.training.regen_shards import ShardPlan
from dflash.training.sources import DataConfig, load_dataset

SIZING_PROMPT_TOKENS = 2048  # prompt length a picked mesh is sized for when max_prompt_tokens is unset


def pick_regen_mesh(cfg: ModelConfig, dtype: Any, devices: Any, *, batch_size: int, max_new_tokens: int,
                    max_prompt_tokens: int | None = None, memory_bytes: int | None = None) -> MeshPick:
    """The mesh a regeneration job decodes on when none is given: the least tensor parallelism
    over ``devices`` (one host's) that holds the target and one batch's KV cache
    (``decoding.mesh.pick_decode_mesh``), the rest data-parallel over the batch. The cache is
    sized for ``max_prompt_tokens`` (default ``SIZING_PROMPT_TOKENS``) + ``max_new_tokens``."""
    prompt = SIZING_PROMPT_TOKENS if max_prompt_tokens is None else max_prompt_tokens
    slots = min(bucket(prompt + max_new_tokens), bucket(cfg.max_position_embeddings))
    return pick_decode_mesh(cfg, dtype, devices, rows=batch_size, slots=slots, memory_bytes=memory_bytes)


def stop_ids(tokenizer: Any, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """EOS ids plus the chat template's end-of-turn token when the tokenizer has one."""
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def regenerate_conversations(
    target: Transformer,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 512,
    max_prompt_tokens: int | None = None,
    batch_size: int = 16,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    allow_longer_than_context: bool = False,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[list[dict[str, str]]]:
    """Copies of ``conversations`` with every assistant turn replaced by the target's response.

    Prompts keep their last ``max_prompt_tokens`` tokens (default: what the target's context
    leaves after ``max_new_tokens``); settings that could pass the context are refused up front.
    ``key`` (default ``jax.random.key(seed)``) drives sampling. ``mesh``: decode there (the
    target must be on it); greedy output is the same as without. ``chat_template_kwargs`` go to
    the chat template with every prompt (Qwen3's published drafters: ``{"enable_thinking": False}``).
    """
    check("batch_size", batch_size, COUNT)  # a batch of <= 0 rows would regenerate nothing, silently
    check("max_new_tokens", max_new_tokens, COUNT)
    context = target.cfg.max_position_embeddings
    if max_prompt_tokens is None:
        max_prompt_tokens = context - max_new_tokens
    too_long = max_prompt_tokens + max_new_tokens > context and not allow_longer_than_context
    if max_prompt_tokens < 1 or too_long:
        raise ContextLengthError(
            f"max_prompt_tokens {max_prompt_tokens} + max_new_tokens {max_new_tokens} does not fit the "
            f"target's context of {context} (max_position_embeddings); lower --max-prompt-tokens / "
            "--max-new-tokens, or opt in with --allow-longer-than-context")
    out = [[dict(m) for m in conv] for conv in conversations]
    template_kwargs = chat_template_kwargs or {}
    eos = stop_ids(tokenizer, target.cfg.eos_token_id)
    key = jax.random.key(seed) if key is None else key
    bar = tqdm(total=sum(m["role"] == "assistant" for c in out for m in c), desc="regenerate",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(out), batch_size):
        chunk = list(range(start, min(start + batch_size, len(out))))
        turn = {i: 0 for i in chunk}  # next message index to look at, per conversation
        while True:
            jobs = []
            for i in chunk:
                conv = out[i]
                while turn[i] < len(conv) and conv[turn[i]]["role"] != "assistant":
                    turn[i] += 1
                if turn[i] < len(conv):
                    jobs.append(i)
            if not jobs:
                break
            prompts = []
            for i in jobs:
                text = tokenizer.apply_chat_template(out[i][: turn[i]], tokenize=False,
                                                     add_generation_prompt=True, **template_kwargs)
                ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids[-max_prompt_tokens:]
                prompts.append(ids)
            key, sub = jax.random.split(key)
            result = generate(target, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=sub,
                              eos_ids=eos, pad_id=tokenizer.pad_token_id or 0,
                              allow_longer_than_context=allow_longer_than_context, mesh=mesh)
            for i, toks in zip(jobs, result.tokens, strict=True):
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                out[i][turn[i]]["content"] = tokenizer.decode(toks, skip_special_tokens=True)
                turn[i] += 1
            bar.update(len(jobs))
            if on_batch is not None:
                on_batch(len(jobs))
    bar.close()
    return out


def regenerate_dataset(target: Transformer, tokenizer: Any, source: str, out_path: str | Path, *,
                       split: str = "train", messages_field: str = "messages", max_examples: int = 0,
                       shard_size: int = 256, progress: bool = True, mesh: Mesh | None = None,
                       **kwargs: Any) -> int:
    """Reads conversations through ``datasets``, writes a jsonl dataset with regenerated turns.

    The work is cut into shards of ``shard_size`` conversations (``regen_shards``): each process
    regenerates shards ``process_index, process_index + process_count, ...`` and skips the ones
    already written, so a killed job resumes without redoing finished shards and the result does
    not depend on the process count. Process 0 then joins the shards into ``out_path``.
    ``mesh`` (this process's devices) is where the target decodes; it is not a setting of the
    output (a job may resume on another mesh).
    """
    import datasets  # deferred: only writing the dataset needs it, and it is slow to import

    check("shard_size", shard_size, COUNT)
    check("max_examples", max_examples, COUNT.with_special(0, "all"))

    ds = load_dataset(DataConfig(source=source, split=split, format="conversations",
                                  messages_field=messages_field))
    if messages_field not in ds.column_names:
        raise ConfigError(f"dataset {source!r} has no {messages_field!r} column; columns: {ds.column_names}")
    if max_examples:
        ds = ds.select(range(min(max_examples, len(ds))))
    settings = {"source": source, "split": split, "messages_field": messages_field,
                "max_examples": max_examples,
                "target": repr(target.cfg), "dtype": str(target.dtype),
                **{k: repr(v) for k, v in sorted(kwargs.items())}}
    if jax.process_count() > 1:  # before the manifest: a process with other settings would wait forever
        check_consistent(fingerprint({"regenerate": {**settings, "shard_size": shard_size}}, [source]))
    plan = ShardPlan.open(Path(out_path), len(ds), shard_size, settings)
    seed = int(kwargs.pop("seed", 0))
    with plan.progress(progress) as advance:
        for shard in plan.todo():
            lo, hi = plan.bounds(shard)
            convs = [[{"role": m["role"], "content": m["content"]} for m in clean_messages(conv)]
                     for conv in ds.select(range(lo, hi))[messages_field]]  # also ShareGPT's from/value turns
            new = regenerate_conversations(target, tokenizer, convs, progress=False,
                                           key=jax.random.fold_in(jax.random.key(seed), shard), mesh=mesh,
                                           **kwargs)
            plan.write(shard, datasets.Dataset.from_dict({messages_field: new}))
            advance()
    return plan.finish()
