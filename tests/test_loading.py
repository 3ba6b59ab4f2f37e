"""Checkpoint loading: sharded / bf16 / round trip, and the documented errors for bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dflash.config import ConfigError
from dflash.errors import CheckpointError
from dflash.io import load_target, save_target
from dflash.io.loading import resolve, target_rows


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids), jnp.arange(ids.shape[1])[None]).logits)


def test_sharded_checkpoint_loads_like_single(hf_checkpoint, tmp_path):
    hf, single = hf_checkpoint("qwen3")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = np.arange(15)[None] % 101
    np.testing.assert_array_equal(_logits(load_target(sharded), ids), _logits(load_target(single), ids))


def test_bf16_checkpoint_loads_in_bf16_and_fp32(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("llama")
    hf16 = hf.to(torch.bfloat16)
    directory = tmp_path / "bf16"
    hf16.save_pretrained(directory)
    ids = np.arange(9)[None]
    m16 = load_target(directory, dtype=jnp.bfloat16)
    assert m16.embed_tokens[...].dtype == jnp.bfloat16
    m32 = load_target(directory, dtype=jnp.float32)
    with torch.no_grad():  # fp32 compute on bf16 weights == HF upcast to fp32
        ref = hf16.float()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(m32, ids), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_logits(m16, ids), ref, atol=0.1, rtol=0)  # bf16 activations


def test_save_target_round_trips_through_transformers(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    _, directory = hf_checkpoint("qwen2", tie_word_embeddings=True)
    ours = load_target(directory)
    out = save_target(ours, tmp_path / "resaved")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.arange(12)[None] * 7 % 101
    with torch.no_grad():
        ref = reloaded(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(ours, ids), ref, atol=1e-4, rtol=0)
    original = load_file(str(directory / "model.safetensors"))
    resaved = load_file(str(out / "model.safetensors"))
    assert set(original) == set(resaved)
    for key in original:
        np.testing.assert_array_equal(original[key], resaved[key])


@pytest.mark.parametrize("family,overrides", [("qwen3", {}), ("qwen2", {}),
                                              ("llama", {"tie_word_embeddings": True})])
def test_weight_table_is_the_only_mapping(hf_checkpoint, tmp_path, family, overrides):
    """Every tensor of a ``transformers`` checkpoint is read through the weight rows the layer kinds
    give (``target_rows``) and written back under the same name with the same values: loading and
    saving both go through the rows, and nothing else maps a name."""
    from flax import nnx

    _, directory = hf_checkpoint(family, **overrides)
    original = load_file(str(directory / "model.safetensors"))
    ours = load_target(directory)
    rows = target_rows(ours.cfg)
    assert len({r.hf for r in rows}) == len(rows) and len({r.ours for r in rows}) == len(rows)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert {r.hf for r in rows} == set(original)  # the rows read every tensor, and only those
    assert {r.ours for r in rows} == paths  # and fill every parameter
    resaved = load_file(str(save_target(ours, tmp_path / "resaved") / "model.safetensors"))
    assert set(resaved) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(resaved[key], value, err_msg=key)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_target(tmp_path)


def test_missing_weights_file_is_named(hf_checkpoint):
    _, directory = hf_checkpoint("qwen3")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_target(directory)


def test_missing_tensor_is_named(hf_checkpoint):
    _, directory = hf_checkpoint("qwen3")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_target(directory)


def test_mismatched_tensor_shape_is_named(hf_checkpoint):
    _, directory = hf_checkpoint("llama")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*\(95, 64\)"):
        load_target(directory)


def test_unknown_architecture_names_supported_ones(hf_checkpoint):
    _, directory = hf_checkpoint("qwen3")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gpt_neox.*qwen3, qwen2, llama"):
        load_target(directory)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("qwen3")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_target(sharded)


def test_uncached_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve("Qwen/Qwen3-8B-definitely-not-cached")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve("./no/such/dir")


def test_a_run_directory_that_is_not_there_or_has_no_export_is_named_not_sought_on_the_hub(tmp_path,
                                                                                           monkeypatch):
    """After ``dflash-train --quick`` (runs/tiny_code-quick), ``--drafter runs/tiny_code`` names the
    missing directory and what its parent holds; a run without an export says how to make one."""
    from dflash.drafters import load_drafter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny_code-quick").mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        load_drafter("runs/tiny_code")
    assert str(err.value) == f"{tmp_path / 'runs' / 'tiny_code'} does not exist (runs/ holds tiny_code-quick)"
    (tmp_path / "runs" / "tiny_code-quick" / "config.yaml").write_text("method: dflash\n")
    with pytest.raises(CheckpointError, match="run directory without a final export.*dflash-export --run"):
        load_drafter("runs/tiny_code-quick")
