"""The exported layout as PyTorch and ``transformers`` read it, and the serving commands."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from dflash.drafters.registry import export_dir
from dflash.errors import CheckpointError
from dflash.export.serving import check_torch_layout, serving_commands, transformers_config


def test_shipped_drafter_has_the_reference_layout_and_a_broken_one_is_named(tmp_path):
    shipped = export_dir("tiny-code-dflash")
    hf = json.loads((shipped / "config.json").read_text())
    layout = check_torch_layout(shipped)
    d = hf["hidden_size"]
    assert layout["fc.weight"] == (d, len(hf["dflash_config"]["target_layer_ids"]) * d)
    assert len(layout) == 3 + 11 * hf["num_hidden_layers"]
    cfg = transformers_config(shipped)
    assert cfg.block_size == hf["block_size"] and cfg.dflash_config == hf["dflash_config"]
    broken = shutil.copytree(shipped, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["layers.0.mlp.down_proj.weight"] = tensors["layers.0.mlp.down_proj.weight"].T.copy()  # [in, out]
    del tensors["norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj\.weight: .*missing norm\.weight"):
        check_torch_layout(broken)
    cmds = serving_commands(shipped, "Qwen/Qwen3-8B")
    assert f'"num_speculative_tokens": {hf["block_size"] - 1}' in cmds["vllm"]
    assert f"--speculative-draft-model-path {shipped}" in cmds["sglang"]
