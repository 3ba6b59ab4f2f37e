"""Orthrus dual-view drafting: model semantics, losslessness, training, export, presets."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from recount import tau_from_metrics
from safetensors.numpy import load_file, save_file
from test_speculative import CFG, MASK, sharpened_target
from test_verify import CFG as EXACT_CFG
from test_verify import VOCAB as EXACT_VOCAB
from test_verify import assert_first_three_follow, exact  # noqa: F401  (exact: a fixture)

from dflash.attention import attend
from dflash.config import ConfigError, ModelConfig
from dflash.configio import load_yaml
from dflash.decoding import generate
from dflash.decoding.autoregressive import prefill
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import find_export, load_drafter, resolve_method
from dflash.drafters import objective as obj
from dflash.drafters.dflash import DFLASH
from dflash.drafters.orthrus import ORTHRUS, OrthrusConfig, OrthrusDraft, OrthrusDrafter, ar_counterpart
from dflash.drafters.orthrus.hf import (
    read_orthrus_config,
    save_orthrus,
)
from dflash.errors import CheckpointError
from dflash.io import load_target, save_target
from dflash.io.loading import SHIPPED, load_params_into, target_rows
from dflash.models import build, init_cache
from dflash.models.transformer import abstract, rope_cos_sin
from dflash.training.config import ExperimentConfig
from dflash.training.optim import make_optimizer
from dflash.training.step import make_step_fns
from dflash.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def target():
    return sharpened_target()


def _perturbed(drafter: OrthrusDrafter, scale: float = 0.05, seed: int = 0) -> OrthrusDrafter:
    graphdef, state = nnx.split(drafter)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def _prompts(batch: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60, size=int(n)).tolist() for n in rng.integers(1, 30, size=batch)]


# ----------------------------------------------------------------------------- the model
def test_config_is_validated():
    with pytest.raises(ConfigError, match="block_size must be >= 2"):
        OrthrusConfig.for_target(CFG, mask_token_id=MASK, block_size=1)
    with pytest.raises(ConfigError, match="mask_token_id=61 is outside the vocabulary"):
        OrthrusConfig.for_target(CFG, mask_token_id=61)
    cfg = OrthrusConfig.for_target(CFG, mask_token_id=MASK)
    assert cfg.block_size == 32 and cfg.num_layers == 4
    other = CFG.with_layers(3)
    with pytest.raises(ConfigError, match="num_layers=4, but this target has num_layers=3"):
        cfg.check_target(other)


def test_warm_start_holds_only_diff_params_copied_into_new_buffers(target):
    drafter = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(CFG, mask_token_id=MASK))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(drafter, nnx.Param))}
    tflat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(target, nnx.Param))}
    names = {k.split(".")[2] for k in flat}
    assert names == {f"{p}_proj_diff" for p in "qkvo"} | {"q_norm_diff", "k_norm_diff"}
    h, q, kv = CFG.hidden_size, CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
    per_layer = 2 * h * q + 2 * h * kv + 2 * CFG.head_dim  # q, o + k, v + the two norms
    assert sum(v[...].size for v in flat.values()) == CFG.num_layers * per_layer
    for key, var in flat.items():
        src = tflat[ar_counterpart(key)][...]
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(src), err_msg=key)
        assert var[...].unsafe_buffer_pointer() != src.unsafe_buffer_pointer(), key  # a copy, not an alias


def _dense_reference(drafter, target, k_ar_LPKH, v_ar_LPKH, anchor, p: int, k: int):
    """One block by the letter of docs/design.md §6, with the plain ``attend`` over [AR prefix ; block]."""
    block = jnp.asarray([[anchor] + [MASK] * (k - 1)])
    cos, sin = rope_cos_sin(CFG, p + jnp.arange(k)[None])
    x = target.embed(block)
    for i, (layer, diff) in enumerate(zip(target.layers, drafter.layers, strict=True)):
        h = layer.input_layernorm(x)
        q = diff.q(h, cos, sin)
        kb, vb = diff.kv(h, cos, sin)
        keys = jnp.concatenate([k_ar_LPKH[i][None], kb], axis=1)
        vals = jnp.concatenate([v_ar_LPKH[i][None], vb], axis=1)
        x = x + diff.o_proj_diff(attend(q, keys, vals, jnp.ones((1, k, p + k), bool)))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return target.logits(x)[0, : k - 1]


def test_cache_path_equals_packed_training_path_and_dense_reference(target):
    """Drafting from a KV cache == the packed multi-block training forward == a dense reference.

    One packed row holds two documents; three anchors (two in the second document) are drafted
    in one pass with the sparse prefix mask, each must equal drafting that document alone from a
    cache (filled in two chunks, then rolled back to the anchor: stale slots past the prefix),
    and the dense reference. Jitted so the test compiles a handful of programs, not every op.
    """
    k = 5
    drafter = _perturbed(OrthrusDrafter.from_target(target, OrthrusConfig.for_target(
        CFG, mask_token_id=MASK, block_size=k)), scale=0.1)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60, 9).tolist(), rng.integers(0, 60, 19).tolist()]
    tokens = jnp.asarray([docs[0] + docs[1]])
    seg = jnp.asarray([[1] * 9 + [2] * 19])
    pos = jnp.asarray([list(range(9)) + list(range(19))])
    anchors, valid = jnp.asarray([[6, 13, 21]]), jnp.ones((1, 3), bool)  # doc positions 6, 4, 12

    @jax.jit
    def packed_fn(tokens, seg, pos, anchors, valid):
        s = tokens.shape[1]
        doc_mask = jnp.tril(jnp.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])
        ar = target(tokens, pos, init_cache(CFG, 1, s), block_mask=doc_mask)
        block = jnp.concatenate([tokens[:, anchors[0]][..., None], jnp.full((1, 3, k - 1), MASK)], axis=-1)
        x = target.embed(block.reshape(1, -1)).reshape(1, 3, k, -1)
        q_pos = jnp.take_along_axis(pos, anchors, axis=1)[..., None] + jnp.arange(k)
        ctx_mask = obj.anchor_context_mask(anchors, valid, seg)
        return target.logits(drafter(target, x, q_pos, ar.cache.layers, ctx_mask)[:, :, : k - 1])[0]

    @jax.jit
    def fill(ids):  # two chunks: a 3-token prefill, then the rest of the document
        cache = init_cache(CFG, 1, 40)
        _, _, cache = prefill(target, ids[:, :3], jnp.asarray([3]), cache)
        return target(ids[:, 3:], 3 + jnp.arange(ids.shape[1] - 3)[None], cache).cache

    draft = jax.jit(lambda cache, anchor: drafter.draft_logits(target, cache, anchor))
    dense = jax.jit(partial(_dense_reference, drafter, target), static_argnums=(3, 4))
    packed = packed_fn(tokens, seg, pos, anchors, valid)
    for j, (doc, a) in enumerate([(0, 6), (1, 4), (1, 12)]):
        ids = docs[doc]
        cache = fill(jnp.asarray([ids])).at_lengths(jnp.asarray([a]))  # slots >= a are stale
        k_LSKH = jnp.stack([s.k[0] for s in cache.layers])  # every layer's AR keys of the one row
        v_LSKH = jnp.stack([s.v[0] for s in cache.layers])
        before = (np.asarray(k_LSKH), np.asarray(v_LSKH), np.asarray(cache.lengths))
        got = draft(cache, jnp.asarray([ids[a]]))[0]
        after = (jnp.stack([s.k[0] for s in cache.layers]), jnp.stack([s.v[0] for s in cache.layers]),
                 cache.lengths)
        for was, now in zip(before, after, strict=True):
            np.testing.assert_array_equal(was, np.asarray(now))  # drafting reads, never writes
        np.testing.assert_allclose(np.asarray(got), np.asarray(packed[j]), atol=2e-5, rtol=0)
        want = dense(k_LSKH[:, :a], v_LSKH[:, :a], ids[a], a, k)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("perturb", [False, True], ids=["warm-start", "perturbed"])
@pytest.mark.parametrize("batch,block", [(1, 4), (4, 4), (1, 32), (4, 32)])
def test_greedy_is_lossless(target, batch, block, perturb):
    prompts = _prompts(batch, seed=batch * 100 + block)
    ref = generate(target, prompts, max_new_tokens=40, eos_ids=())
    drafter = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(CFG, mask_token_id=MASK,
                                                                          block_size=block))
    if perturb:
        drafter = _perturbed(drafter, seed=block)
    out = speculative_generate(target, prompts, method=OrthrusDraft.of(drafter), drafter=drafter,
                               max_new_tokens=40, eos_ids=(), mask_token_id=MASK)
    assert out.tokens == ref.tokens
    assert all(1 <= a <= block for row in out.acceptance_lengths for a in row)
    assert out.block_size == block


def test_greedy_is_lossless_when_finished_rows_leave_the_batch(target):
    """Batch 8 with mixed budgets: the engine compacts to the active rows (and their cache rows)."""
    prompts = _prompts(8, seed=21)
    budgets = [6, 40, 6, 6, 40, 6, 6, 40]
    ref = generate(target, prompts, max_new_tokens=budgets, eos_ids=())
    drafter = _perturbed(OrthrusDrafter.from_target(target, OrthrusConfig.for_target(
        CFG, mask_token_id=MASK, block_size=8)), seed=8)
    out = speculative_generate(target, prompts, method=OrthrusDraft.of(drafter), drafter=drafter,
                               max_new_tokens=budgets, eos_ids=(), mask_token_id=MASK)
    assert out.tokens == ref.tokens
    assert len(out.device_batches) > 1 and out.device_batches[-1] < 8  # compaction really happened


@pytest.mark.parametrize("rule", ["token", "block"])
def test_sampling_preserves_the_target_distribution(exact, rule):  # noqa: F811
    """Chi-square on the joint of the first three tokens, stochastic Orthrus drafts (q returned)."""
    tgt, prompt, joint = exact
    cfg = OrthrusConfig.for_target(EXACT_CFG, mask_token_id=EXACT_VOCAB - 1, block_size=4)
    drafter = _perturbed(OrthrusDrafter.from_target(tgt, cfg), scale=0.2, seed=3)
    n = 6000
    out = speculative_generate(tgt, [prompt] * n, method=OrthrusDraft.of(drafter, stochastic=True),
                               drafter=drafter, max_new_tokens=3, eos_ids=(), mask_token_id=EXACT_VOCAB - 1,
                               sampling=SamplingParams(temperature=1.0), rule=rule, key=jax.random.key(5))
    assert all(len(t) == 3 for t in out.tokens)
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20  # drafts really accepted
    assert_first_three_follow(out.tokens, joint)


# ----------------------------------------------------------------------------- training
def test_train_steps_update_only_diff_params_and_leave_the_target_bit_identical(target):
    drafter = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(CFG, mask_token_id=MASK,
                                                                          block_size=4))
    exp = load_yaml(ExperimentConfig, None, ["method=orthrus", "train.steps=3", "optim.lr=0.01"])
    assert exp.loss_weights == (0.0, 1.0) and exp.block_size == 32  # the method's defaults: KL, B = 32
    optimizer = nnx.Optimizer(drafter, make_optimizer(exp, 3), wrt=nnx.Param)
    # The optimizer's moments cover exactly the diffusion parameters.
    opt_paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))]
    assert {p.split(".mu.", 1)[1] for p in opt_paths if ".mu." in p} == set(_params(drafter))
    graphdef, state = nnx.split((drafter, optimizer))
    tgraph, tstate = nnx.split(target)
    before_t = [np.array(x) for x in jax.tree.leaves(tstate)]
    before_d = [np.array(x) for x in jax.tree.leaves(nnx.state(drafter, nnx.Param))]
    train_step, eval_step = make_step_fns(graphdef, tgraph, dict(num_anchors=6, gamma=2.0, ce_weight=0.0,
                                                                 kl_weight=1.0), jnp.float32)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 60, (2, 24)), jnp.int32),
             "loss_mask": jnp.ones((2, 24), bool), "segment_ids": jnp.asarray([[1] * 10 + [2] * 14] * 2),
             "positions": jnp.asarray([list(range(10)) + list(range(14))] * 2)}
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, tstate, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
        assert np.isfinite(losses[-1]) and float(metrics["kl"]) >= 0 and metrics["loss"] == metrics["kl"]
    assert losses[-1] < losses[0]  # same anchors each step: the KL must go down
    for a, b in zip(before_t, jax.tree.leaves(tstate), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    drafter_after, _ = nnx.merge(graphdef, state)
    after_d = jax.tree.leaves(nnx.state(drafter_after, nnx.Param))
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(before_d, after_d, strict=True))
    assert 1.0 <= float(eval_step(state, tstate, batch, jax.random.key(0))["tau_sim"]) <= 4.0


def test_dflash_train_method_orthrus_end_to_end(tiny_target, tmp_path):
    """``method: orthrus`` through run_training: eval, final real tau, delta export that loads.

    ``tiny_target`` (conftest): a random 4-layer target with the shipped tokenizer.
    """
    run = tmp_path / "run"
    cfg = load_yaml(ExperimentConfig, ROOT / "configs/tiny_code_orthrus.yaml", [
        f"target.name={tiny_target}", f"run_dir={run}", "data.max_examples=40", "data.seq_len=64",
        "train.batch_size=2", "train.num_anchors=4", "train.steps=2", "train.eval_every=2",
        "train.save_every=2", "drafter.block_size=6", "eval.num_prompts=2", "eval.max_new_tokens=12",
        "eval.heldout_rows=2", "regen.num_sequences=0"])
    result = run_training(cfg, progress=False)
    assert result["method"] == "orthrus" and result["block_size"] == 6
    assert result["tau"] == tau_from_metrics(result) and result["final_eval"]["tau_sim"] >= 1.0
    tensors = load_file(str(run / "export" / "model.safetensors"))
    assert tensors and all("_diff." in name for name in tensors)  # delta: no target tensors
    target = load_target(tiny_target)
    method, drafter = resolve_method(str(run / "export"), target)
    assert isinstance(method, OrthrusDraft) and method.block_size == 6
    prompts = _prompts(2, seed=5)
    ref = generate(target, prompts, max_new_tokens=16, eos_ids=())
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=16,
                               eos_ids=(), mask_token_id=drafter.cfg.mask_token_id)
    assert out.tokens == ref.tokens
    # dflash-export of the run's last checkpoint reproduces the run's own (delta) export bit for
    # bit; the full form carries the target's tensors too and loads as a drafter the same way.
    from dflash.cli.export import main as export_main

    assert export_main(["--run", str(run), "--out", str(tmp_path / "delta")]) == 0
    again = load_file(str(tmp_path / "delta" / "model.safetensors"))
    assert set(again) == set(tensors) and all(np.array_equal(again[k], tensors[k]) for k in tensors)
    assert export_main(["--run", str(run), "--form", "full", "--out", str(tmp_path / "full")]) == 0
    full_method, full_drafter = resolve_method(str(tmp_path / "full"), target)
    assert isinstance(full_method, OrthrusDraft)
    leaves = [jax.tree.leaves(nnx.state(d)) for d in (full_drafter, drafter)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override,match", [
    ("drafter.num_layers=2", "drafter.num_layers is not an option of method .orthrus."),
    ("drafter.block_size=1", "block_size must be an integer >= 2"),
    ("train.kl_weight=0", "not both 0"),
])
def test_orthrus_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_yaml(ExperimentConfig, ROOT / "configs/tiny_code_orthrus.yaml", [override])


def test_presets_validate_and_build_abstractly():
    from dflash.config import preset_for_hub_id
    from dflash.io.loading import read_config

    cfg = load_yaml(ExperimentConfig, ROOT / "configs/qwen3_8b_orthrus.yaml")
    assert cfg.method == "orthrus" and cfg.block_size == 32 and cfg.loss_weights == (0.0, 1.0)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.clip_norm, cfg.optim.final_lr_ratio) == (
        2e-4, 0.05, 1.0, 0.0)  # published: lr 2e-4, cosine to 0, 5% warmup, clip 1.0
    model_cfg = preset_for_hub_id(cfg.target.name)
    ocfg = OrthrusConfig.for_target(model_cfg, mask_token_id=cfg.drafter.mask_token_id, block_size=32)
    shapes = nnx.eval_shape(lambda: OrthrusDrafter(ocfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(shapes, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    h, q, kv = model_cfg.hidden_size, model_cfg.num_heads * model_cfg.head_dim, 8 * 128
    assert sum(int(np.prod(x.shape)) for x in leaves) == 36 * (2 * h * q + 2 * h * kv + 2 * 128)  # ~1.7B
    tiny = load_yaml(ExperimentConfig, ROOT / "configs/tiny_code_orthrus.yaml")
    assert tiny.method == "orthrus" and tiny.block_size == 32 and tiny.loss_weights == (0.0, 1.0)
    tcfg = OrthrusConfig.for_target(read_config(SHIPPED["tiny-code"]), mask_token_id=1, block_size=32)
    assert nnx.eval_shape(lambda: OrthrusDrafter(tcfg, rngs=nnx.Rngs(0))).cfg.num_layers == 8


# ----------------------------------------------------------------------------- export
def _export_target(directory: Path):
    """The target an Orthrus export runs on: its own tensors (full) or the target it names (delta)."""
    _, tcfg, hf = read_orthrus_config(directory)
    if hf["orthrus_config"]["form"] == "full":
        return load_params_into(abstract(tcfg), directory, target_rows(tcfg), jnp.float32)
    return load_target(hf["orthrus_config"]["target"]["name_or_path"])


def _params(module) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in flat}


def test_export_round_trip_full_and_delta_and_wrong_targets(target, tmp_path):
    drafter = _perturbed(OrthrusDrafter.from_target(target, OrthrusConfig.for_target(
        CFG, mask_token_id=MASK, block_size=8)), seed=4)
    target_dir = save_target(target, tmp_path / "target")
    full = save_orthrus(drafter, target, tmp_path / "full", form="full", target_name=str(target_dir))
    delta = save_orthrus(drafter, target, tmp_path / "delta", target_name=str(target_dir))
    hf = json.loads((full / "config.json").read_text())
    assert hf["architectures"] == ["OrthrusForCausalLM"]
    assert hf["block_size"] == 8 and hf["mask_token_id"] == MASK
    assert hf["num_hidden_layers"] == CFG.num_layers  # the target's config, extended
    keys = set(json.loads((full / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.3.self_attn.q_proj_diff.weight" in keys and "model.embed_tokens.weight" in keys
    assert "model.layers.0.self_attn.k_norm_diff.weight" in keys
    delta_keys = set(load_file(str(delta / "model.safetensors")))
    assert delta_keys == {k for k in keys if "_diff." in k}
    assert json.loads((delta / "config.json").read_text())["architectures"] == ["OrthrusDeltaModel"]
    want = _params(drafter)
    for form in (full, delta):
        assert find_export(form) == (ORTHRUS, form)
        for name, value in _params(load_drafter(form, target)).items():
            np.testing.assert_array_equal(value, want[name], err_msg=f"{form.name}: {name}")
        tgt = _export_target(form)  # full: its own tensors; delta: the referenced target
        for name, value in _params(tgt).items():
            np.testing.assert_array_equal(value, _params(target)[name], err_msg=f"{form.name}: {name}")
    # A target of another architecture, and one of the same architecture with other weights.
    other_arch = build(ModelConfig(**{**CFG.__dict__, "hidden_size": 48}), seed=1)
    with pytest.raises(CheckpointError, match="hidden_size=32, but this target has hidden_size=48"):
        load_drafter(delta, other_arch)
    with pytest.raises(CheckpointError, match="weights fingerprint"):
        load_drafter(full, build(CFG, seed=2))
    with pytest.raises(CheckpointError, match="weights fingerprint"):
        resolve_method(str(delta), build(CFG, seed=2))
    with pytest.raises(CheckpointError, match="is not a drafter of a known kind.*Qwen3ForCausalLM"):
        load_drafter(target_dir, target)
    assert find_export("tiny-code-dflash")[0] is DFLASH
    # A foreign tensor is refused, as load_drafter refuses it (a full export's target tensors are not).
    foreign = tmp_path / "foreign"
    shutil.copytree(delta, foreign)
    tensors = load_file(str(foreign / "model.safetensors"))
    save_file({**tensors, "model.layers.0.self_attn.r_proj.weight": np.zeros((2, 2), np.float32)},
              str(foreign / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not have: \['model.layers.0.self_attn.r_proj"):
        load_drafter(foreign, target)


def test_drafter_memory_is_measured_from_the_arrays(target):
    from dflash.bench import drafter_memory
    from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter

    orthrus = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(CFG, mask_token_id=MASK))
    mem = drafter_memory(target, OrthrusDraft.of(orthrus), orthrus, batch=2, max_len=64)
    h, q, kv = CFG.hidden_size, CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
    assert mem["drafter_state_bytes"] == 0  # no cache of its own
    assert mem["drafter_params_bytes"] == 4 * CFG.num_layers * (2 * h * q + 2 * h * kv + 2 * CFG.head_dim)
    assert mem["target_kv_cache_bytes"] == 2 * 4 * CFG.num_layers * 2 * 64 * kv + 4 * 2
    dflash = build_drafter(DFlashConfig.for_target(CFG, mask_token_id=MASK, num_layers=2,
                                                   target_layer_ids=(1,)))
    mem = drafter_memory(target, DFlashDraft.of(dflash), dflash, batch=2, max_len=64)
    assert mem["drafter_state_bytes"] == 2 * 4 * 2 * 2 * 64 * kv + 4 * 2  # 2 layers of context K/V
    assert mem["extra_bytes"] == mem["drafter_state_bytes"] + mem["drafter_params_bytes"] > 0


@pytest.mark.parametrize("batch,block", [(1, 32), (4, 8)])
def test_shipped_drafter_is_lossless_and_drafts(batch, block):
    """The shipped tiny-code-orthrus (a delta export) on the shipped target: speculative == AR greedy."""
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.tiny_corpus import heldout_prompts

    assert find_export("tiny-code-orthrus")[0] is ORTHRUS
    target, tok = load_target("tiny-code"), load_tokenizer("tiny-code")
    prompts = [tok(p).input_ids[-64:] for p in heldout_prompts(batch, seed=1)]
    ref = generate(target, prompts, max_new_tokens=64, eos_ids=target.cfg.eos_token_id)
    method, drafter = resolve_method("tiny-code-orthrus", target, block_size=block)
    assert isinstance(method, OrthrusDraft) and drafter.cfg.mask_token_id == tok.mask_token_id
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=64,
                               eos_ids=target.cfg.eos_token_id, mask_token_id=drafter.cfg.mask_token_id)
    assert out.tokens == ref.tokens
    assert out.tau > 1.5  # it really drafts (trained: ~2.6 on held-out prompts at B = 32)
