"""Hybrid targets (Qwen3-Next, Qwen3.5, Qwen3.5-MoE): their configs, gated attention with partial
RoPE, zero-centred norms and shared experts against ``transformers`` (logits, greedy tokens, our
save reopened there), the published presets' sizes, and the DFlash drafter such a target gets."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from devices import on_cpu_devices
from safetensors.numpy import load_file, save_file

from dflash.config import PRESETS, ModelConfig, preset_for_hub_id
from dflash.decoding import generate
from dflash.drafters.dflash.model import DFlashConfig
from dflash.errors import ConfigError
from dflash.io import load_target, save_target
from dflash.io.loading import SHIPPED
from dflash.models import abstract, count_params

TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=101, max_position_embeddings=256, tie_word_embeddings=False, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
            linear_conv_kernel_dim=4,
            # RoPE on half of each head (the published models: a quarter of 256 channels)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=20)
VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=64, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
LINEAR, FULL = "linear_attention", "full_attention"
# Each case: the transformers config and model classes and the text config (Qwen3.5's nest it as
# text_config of a multimodal model).
CASES = {
    # Qwen3-Next: layer 1 dense (mlp_only_layers), the others experts + shared expert, top-k unnormalised.
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   {**TEXT, **MOE, "intermediate_size": 96, "mlp_only_layers": [1], "norm_topk_prob": False,
                    "layer_types": [LINEAR, LINEAR, FULL, LINEAR]}),
    # layer_types left out: transformers' default, every 4th layer full
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", {**TEXT, "intermediate_size": 96}),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                    {**TEXT, **MOE, "layer_types": [FULL, LINEAR, LINEAR, FULL]}),
}


def _hf_model(case: str, **overrides) -> torch.nn.Module:
    """A tiny random transformers model of ``case`` (fp32, eval), its 1-D parameters (norms, GDN
    A_log / dt_bias) randomised and its routers spread so top-k routing is decisive."""
    cfg_name, model_name, text = CASES[case]
    text = {**text, **overrides}
    cls = getattr(transformers, cfg_name)
    cfg = cls(**text) if case == "qwen3_next" else cls(text_config=text, vision_config=VISION)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(40.0)
    return model


def _logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_and_our_save_reopens_there(tmp_path, case):
    """transformers' checkpoint (``save_pretrained``: the multimodal wrappers' ``text_config`` and
    ``model.language_model.*``) loads to its logits; our save (a text-only model) reopens in
    transformers with the same logits, and its config.json reads back to the same config."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    if case != "qwen3_next":  # the published files also hold the target's own MTP head: not read
        file = tmp_path / "hf" / "model.safetensors"
        save_file({**load_file(file), "mtp.fc.weight": np.ones((4, 8), np.float32)}, file)
    ours = load_target(tmp_path / "hf")
    ids = np.random.default_rng(1).integers(0, 101, size=(2, 19))
    ref = _logits(hf, ids)
    got = ours(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(19), ids.shape)).logits
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    text = {n: p for n, p in hf.named_parameters() if ".visual." not in n}
    assert count_params(ours) == ours.cfg.num_params() == sum(p.numel() for p in text.values())
    save_target(ours, tmp_path / "ours")
    assert ModelConfig.from_hf(json.loads((tmp_path / "ours" / "config.json").read_text())) == ours.cfg
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(_logits(reopened, ids), ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_in_process_and_through_dflash_generate(tmp_path, capsys):
    """32 greedy tokens as transformers generates them: every family in process, and
    ``dflash-generate --target DIR`` on a Qwen3.5 multimodal checkpoint (the shipped tokenizer beside it)."""
    from dflash.cli.generate import main

    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 101, size=n).tolist() for n in (3, 11)]
    for case in ("qwen3_next", "qwen3_5_moe"):
        hf = _hf_model(case)
        hf.save_pretrained(tmp_path / case)
        result = generate(load_target(tmp_path / case), prompts, max_new_tokens=32, eos_ids=())
        for prompt, got in zip(prompts, result.tokens, strict=True):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False, pad_token_id=0)
            assert got == ref[0, len(prompt):].tolist(), case
    hf = _hf_model("qwen3_5", vocab_size=4096)  # the tokenizer's
    hf.save_pretrained(tmp_path / "qwen3_5")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, tmp_path / "qwen3_5" / name)
    assert main(["--target", str(tmp_path / "qwen3_5"), "--prompt", "def fib(n):\n    a, b = 0, 1\n",
                 "--max-new-tokens", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = out["prompt_tokens"]
    assert len(out["tokens"]) == 32
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)
    assert out["tokens"] == ref[0, len(prompt):].tolist()


BASE = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"])
def test_class_defaults_fill_a_sparse_config_as_transformers_does(model_type):
    """Without layer_types, linear_*, partial_rotary_factor or the MoE sizes, a config gets the
    classes' defaults: every 4th layer full (as transformers computes it), GDN 16 x 128 keys and
    32 x 128 values, RoPE on 64 of 256 channels; a text-only model_type names its family."""
    hf = {k: v for k, v in BASE.items() if k != "head_dim"}
    cfg = ModelConfig.from_hf({**hf, "model_type": model_type})
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf)
    assert [spec.mixer for spec in cfg.layers] == [
        {"linear_attention": "gdn", "full_attention": "attention"}[t] for t in hf_cfg.layer_types]
    assert cfg.head_dim == 256 and cfg.zero_centred_norm
    assert cfg.layers[3].mixer_option("rotary_dim") == 64 and cfg.layers[3].mixer_option("output_gate")
    layout = "qwen3_next" if model_type == "qwen3_next" else "qwen3_5"
    assert dict(cfg.layers[0].mixer_options) == {"key_heads": 16, "value_heads": 32, "key_dim": 128,
                                                 "value_dim": 128, "conv_kernel": 4, "layout": layout}
    mlp = {"qwen3_next": ("moe", 512, 10), "qwen3_5_text": ("dense", None, None),
           "qwen3_5_moe_text": ("moe", 256, 8)}[model_type]
    spec = cfg.layers[0]
    assert (spec.mlp, spec.mlp_option("experts"), spec.mlp_option("top_k")) == mlp
    if spec.mlp == "moe":
        assert spec.mlp_option("shared_expert_size") == 512 and spec.mlp_option("norm_topk_prob")
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "qwen3_next", "layer_types": ["linear_attention", "sliding_attention"] * 3},
     "layer_types must list 6 of 'linear_attention' / 'full_attention'"),
    ({"model_type": "qwen3_5_text", "partial_rotary_factor": 0.01}, "partial_rotary_factor gives 0 rotary"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
      "shared_expert_intermediate_size": 8}, "shared_expert_intermediate_size=8 asks for shared experts"),
    ({"model_type": "qwen3_5_text", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_what_stays_unsupported_is_refused_naming_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**BASE, **bad})


