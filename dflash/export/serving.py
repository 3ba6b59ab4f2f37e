"""An exported DFlash drafter seen from outside JAX: its tensors as PyTorch reads them, its config
as ``transformers`` reads it, the vLLM / SGLang serving commands (docs/export.md), and greedy
generation by ``transformers`` and by vLLM for comparison with our engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dflash.io.loading import CheckpointError


def reference_layout(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> PyTorch ``[out, in]`` shape, written from docs/design.md §8 and the config
    alone (independent of our weight table), as the PyTorch reference and the serving engines
    expect them."""
    d, hd, i_dim = hf["hidden_size"], hf["head_dim"], hf["intermediate_size"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    n_feat = len(hf["dflash_config"]["target_layer_ids"])
    out = {"fc.weight": (d, n_feat * d), "hidden_norm.weight": (d,), "norm.weight": (d,)}
    for i in range(hf["num_hidden_layers"]):
        p = f"layers.{i}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (i_dim, d), p + "mlp.up_proj.weight": (i_dim, d),
                p + "mlp.down_proj.weight": (d, i_dim)}
    return out


def check_torch_layout(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Opens ``model.safetensors`` with PyTorch and checks every tensor against
    ``reference_layout``; returns name -> shape, or raises ``CheckpointError`` naming the
    missing, unexpected and misshapen tensors."""
    from safetensors.torch import load_file

    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    tensors = {k: tuple(v.shape) for k, v in load_file(str(directory / "model.safetensors")).items()}
    expected = reference_layout(hf)
    problems = [f"missing {k}" for k in expected.keys() - tensors.keys()]
    problems += [f"unexpected {k}" for k in tensors.keys() - expected.keys()]
    problems += [f"{k}: {tensors[k]} != {v}" for k, v in expected.items() if k in tensors and tensors[k] != v]
    if problems:
        raise CheckpointError(f"{directory} does not have the reference layout: "
                              f"{'; '.join(sorted(problems))}")
    return dict(sorted(tensors.items()))


def transformers_config(directory: str | Path) -> Any:
    """The drafter's ``config.json`` as ``transformers.AutoConfig`` reads it (the target family's
    config class, with ``block_size`` and ``dflash_config`` kept as attributes)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory))


def transformers_greedy(target_dir: str | Path, prompts: Sequence[Sequence[int]],
                        max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` by ``transformers`` (PyTorch, fp32) of the target,
    stopping at its EOS like our ``generate`` (which includes the EOS token too)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def serving_commands(drafter_dir: str | Path, target: str) -> dict[str, str]:
    """The vLLM and SGLang commands that serve ``target`` with this drafter (docs/export.md)."""
    hf = json.loads((Path(drafter_dir) / "config.json").read_text())
    spec = json.dumps({"method": "dflash", "model": str(drafter_dir),
                       "num_speculative_tokens": hf["block_size"] - 1})
    return {"vllm": f"vllm serve {target} --speculative-config '{spec}'",
            "sglang": (f"python -m sglang.launch_server --model-path {target} --speculative-algorithm DFLASH "
                       f"--speculative-draft-model-path {drafter_dir} --dtype bfloat16")}


def vllm_greedy(target: str, drafter_dir: str | Path, prompts: Sequence[Sequence[int]],
                max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by vLLM with the drafter (a GPU runtime with vLLM installed; never
    run in this repository's CI, which has neither)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    hf = json.loads((Path(drafter_dir) / "config.json").read_text())
    llm = LLM(model=str(target), speculative_config={"method": "dflash", "model": str(drafter_dir),
                                                      "num_speculative_tokens": hf["block_size"] - 1})
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]
