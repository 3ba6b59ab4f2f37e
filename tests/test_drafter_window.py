"""Sliding-window DFlash drafter layers (docs/design.md §5): the engine's window equals the training
path's (which tests/test_objective.py checks against a dense loop-built mask), config.json carries
``layer_types`` / ``sliding_window`` as the reference trainer writes and vLLM reads them, and a
drafter with sliding layers keeps speculative decoding lossless."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.config import ModelConfig
from dflash.decoding import generate
from dflash.decoding.speculative import speculative_generate
from dflash.drafters.dflash import DFLASH, DFlashConfig, DFlashDraft, build_drafter
from dflash.drafters.dflash.hf import config_from_hf, drafter_hf_config, load_drafter, save_drafter
from dflash.errors import CheckpointError, ConfigError
from dflash.io.loading import load_target
from dflash.models import build

SLIDE = ("sliding_attention", "full_attention", "sliding_attention")


def _drafter_cfg(target: ModelConfig, **kw) -> DFlashConfig:
    kw = {"num_layers": 3, "layer_types": SLIDE, **kw}
    return DFlashConfig.for_target(target, mask_token_id=target.vocab_size - 1, block_size=4,
                                   target_layer_ids=(1, 2), sliding_window=3, **kw)


def test_the_engine_drafts_what_the_training_path_drafts_with_sliding_layers():
    """Drafting after a context of p tokens (the engine: context cache, window over its slots) equals
    the training path's block at anchor p, for contexts shorter and longer than the window."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    target = build(cfg, seed=3)
    drafter = build_drafter(_drafter_cfg(cfg, num_layers=2, layer_types=SLIDE[:2], num_heads=2, head_dim=16,
                                         intermediate_size=40), seed=4)
    seq = jnp.asarray(np.random.default_rng(5).integers(1, 63, (1, 13)), jnp.int32)
    anchors = jnp.asarray([2, 7, 12])
    want = jax.jit(lambda: DFLASH.anchor_logits(drafter, target, seq, anchors, 4))()  # [A, 3, V]

    @jax.jit
    def draft(p):  # all 13 features written, the first p kept: what a verify step commits
        hidden = target(seq, jnp.arange(13)[None], hidden_layers=(1, 2), compute_logits=False).hidden
        feats = DFlashDraft._features(hidden)  # [1, 13, 2*D]
        cache = drafter.init_context_cache(1, 16)
        cache = drafter.extend_context(cache, feats, jnp.arange(13)[None], p[None])
        return drafter.draft_logits(target, cache, seq[:, p], 4)[0]

    for a, p in enumerate(anchors.tolist()):
        np.testing.assert_allclose(np.asarray(draft(jnp.int32(p))), np.asarray(want[a]), atol=2e-5)


def test_export_import_keeps_the_layer_types_and_drafts_alike_and_stays_lossless(tiny_target, tmp_path):
    target = load_target(tiny_target)
    drafter = build_drafter(_drafter_cfg(target.cfg), seed=1)
    out = save_drafter(drafter, tmp_path / "drafter", target_cfg=target.cfg)
    hf = json.loads((out / "config.json").read_text())
    assert (hf["layer_types"], hf["sliding_window"], hf["use_sliding_window"]) == (list(SLIDE), 3, True)
    loaded = load_drafter(out, target.cfg)
    assert loaded.cfg == drafter.cfg and loaded.cfg.windows == (3, 0, 3)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 4000, n).tolist() for n in (9, 4)]  # longer and shorter than the window
    ref = generate(target, prompts, max_new_tokens=12, eos_ids=())
    runs = [speculative_generate(target, prompts, method=DFlashDraft.of(d), drafter=d, max_new_tokens=12,
                                 eos_ids=()) for d in (drafter, loaded)]
    assert runs[0].tokens == runs[1].tokens == ref.tokens  # greedy == AR
    assert runs[0].acceptance_lengths == runs[1].acceptance_lengths  # identical drafts