def test_zero_centred_norms_are_a_config_field_written_back():
    """A family's norms as it has them; another choice survives to_hf / from_hf."""
    cfg = ModelConfig.from_hf({**BASE, "model_type": "qwen3_5_text"})
    plain = ModelConfig(**{**cfg.__dict__, "zero_centred_norm": False})
    assert plain.to_hf()["dflash_zero_centred_norm"] is False
    assert ModelConfig.from_hf(plain.to_hf()) == plain and ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert not ModelConfig.from_hf({**BASE, "model_type": "qwen3"}).zero_centred_norm


def test_the_dflash_drafter_of_a_hybrid_target_is_plain_qwen3():
    """Attention + dense layers, ordinary RMSNorm, RoPE over the whole head; its target layers may
    be Gated DeltaNet layers."""
    from dflash.drafters.dflash.hf import drafter_hf_config

    target = ModelConfig.from_hf({**BASE, "model_type": "qwen3_5_moe_text"})
    drafter = DFlashConfig.for_target(target, mask_token_id=3, num_layers=2, target_layer_ids=(0, 1, 3))
    assert [target.layers[i].mixer for i in drafter.target_layer_ids] == ["gdn", "gdn", "attention"]
    layers = drafter.layers
    assert layers.model_type == "qwen3" and not layers.zero_centred_norm
    # Exported as the published hybrid drafters are: a "qwen3" model (AutoConfig would read the
    # target's "qwen3_5_moe" as the multimodal wrapper).
    assert drafter.model_type == drafter_hf_config(drafter)["model_type"] == "qwen3"
    assert all(spec.mixer == "attention" and spec.mlp == "dense" and spec.mixer_option("rotary_dim", 0) == 0
               and not spec.mixer_option("output_gate", False) for spec in layers.layers)
    assert (layers.hidden_size, layers.head_dim, layers.rope) == (target.hidden_size, target.head_dim,
                                                                  target.rope)


# The model cards' total parameter counts, in billions (rounded there; Qwen3.5 / 3.6's include a
# vision tower of about 0.4B and the MTP layer, which the text model has not).
PUBLISHED = {"Qwen/Qwen3.5-9B": 9, "Qwen/Qwen3.6-27B": 27, "Qwen/Qwen3.5-35B-A3B": 35,
             "Qwen/Qwen3-Next-80B-A3B-Instruct": 80}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(hub_id):
    cfg = preset_for_hub_id(hub_id)
    assert abs(cfg.num_params() / 1e9 - PUBLISHED[hub_id]) < 0.02 * PUBLISHED[hub_id]
    four = ModelConfig(**{**cfg.__dict__, "num_layers": 4, "layers": cfg.layers[:4]})  # 3 GDN, 1 attention
    assert count_params(abstract(four)) == four.num_params()  # the kinds' own parameters, nothing allocated
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg in PRESETS.values()


