"""Model configs: HF config.json parsing, validation, full-size presets via eval_shape."""

from __future__ import annotations

import jax
import pytest

from dflash.config import PRESETS, ConfigError, ModelConfig, preset
from dflash.models import abstract, count_params

# Published parameter counts (HF model cards / safetensors metadata).
PUBLISHED = {"qwen3_4b": 4_022_468_096, "qwen3_8b": 8_190_735_360, "llama3_1_8b": 8_030_261_248,
             "qwen3_30b_a3b": 30_532_122_624,
             "gpt_oss_20b": 20_914_757_184, "gpt_oss_120b": 116_829_156_672}  # 20.91B / 116.83B


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_presets_build_abstractly_with_published_sizes(name):
    model = abstract(preset(name))
    leaves = jax.tree.leaves(model)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert count_params(model) == PUBLISHED[name] == preset(name).num_params()


def test_presets_round_trip_through_hf_config():
    for cfg in PRESETS.values():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_family_flags_from_hf_config():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    q3 = ModelConfig.from_hf({**base, "model_type": "qwen3"})
    assert dict(q3.layer(0).mixer_options) == {"qk_norm": True} and q3.uniform
    q2 = ModelConfig.from_hf({**base, "model_type": "qwen2"})
    assert dict(q2.layer(0).mixer_options) == {"qkv_bias": True}
    llama = ModelConfig.from_hf({**base, "model_type": "llama", "attention_bias": True, "mlp_bias": True})
    assert dict(llama.layer(0).mixer_options) == {"qkv_bias": True, "o_bias": True}
    assert dict(llama.layer(0).mlp_options) == {"bias": True}
    assert ModelConfig.from_hf(llama.to_hf()) == llama
    old_style = ModelConfig.from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                      "original_max_position_embeddings": 8192}})
    assert old_style.rope.rope_type == "llama3" and old_style.rope.theta == 5e5
    assert old_style.num_kv_heads == 2 and old_style.head_dim == 4


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "mistral"}, "mistral.*supported: qwen3, qwen2, llama"),
    ({"model_type": "qwen3", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "use_sliding_window": True}, "sliding windows are read for qwen3, qwen2"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 4, "layer_types": ["chunked"]},
     "layer_types must list 1 of"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"model_type": "qwen3", "num_key_value_heads": 3}, "multiple of num_kv_heads"),
])
def test_bad_hf_configs_are_clear_errors(bad, match):
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**base, **bad})


def test_sliding_window_layers_round_trip_through_hf_config():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2)
    cfg = ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 6,
                               "max_window_layers": 2})
    assert [spec.mixer_option("window", 0) for spec in cfg.layers] == [0, 0, 6]
    hf = cfg.to_hf()
    assert hf["layer_types"] == ["full_attention", "full_attention",
                                 "sliding_attention"] and "dflash_layers" not in hf
    assert ModelConfig.from_hf(hf) == cfg
    off = ModelConfig.from_hf({**base, "model_type": "qwen3", "use_sliding_window": False,
                               "sliding_window": 6})
    assert off.uniform  # transformers ignores the window unless use_sliding_window


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 16, "num_attention_heads": 2})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="qwen3_8b"):
        preset("qwen3_80b")


def test_qwen3_0_6b_preset_matches_its_model_card():
    """Qwen/Qwen3-0.6B's card: 28 layers, 16 query / 8 kv heads, 0.44B non-embedding parameters;
    its config.json: width 1024, MLP 3072, head_dim 128, tied embeddings, 151,936 tokens."""
    from dflash.config import preset_for_hub_id

    cfg = preset_for_hub_id("Qwen/Qwen3-0.6B")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (28, 16, 8, 128)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (1024, 3072, 151936)
    assert cfg.tie_word_embeddings and cfg.layer(0).mixer_option("qk_norm") and cfg.rope.theta == 1e6
    non_embedding = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    assert round(non_embedding / 1e9, 2) == 0.44
    assert count_params(abstract(cfg)) == cfg.num_params()
