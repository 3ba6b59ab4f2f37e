"""gpt-oss targets beyond the parity cases (tests/test_models_parity.py): YaRN RoPE against
transformers' own, MXFP4 experts dequantised as transformers dequantises them (whole, and slice by
slice onto a mesh), the config both ways, and the MoE designs we refuse."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import GPT_OSS, make_hf_model
from devices import on_cpu_devices
from flax import nnx

from dflash.config import ModelConfig, RopeConfig
from dflash.errors import ConfigError
from dflash.io.mxfp4 import Mxfp4View, dequantize
from dflash.models.layers import inv_freq

YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 4096, "rope_theta": 150000.0}  # gpt-oss's


@pytest.mark.parametrize("head_dim,params", [
    (64, YARN),  # the published gpt-oss RoPE
    (18, {**YARN, "factor": 7.5, "truncate": True, "beta_fast": 8.0, "beta_slow": 0.5,
          "original_max_position_embeddings": 100}),
    (24, {**YARN, "factor": 4.0, "mscale": 0.7, "mscale_all_dim": 1.3}),
    (24, {**YARN, "attention_factor": 1.25, "rope_theta": 10000.0}),
])
def test_yarn_frequencies_and_attention_factor_are_transformers(head_dim, params):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.GptOssConfig(hidden_size=32, num_attention_heads=2, head_dim=head_dim,
                                   num_hidden_layers=1, rope_parameters=dict(params),
                                   max_position_embeddings=131072)
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    rope = RopeConfig.from_hf(hf.to_dict())
    assert rope.attention_scale == factor  # the same float64 formula
    # The same float32 arithmetic; numpy's and torch's float32 pow differ by an ulp, which 1 / x and
    # the blend can double: a few ulps (a formula error is orders of magnitude more).
    np.testing.assert_allclose(inv_freq(rope, head_dim), want.numpy(), rtol=2 ** -21, atol=0)
    assert RopeConfig.from_hf({"rope_parameters": {"rope_theta": rope.theta, **rope.scaling_to_hf()}}) == rope


def _packed(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 blocks ``[*shape, 16]`` and exponents ``[*shape]`` (scales 2**-9 .. 2**2)."""
    return (rng.integers(0, 256, (*shape, 16), dtype=np.uint8),
            rng.integers(118, 130, shape, dtype=np.uint8))


def test_mxfp4_dequantises_as_transformers_and_slices_read_their_part():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _packed(np.random.default_rng(0), (3, 7, 2))  # 3 experts, 7 rows, 64 columns
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()  # [3, 64, 7]: [E, in, out]
    view = Mxfp4View(blocks, scales)
    assert view.get_shape() == want.shape
    np.testing.assert_array_equal(view[(slice(None),) * 3], want)
    np.testing.assert_array_equal(np.swapaxes(dequantize(blocks, scales), -1, -2), want)
    # A slice across a 32-value group boundary reads only the groups it needs.
    at = (slice(1, 3), slice(21, 45), slice(2, 6))
    np.testing.assert_array_equal(view[at], want[at])