def test_qwen3_next_layers_are_the_published_ones():
    """One Qwen3-Next-80B layer of GDN + experts has the 1,648,531,648 parameters transformers
    counts for it (a one-layer copy of the published config), and the model card's 79B outside the
    embeddings."""
    cfg = preset_for_hub_id("Qwen/Qwen3-Next-80B-A3B-Instruct")
    one = ModelConfig(**{**cfg.__dict__, "num_layers": 1, "layers": cfg.layers[:1], "vocab_size": 1})
    assert one.num_params() - 2 * cfg.hidden_size - cfg.hidden_size == 1_648_531_648
    assert round((cfg.num_params() - 2 * cfg.vocab_size * cfg.hidden_size) / 1e9) == 79


@on_cpu_devices(4)
def test_a_dflash_drafter_trained_on_a_hybrid_target_decodes_losslessly_and_on_a_mesh():
    """``dflash-train --set target.name=DIR`` on a tiny Qwen3.5-family target (Gated DeltaNet layers
    0, 1, 3, gated attention layer 2; training sharded over the 4 devices) exports a drafter whose
    greedy speculative decoding equals AR token for token: every verify step rolls each row's
    recurrent and convolution states back to its own accepted prefix, rows finish at different
    steps (compaction). On data=2 x tensor=2 (GDN heads split) the same tokens and acceptance.
    A tree is refused in one line, before anything compiles."""
    import tempfile
    from pathlib import Path

    from conftest import make_tiny_target

    from dflash import sharding as sh
    from dflash.cli.train import main as train
    from dflash.decoding.methods import NgramDraft
    from dflash.decoding.speculative import speculative_generate
    from dflash.drafters import resolve_method, tree_method_for

    with tempfile.TemporaryDirectory() as tmp:
        target_dir = make_tiny_target(Path(tmp) / "target", hybrid=True)
        run = Path(tmp) / "run"
        sets = ["data.max_examples=40", "data.seq_len=64", "train.batch_size=4", "train.num_anchors=8",
                "train.steps=2", "train.save_every=2", "train.eval_every=2", "drafter.block_size=4",
                "eval.num_prompts=1", "eval.max_new_tokens=8", "eval.heldout_rows=4", "regen.num_sequences=0"]
        assert train(["--set", f"target.name={target_dir}", "--run-dir", str(run), "--no-progress",
                      *(x for s in sets for x in ("--set", s))]) == 0
        target = load_target(target_dir)
        assert [s.mixer for s in target.cfg.layers] == ["gdn", "gdn", "attention", "gdn"]
        method, drafter = resolve_method(run / "export", target)
        rng = np.random.default_rng(3)
        prompts = [(rng.integers(5, 4000, n).tolist() * 3)[:3 * n - 1] for n in (4, 9, 6, 13, 3, 5, 2, 7, 4)]
        budgets = [12, 2, 16, 9, 3, 14, 4, 11, 6]
        ref = generate(target, prompts, max_new_tokens=budgets, eos_ids=())
        out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=budgets,
                                   eos_ids=())
        assert out.tokens == ref.tokens and len(out.device_batches) > 1  # rows finished, the batch compacted
        # Prompt lookup on repetitive prompts: steps that accept drafts beside steps that accept none.
        lookup = speculative_generate(target, prompts, method=NgramDraft(block_size=4),
                                      max_new_tokens=budgets, eos_ids=())
        accepted = {a for row in lookup.acceptance_lengths for a in row}
        assert lookup.tokens == ref.tokens and min(accepted) == 1 and max(accepted) > 1, accepted
        with pytest.raises(ConfigError, match="layer 0 is gdn"):
            speculative_generate(target, prompts, method=tree_method_for(drafter, 2), drafter=drafter,
                                 eos_ids=())
        mesh = sh.make_mesh(sh.MeshConfig(2, 1, 2))
        on_mesh = load_target(target_dir, mesh=mesh)
        method, drafter = resolve_method(run / "export", on_mesh, mesh=mesh)
        got = speculative_generate(on_mesh, prompts, method=method, drafter=drafter, max_new_tokens=budgets,
                                   eos_ids=(), mesh=mesh)
        assert got.tokens == ref.tokens and got.acceptance_lengths == out.acceptance_lengths