def _published(**changes) -> dict:
    """A DFlash config.json laid out as the reference trainer's Qwen3.6-27B drafter (tiny sizes)."""
    hf = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": 16,
          "dflash_config": {"mask_token_id": 60, "target_layer_ids": [1, 3]}, "num_target_layers": 6,
          "num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64, "rope_theta": 1e7,
          "layer_types": list(SLIDE), "sliding_window": 2048, "use_sliding_window": True}
    for key, value in changes.items():
        if key.startswith("dflash_config."):
            hf["dflash_config"] = {**hf["dflash_config"], key.split(".", 1)[1]: value}
        else:
            hf[key] = value
    return hf


def test_config_json_is_read_as_vllm_reads_it():
    cfg = config_from_hf(_published())
    assert cfg.windows == (2048, 0, 2048) and cfg.layer_types == SLIDE
    assert drafter_hf_config(cfg)["layer_types"] == list(SLIDE)
    assert config_from_hf(_published(**{"dflash_config.swa_window_size": 512})).windows == (512, 0, 512)
    full = config_from_hf(_published(layer_types=None, sliding_window=None, use_sliding_window=False))
    assert full.windows == (0, 0, 0) and drafter_hf_config(full)["sliding_window"] is None
    assert config_from_hf(_published(is_causal=None)).windows == (2048, 0, 2048)


@pytest.mark.parametrize("changes, match", [
    ({"sliding_window": None}, "positive window is needed exactly when a layer is sliding_attention"),
    ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "layer_types must list 3"),
    ({"dflash_config.use_swa": True}, "dflash_config.use_swa=True"),
    ({"dflash_config.causal": False}, "dflash_config.causal=False"),
    ({"is_causal": True}, "is_causal=True"),
])
def test_config_json_attention_forms_we_do_not_run_are_refused(changes, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_hf(_published(**changes))


def test_drafter_section_keys_build_the_sliding_layers(run_config, tiny_target, tmp_path):
    cfg_keys = ("drafter.num_layers=3",
                'drafter.layer_types=["sliding_attention","full_attention","sliding_attention"]',
                "drafter.sliding_window=5", "drafter.num_heads=2", "drafter.intermediate_size=40",
                "drafter.rope_theta=1e6")
    cfg = run_config(tiny_target, tmp_path, *cfg_keys)
    target_cfg = load_target(tiny_target).cfg
    dcfg = DFLASH.config(cfg.drafter, target_cfg, mask_token_id=7, block_size=4)
    assert (dcfg.windows, dcfg.num_heads, dcfg.num_kv_heads, dcfg.intermediate_size) == ((5, 0, 5), 2, 2, 40)
    assert dcfg.rope_theta == 1e6 != target_cfg.rope.theta  # the drafter's own RoPE base
    assert dcfg.rope == dataclasses.replace(target_cfg.rope, theta=1e6)  # the rest of the target's rope
    assert config_from_hf(drafter_hf_config(dcfg, "x", target_cfg)).rope_theta == 1e6  # exported, read back
    keys = [k for k in cfg_keys if k != "drafter.rope_theta=1e6"]
    unset = DFLASH.config(run_config(tiny_target, tmp_path, *keys).drafter, target_cfg, mask_token_id=7,
                          block_size=4)
    assert unset.rope == target_cfg.rope  # 0: the target's
    theta = target_cfg.rope.theta
    assert DFLASH.init_from_diffs(unset, dcfg) == [f"drafter.rope_theta: config {theta!r}, drafter 1000000.0"]
    with pytest.raises(ConfigError, match="drafter.sliding_window=0 with layer_types"):
        DFLASH.config(run_config(tiny_target, tmp_path, "drafter.num_layers=1",
                                 'drafter.layer_types=["sliding_attention"]').drafter,
                      load_target(tiny_target).cfg, mask_token_id=7, block_size=4)
