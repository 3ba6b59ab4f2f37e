"""Our greedy AR decoding against ``transformers.generate`` (PyTorch, CPU): speed and agreement.

torch and transformers are imported inside the function: they are test/benchmark
dependencies, not the package's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np

from dflash.decoding import SamplingParams, generate
from dflash.io.loading import load_target, resolve
from dflash.io.tokenizer import load_tokenizer


def ar_vs_transformers(target: str, prompts: list[str], *, max_new_tokens: int = 256,
                       repeats: int = 3, torch_threads: int | None = None) -> dict[str, Any]:
    """Greedy batch-1 AR decoding: our on-device loop vs ``transformers.generate`` (PyTorch CPU).

    Both generate exactly ``max_new_tokens`` per prompt (EOS ignored) from the same prompt
    ids. Each side is timed over its whole call (ours: ``generate``, with its host-side batch
    preparation, compiled-program lookup and the tokens' copy back; theirs: ``model.generate``),
    after a warm-up call that compiles ours; the median of ``repeats`` runs. Our compiled
    program's own time is reported beside it (``ours_program_tokens_per_s``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if torch_threads:
        torch.set_num_threads(torch_threads)
    directory = resolve(target)
    tokenizer = load_tokenizer(directory)
    ours = load_target(directory)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    per_prompt = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ours_times, program_times, hf_times = [], [], []
        ours_tokens = hf_tokens = None
        for rep in range(repeats + 1):  # the first repeat warms up / compiles
            t0 = time.perf_counter()
            res = generate(ours, [ids], max_new_tokens=max_new_tokens, eos_ids=(),
                           sampling=SamplingParams(), key=jax.random.key(0))
            ours_elapsed = time.perf_counter() - t0  # the tokens are on the host: nothing pending
            ours_tokens = res.tokens[0]
            with torch.no_grad():
                t0 = time.perf_counter()
                out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
                hf_elapsed = time.perf_counter() - t0
            hf_tokens = out[0, len(ids):].tolist()
            if rep:
                ours_times.append(ours_elapsed)
                program_times.append(res.elapsed_s)
                hf_times.append(hf_elapsed)
        ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
        per_prompt.append({
            "prompt_tokens": len(ids), "new_tokens": max_new_tokens,
            "ours_tokens_per_s": max_new_tokens / ours_s, "hf_tokens_per_s": max_new_tokens / hf_s,
            "ours_program_tokens_per_s": max_new_tokens / statistics.median(program_times),
            "ratio": hf_s / ours_s,
            "same_tokens": ours_tokens == hf_tokens,
            "first_divergence": next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens,
                                                                        strict=True)) if a != b), None),
        })
    ours_tps = float(np.mean([p["ours_tokens_per_s"] for p in per_prompt]))
    hf_tps = float(np.mean([p["hf_tokens_per_s"] for p in per_prompt]))
    return {
        "target": str(target), "batch_size": 1, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
        "timing": "whole call, both sides", "ours_tokens_per_s": ours_tps,
        "ours_program_tokens_per_s": float(np.mean([p["ours_program_tokens_per_s"] for p in per_prompt])),
        "transformers_tokens_per_s": hf_tps, "ratio": ours_tps / hf_tps,
        "per_prompt": per_prompt,
    }
