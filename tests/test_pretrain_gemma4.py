"""``dflash-pretrain-target --architecture gemma4``: a few steps on a tiny Gemma-4-architecture
target (sliding window shorter than the sequence, KV-shared layers, soft-capped logits); the saved
directory is one ``transformers`` opens as ``Gemma4ForCausalLM`` with our logits, and our loader
reads back the config the tool built. The default architecture still builds the shipped tiny-code."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dflash.cli import pretrain_target
from dflash.config import ModelConfig
from dflash.errors import ConfigError
from dflash.io import load_target
from dflash.training import pretrain, tiny_corpus
from dflash.training.pretrain import PretrainConfig

TINY = {"vocab-size": 512, "hidden-size": 32, "intermediate-size": 48, "num-layers": 4, "num-heads": 2,
        "num-kv-heads": 1, "head-dim": 16, "seq-len": 24, "sliding-window": 8, "num-kv-shared-layers": 2,
        "batch-size": 2, "steps": 4, "warmup": 1, "eval-every": 2, "eval-windows": 2}


def _fields(flags: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in flags.items()}


def test_gemma4_pretraining_resumes_exactly_and_saves_a_directory_transformers_and_we_read_alike(tmp_path,
                                                                                         monkeypatch):
    whole = tiny_corpus.stdlib_files
    monkeypatch.setattr(pretrain.corpus, "stdlib_files", lambda split: whole(split, limit=6))  # small corpus
    out, straight = tmp_path / "gemma4", tmp_path / "straight"
    flags = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    argv = ["--architecture", "gemma4", *flags]
    assert pretrain_target.main(["--out", str(straight), *argv]) == 0
    # Killed right after the step-2 checkpoint, then run again: it continues from step 2 and ends with
    # the uninterrupted run's bits (weights, held-out losses); another config is refused, not mixed in.
    save = pretrain.Checkpoints.save

    def killed_after_step_2(self, step, state, meta):
        save(self, step, state, meta)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain.Checkpoints, "save", killed_after_step_2)
    assert pretrain_target.main(["--out", str(out), *argv]) != 0
    assert json.loads((out / "training_info.json").read_text())["step"] == 2
    monkeypatch.setattr(pretrain.Checkpoints, "save", save)
    with pytest.raises(ConfigError, match=r"another config \(lr: saved 0.003, now 0.001\)"):
        pretrain.pretrain(PretrainConfig(architecture="gemma4", lr=1e-3, **_fields(TINY)), out)
    assert pretrain_target.main(["--out", str(out), *argv]) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info == json.loads((straight / "training_info.json").read_text())
    assert info["step"] == 4 and np.isfinite(info["heldout_loss"])
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "gemma4_text" and hf_cfg["architectures"] == ["Gemma4ForCausalLM"]
    ours = load_target(out)
    eos = ours.cfg.bos_token_id
    built = PretrainConfig(architecture="gemma4", **_fields(TINY))
    assert ours.cfg == ModelConfig.from_hf(built.gemma4_hf_config(eos))
    specs = ours.cfg.layers
    assert [s.mixer_option("window", 0) for s in specs] == [8, 0, 8, 0]
    assert [s.mixer_option("kv_reuse", "") for s in specs] == ["", "", "sliding_attention", "full_attention"]
    assert ours.cfg.final_logit_softcapping == 30.0 and ours.cfg.tie_word_embeddings
    hf = transformers.Gemma4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 20))  # longer than the window
    with torch.no_grad():  # (transformers 5.23 slices per-layer inputs it does not have before KV-shared
        # layers unless asked for hidden states)
        ref = hf(torch.from_numpy(ids), output_hidden_states=True).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.arange(20)[None]).logits)
    assert np.abs(ref).std() > 1e-3  # trained weights, not a flat output
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_the_default_architectures_build_the_shipped_tiny_targets():
    shipped = load_target("tiny-code").cfg
    assert PretrainConfig().model_config(shipped.bos_token_id) == shipped
    gemma = load_target("tiny-gemma4").cfg  # made by issue 34's recipe (docs/benchmarks.md)
    assert PretrainConfig(architecture="gemma4").model_config(gemma.bos_token_id) == gemma


@pytest.mark.parametrize("fields, message", [
    ({"architecture": "llama"}, "architecture must be one of qwen3, gemma4, got 'llama'"),
    ({"architecture": "gemma4", "num_layers": 4, "num_kv_shared_layers": 3},
     "num_kv_shared_layers must be <= num_layers - 2 = 2"),
    ({"sliding_window": 0}, "sliding_window must be an integer >= 1, got 0"),
])
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        PretrainConfig(**fields)
