"""DFlash drafters for Gemma 4 targets: the loss head soft-caps as the target does, the feature taps
are transformers' hidden states, and a drafter trained with ``dflash-train --set target.name=DIR``
on a tiny random ``Gemma4ForCausalLM`` (tests/test_gemma4.py's, soft-cap on) is lossless and its
export records the embedding scale and the cap, re-imports, and refuses a target that differs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_gemma4 import TEXT, save_tiny_gemma4
from test_torch_reference import RefDFlash

from dflash.config import ModelConfig
from dflash.configio import load_yaml
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import blocks as blk
from dflash.drafters import loss_head, resolve_method
from dflash.drafters import objective as obj
from dflash.drafters.dflash import DFlashDraft
from dflash.errors import CheckpointError
from dflash.export.from_run import export_checkpoint
from dflash.io import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.models import build
from dflash.training.config import ExperimentConfig
from dflash.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
GAMMA = 2.0


def test_loss_head_logits_and_loss_are_the_soft_capped_targets():
    """On a tiny Gemma 4 target with a soft-cap of 3: the chunked head's logits equal
    ``target.unembed``'s, and the block drafters' loss (``blocks.score``: CE + KL, and CE on the
    target's argmax) equals ``score_blocks`` on ``unembed`` logits, value and gradient; without
    the cap it would not."""
    target = build(ModelConfig.from_hf({**TEXT, "model_type": "gemma4_text"}), seed=1)
    cap = target.cfg.final_logit_softcapping
    assert cap == 3.0
    rng = np.random.default_rng(0)
    b, a, k, s, d = 2, 3, 4, 11, target.cfg.hidden_size
    h = jnp.asarray(rng.normal(size=(b, a, k, d)) * 60.0, jnp.float32)  # logits well past the cap
    t_final = jnp.asarray(rng.normal(size=(b, s, d)) * 60.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, target.cfg.vocab_size, (b, a, k)), jnp.int32)
    mask = jnp.asarray(rng.random((b, a, k)) < 0.8)
    idx = jnp.asarray(rng.integers(1, s, (b, a, k)), jnp.int32)
    w = target.head_weight()
    blocks = blk.AnchorBlocks(None, None, None, labels, mask, idx, jnp.ones((b, a), bool))
    batch = {"loss_mask": jnp.ones((b, s), bool), "segment_ids": jnp.ones((b, s), jnp.int32)}
    want = target.unembed(h.reshape(b, a * k, d))
    assert float(jnp.abs(want).max()) < cap < float(jnp.abs(h.reshape(b, a * k, d) @ w).max())
    # fp32: the head as [D, V] vs unembed's [V, D] table sums in another order (pre-cap logits ~30)
    np.testing.assert_allclose(loss_head._logits(h.reshape(b, a * k, d), w, cap), want, rtol=0, atol=1e-5)
    # CE on the target's argmax plus the KL to its distribution: both sides' logits capped
    kw = dict(gamma=GAMMA, ce_weight=1.0, kl_weight=0.5, target_labels=True)

    def dense(h):
        return obj.score_blocks(target.unembed(h), labels, mask, idx, target.unembed(t_final), **kw)

    def chunked(h):  # as every block drafter's loss calls the head
        return blk.score(h, target, blocks, t_final, batch, chunk=5, **kw)

    (g_loss, g_m), g_grad = jax.value_and_grad(chunked, has_aux=True)(h)
    (w_loss, w_m), w_grad = jax.value_and_grad(dense, has_aux=True)(h)
    np.testing.assert_allclose(float(g_loss), float(w_loss), rtol=1e-5)
    for name in w_m:  # ce, kl, tau_sim, accuracies (score adds token and block counts)
        np.testing.assert_allclose(np.asarray(g_m[name]), np.asarray(w_m[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(g_grad), np.asarray(w_grad), rtol=1e-4, atol=1e-7)
    uncapped, _ = loss_head.score_hidden(h, w, labels, mask, idx, t_final, chunk=5, **kw)
    assert abs(float(uncapped) - float(w_loss)) > 0.1


def test_dflash_train_on_a_gemma4_target_is_lossless_and_its_export_reimports(tmp_path):
    """``dflash-train --set target.name=DIR ...`` (``run_training``) two steps on the tiny Gemma 4
    (KV-shared layers, per-layer inputs, soft-cap 3; the tokenizer's mask token); feature taps at a
    sliding, a full and a KV-shared layer are transformers' ``hidden_states[i + 1]``; the export's draft
    logits in the PyTorch reference == ours; speculative greedy with it == transformers' greedy token
    for token; the export says qwen3 /
    DFlashDraftModel with the target's ``sqrt(D)`` embedding scale and cap, and ships the scaled table
    for vLLM; a changed cap is refused."""
    target_dir, run = tmp_path / "gemma4", tmp_path / "run"
    hf = save_tiny_gemma4(target_dir, enable_moe_block=False)  # experts: test_gemma4 (compile time)
    taps = (1, 3, 4)
    target = load_target(target_dir)
    ids = np.random.default_rng(4).integers(0, 4096, size=(1, 9))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    ours = target(jnp.asarray(ids), jnp.arange(9)[None], hidden_layers=taps, compute_logits=False).hidden
    for i, tap in enumerate(taps):
        np.testing.assert_allclose(np.asarray(ours[i]), ref[tap + 1].numpy(), atol=1e-4, rtol=0)

    # dflash-train --config configs/tiny_code.yaml --set ... (less its final decoding eval)
    sets = [f"target.name={target_dir}", f"run_dir={run}", "data.max_examples=16", "data.seq_len=64",
            "train.batch_size=2", "train.num_anchors=4", "train.steps=2", "train.eval_every=100",
            "train.save_every=2", "train.log_every=1", "drafter.block_size=4",
            f"drafter.target_layer_ids=[{', '.join(map(str, taps))}]", "regen.num_sequences=0",
            "eval.heldout_rows=2"]
    result = run_training(load_yaml(ExperimentConfig, ROOT / "configs/tiny_code.yaml", sets), progress=False,
                          final_eval=False)
    assert result["steps"] == 2
    export = run / "export"
    hf_cfg = json.loads((export / "config.json").read_text())
    assert hf_cfg["architectures"] == ["DFlashDraftModel"] and hf_cfg["model_type"] == "qwen3"
    assert hf_cfg["dflash_config"] == {"mask_token_id": load_tokenizer(str(target_dir)).mask_token_id,
                                       "target_layer_ids": list(taps), "input_embedding_scale": 32 ** 0.5,
                                       "final_logit_softcapping": 3.0}
    method, drafter = resolve_method(str(export), target)
    assert isinstance(method, DFlashDraft) and method.block_size == 4
    # The PyTorch reference (tests/test_torch_reference.py) reads the export as z-lab's code does:
    # raw embedding rows times input_embedding_scale, the head then final_logit_softcapping.
    tokens = np.random.default_rng(6).integers(0, 4000, size=13).tolist()
    ref_drafter = RefDFlash(export)
    with torch.no_grad():
        hidden = hf(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        want = ref_drafter.draft_logits(hf, hidden, tokens[-1]).numpy()
    # ... and it ships the block rows' table, what vLLM's DFlash reader embeds with (it ignores the
    # scale): exactly the rows our engine feeds, the trainer's export and dflash-export --run's alike
    rows = np.asarray(target.embed(jnp.arange(hf_cfg["vocab_size"])[None]))[0]
    np.testing.assert_array_equal(ref_drafter.shipped_embedding.numpy(), rows)
    hf_rows = hf.get_input_embeddings()(torch.arange(4096)).detach().numpy()  # transformers' scaled rows
    np.testing.assert_allclose(rows, hf_rows, rtol=1e-6, atol=0)
    again = Path(export_checkpoint(tmp_path / "again", run_dir=run)["out"]) / "model.safetensors"
    np.testing.assert_array_equal(load_file(str(again))["embed_tokens.weight"], rows)
    feats = np.concatenate([hidden[i + 1].numpy() for i in taps], axis=-1)
    cache = drafter.extend_context(drafter.init_context_cache(1, 20), jnp.asarray(feats),
                                   jnp.arange(12)[None], jnp.array([12]))
    got = np.asarray(drafter.draft_logits(target, cache, jnp.array([tokens[-1]])))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(np.arctanh(want / 3.0) * 3.0 - want).max() > 1e-3  # the cap moved some logit
    rng = np.random.default_rng(5)
    prompts = [(rng.integers(5, 4000, n).tolist() * 3)[:3 * n - 1] for n in (4, 7)]
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=14, eos_ids=())
    for prompt, got in zip(prompts, out.tokens, strict=True):  # AR greedy: transformers (== ours)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                              pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    hf_cfg["dflash_config"]["final_logit_softcapping"] = 5.0
    (export / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(CheckpointError, match="final_logit_softcapping=5.0"):
        resolve_method(str(export), target)


# z-lab's Gemma 4 DFlash drafters as public copies of their config.json state them.
_SWA = ["sliding_attention"] * 4 + ["full_attention"]
GEMMA4_PRESETS = {
    "gemma4_31b_dflash.yaml": ("gemma4_31b", dict(
        num_hidden_layers=5, hidden_size=5376, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        intermediate_size=10752, num_target_layers=60, layer_types=_SWA, sliding_window=2048, rope_theta=1e6,
        dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 12, 23, 35, 46, 57],
                       "input_embedding_scale": 5376 ** 0.5, "final_logit_softcapping": 30.0})),
    "gemma4_26b_a4b_dflash.yaml": ("gemma4_26b_a4b", dict(
        num_hidden_layers=5, hidden_size=2816, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=5632, num_target_layers=30, layer_types=_SWA, sliding_window=2048, rope_theta=1e6,
        dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 6, 11, 17, 22, 27],
                       "input_embedding_scale": 2816 ** 0.5, "final_logit_softcapping": 30.0})),
}


@pytest.mark.parametrize("name", sorted(GEMMA4_PRESETS))
def test_gemma4_presets_build_the_published_drafters(name):
    """The presets' drafters export as z-lab's (model_type qwen3, shapes, taps, window, mask token 4,
    the target's embedding scale and cap) with the Qwen3-8B recipe; they build abstractly."""
    from flax import nnx

    from dflash.config import PRESETS, preset_for_hub_id
    from dflash.drafters.dflash import DFLASH
    from dflash.drafters.dflash.hf import drafter_hf_config

    cfg = load_yaml(ExperimentConfig, ROOT / "configs" / name)
    preset, published = GEMMA4_PRESETS[name]
    model_cfg = preset_for_hub_id(cfg.target.name)
    assert model_cfg == PRESETS[preset] and model_cfg.final_logit_softcapping == 30.0
    recipe = (cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.warmup_ratio, cfg.train.epochs)
    assert recipe == (6e-4, 1.0, 0.04, 6)
    assert (cfg.data.seq_len, cfg.train.num_anchors, cfg.drafter.block_size) == (3072, 512, 16)
    cfg.check_context(model_cfg.max_position_embeddings)
    dcfg = DFLASH.config(cfg.drafter, model_cfg, mask_token_id=cfg.drafter.mask_token_id,
                         block_size=cfg.drafter.block_size)
    hf = drafter_hf_config(dcfg, "google/x", model_cfg)
    assert {key: hf[key] for key in published} == published
    assert (hf["architectures"], hf["model_type"]) == (["DFlashDraftModel"], "qwen3")
    shapes = nnx.eval_shape(lambda: DFLASH.construct(dcfg))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(shapes)))