def _quantize_experts(directory: Path, hf) -> None:
    """Puts random MXFP4 experts into ``hf`` (dequantised, as transformers computes them) and writes
    its checkpoint with the experts as ``*_blocks`` / ``*_scales`` under an mxfp4 quantization_config."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng, packed = np.random.default_rng(1), {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):  # [E, in, out]
                e, i, o = p.shape
                blocks, scales = _packed(rng, (e, o, i // 32))
                p.copy_(convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                   dtype=torch.float32))
                packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
    hf.save_pretrained(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    for key in packed:
        tensors.pop(key.removesuffix("_blocks").removesuffix("_scales"), None)
    save_file({**tensors, **packed}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (directory / "config.json").write_text(json.dumps(cfg))


@on_cpu_devices(8)
def test_an_mxfp4_checkpoint_loads_whole_and_sharded_to_the_logits_of_transformers():
    """Experts dequantised on load equal transformers on the dequantised weights; read slice by slice
    onto a mesh (slices that cut 32-value groups and the interleaved gate/up) they are the same
    arrays; our save is a float gpt-oss checkpoint transformers opens, with the same logits."""
    import transformers

    from dflash import sharding as sh
    from dflash.io import load_target, save_target
    from dflash.models import count_params

    hf = make_hf_model("gpt_oss", **{**GPT_OSS, "intermediate_size": 32})  # MXFP4: widths of 32s
    ids = np.random.default_rng(2).integers(0, 101, (2, 13))
    pos = jnp.broadcast_to(jnp.arange(13), ids.shape)
    with tempfile.TemporaryDirectory() as tmp:
        _quantize_experts(Path(tmp) / "mxfp4", hf)
        with torch.no_grad():
            want = hf(torch.from_numpy(ids)).logits.numpy()
        ours = load_target(Path(tmp) / "mxfp4")
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), pos).logits), want, atol=1e-4, rtol=0)
        assert count_params(ours) == ours.cfg.num_params() == sum(p.numel() for p in hf.parameters())
        mesh = sh.make_mesh(sh.MeshConfig(1, 4, 2))  # D = 64 over 4, F = 32 over 2: 16-column shards
        sharded = load_target(Path(tmp) / "mxfp4", mesh=mesh, replicate_indivisible=True)
        for x, y in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(sharded)), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        save_target(ours, Path(tmp) / "ours")
        assert ModelConfig.from_hf(json.loads((Path(tmp) / "ours/config.json").read_text())) == ours.cfg
        back = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ours").eval()
        assert type(back).__name__ == "GptOssForCausalLM"
        with torch.no_grad():
            np.testing.assert_array_equal(back(torch.from_numpy(ids)).logits.numpy(), want)


BASE = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "deepseek_v3", "n_group": 8, "topk_group": 4}, "n_group=8 asks for group-limited"),
    ({"model_type": "kimi_k2", "scoring_func": "sigmoid"}, "scoring_func='sigmoid' asks for sigmoid"),
    ({"model_type": "deepseek_v3", "kv_lora_rank": 512}, "kv_lora_rank=512 asks for multi-head latent"),
    ({"model_type": "deepseek_v3"}, "'deepseek_v3': it uses group-limited .*'n_group'"),
    ({"model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2,
      "quantization_config": {"quant_method": "fp8"}}, "quant_method='fp8' is not supported"),
    ({"model_type": "gpt_oss", "num_experts_per_tok": 2}, "lacks 'num_local_experts'"),
])
def test_unsupported_moe_designs_are_refused_naming_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**BASE, **bad})


def test_gpt_oss_class_defaults_fill_a_sparse_config():
    """A config.json without attention_bias, layer_types, sliding_window or RoPE gets transformers'
    gpt-oss defaults (biases, every even layer slid over 128, the published YaRN)."""
    cfg = ModelConfig.from_hf({**BASE, "num_hidden_layers": 3, "model_type": "gpt_oss",
                               "num_local_experts": 4, "num_experts_per_tok": 2})
    assert [spec.mixer_option("window", 0) for spec in cfg.layers] == [128, 0, 128]
    assert cfg.layers[0].mixer_option("qkv_bias") and cfg.layers[0].mixer_option("sinks")
    assert cfg.rope == RopeConfig.from_hf({"rope_parameters": YARN})
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_a_dflash_drafter_of_a_gpt_oss_target_exports_its_yarn():
    """The drafter runs its target's RoPE: its exported config.json carries the YaRN fields (as
    transformers names them) and our loader reads them back."""
    from dflash.config import preset
    from dflash.drafters.dflash.hf import config_from_hf, drafter_hf_config
    from dflash.drafters.dflash.model import DFlashConfig

    target = preset("gpt_oss_20b")
    dcfg = DFlashConfig.for_target(target, mask_token_id=200000, num_layers=5, block_size=8)
    hf = drafter_hf_config(dcfg)
    assert hf["rope_scaling"] == {"rope_type": "yarn", **{k: v for k, v in YARN.items() if k != "rope_theta"}}
    assert config_from_hf(hf).layers.rope == dcfg.layers.rope == target.rope
