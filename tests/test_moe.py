"""Mixture-of-experts targets (Qwen3-MoE): the grouped dropless MoE equals its formula (values and
gradients), the config and the checkpoint go both ways with ``transformers``, the engine stays
lossless on an MoE target, and a mesh places the 3-D expert weights. (Logit and greedy parity
with ``transformers`` are cases of tests/test_models_parity.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MOE, make_hf_model
from devices import on_cpu_devices
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.decoding import generate
from dflash.decoding.methods import NgramDraft
from dflash.decoding.speculative import speculative_generate
from dflash.errors import ConfigError
from dflash.io import load_target, save_target
from dflash.models import count_params
from dflash.models.moe_mlp import MoE

GPT_OSS_MOE = {"router": "topk_softmax", "router_bias": True, "expert_bias": True,
               "activation": "clamped_swiglu", "swiglu_limit": 0.05,  # a limit the tiny weights' values cross
               "layout": "gpt_oss"}


def _moe(e: int, k: int, norm: bool, seed: int = 0, **options) -> MoE:
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=11, hidden_size=20, intermediate_size=16,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    spec = LayerSpec(mlp="moe", mlp_options={"experts": e, "top_k": k, "norm_topk_prob": norm,
                                             "intermediate_size": 12, **options})
    moe = MoE(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    moe.gate.kernel[...] = moe.gate.kernel[...] * 40  # decisive routing (see conftest.make_hf_model)
    rng = np.random.default_rng(seed)
    for name in ("experts_gate_bias", "experts_up_bias", "experts_down_bias"):
        if getattr(moe, name) is not None:
            bias = getattr(moe, name)
            bias[...] = jnp.asarray(0.05 * rng.normal(size=bias.shape), jnp.float32)
    return moe


@pytest.mark.parametrize("e,k,norm,options,impl", [(5, 3, True, {}, "auto"), (7, 1, False, {}, "auto"),
                                                   (6, 2, False, GPT_OSS_MOE, "auto"),
                                                   (6, 2, False, GPT_OSS_MOE, "pallas")])
def test_grouped_experts_equal_the_formula_with_gradients(e, k, norm, options, impl):
    """``auto`` on CPU: ``ragged_dot``; ``pallas``: megablox ``gmm`` in interpret mode (its own VJP)."""
    moe = _moe(e, k, norm, **options)
    moe.impl = impl
    x = jnp.asarray(np.random.default_rng(e).normal(size=(3, 7, 20)), jnp.float32)  # 21 tokens
    graphdef, params = nnx.split(moe)

    @jax.jit
    def value_and_grads(params, x):
        def loss(params, x, grouped):
            model = nnx.merge(graphdef, params)
            y = model(x) if grouped else model.dense_reference(x)
            return jnp.sum(jnp.sin(y)), y  # a loss that weighs every output differently

        return [jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x, g) for g in (True, False)]

    ((gp, gx), y), ((rp, rx), ref) = value_and_grads(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=1e-6)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_reads_writes_and_refuses_what_it_cannot_build(tmp_path):
    hf = make_hf_model("qwen3_moe", **{**MOE, "decoder_sparse_step": 2, "mlp_only_layers": []})
    hf.save_pretrained(tmp_path / "hf")
    target = load_target(tmp_path / "hf")
    assert [s.mlp for s in target.cfg.layers] == ["dense", "moe", "dense"]  # (i + 1) % 2 == 0
    assert dict(target.cfg.layers[1].mlp_options) == {"experts": 6, "top_k": 2, "norm_topk_prob": True,
                                                      "intermediate_size": 24}
    assert count_params(target) == target.cfg.num_params() == sum(p.numel() for p in hf.parameters())
    assert ModelConfig.from_hf(target.cfg.to_hf()) == target.cfg
    # Our save is a Qwen3-MoE checkpoint transformers opens, with the same logits.
    save_target(target, tmp_path / "ours")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    ids = np.random.default_rng(0).integers(0, 101, (2, 9))
    with torch.no_grad():
        want = back(torch.from_numpy(ids)).logits.numpy()
    got = target(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(9), ids.shape)).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    cfg = target.cfg.to_hf()
    with pytest.raises(ConfigError, match="lacks 'moe_intermediate_size'"):
        ModelConfig.from_hf({k: v for k, v in cfg.items() if k != "moe_intermediate_size"})
    with pytest.raises(ConfigError, match="1 <= top_k <= experts"):
        load_target_from(cfg | {"num_experts_per_tok": 7}, tmp_path / "hf", tmp_path / "bad")


def fuse_experts(source, directory) -> None:
    """``source``'s checkpoint with each layer's experts fused, as transformers 5 holds them:
    ``experts.gate_up_proj [E, 2F, D]`` (gate first) and ``experts.down_proj [E, D, F]``."""
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, directory)
    tensors, fused = load_file(str(directory / "model.safetensors")), {}
    for key in sorted(tensors):
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", key)
        if m:
            fused.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensors.pop(key)
    for prefix, parts in fused.items():
        stack = lambda p: np.stack([parts[p][e] for e in sorted(parts[p])])  # noqa: B023, E731
        tensors[f"{prefix}.gate_up_proj"] = np.concatenate([stack("gate"), stack("up")], axis=1)
        tensors[f"{prefix}.down_proj"] = stack("down")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_fused_expert_tensors_load_as_the_per_expert_ones(tmp_path):
    make_hf_model("qwen3_moe", **MOE).save_pretrained(tmp_path / "per-expert")
    fuse_experts(tmp_path / "per-expert", tmp_path / "fused")
    a, b = load_target(tmp_path / "per-expert"), load_target(tmp_path / "fused")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    save_target(b, tmp_path / "saved")  # saved one tensor per expert, as the hub checkpoints
    assert load_target(tmp_path / "saved").layers[0].mlp.experts_up[...].shape == (6, 64, 24)


def load_target_from(cfg: dict, weights, directory):
    """The checkpoint in ``weights`` under another config.json."""
    import json
    import shutil

    shutil.copytree(weights, directory)
    (directory / "config.json").write_text(json.dumps(cfg))
    return load_target(directory)


def test_the_engine_is_lossless_on_an_moe_target(tmp_path):
    """Prompt lookup and Orthrus (the target's own MoE layers under diffusion attention) give the
    target's greedy tokens (a trained DFlash drafter: the last test)."""
    from dflash.drafters.orthrus import OrthrusConfig, OrthrusDraft, OrthrusDrafter

    make_hf_model("qwen3_moe", **MOE).save_pretrained(tmp_path)
    target = load_target(tmp_path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 101, n).tolist() for n in (4, 13)]
    prompts.append(prompts[0] * 3)  # repetition: prompt lookup gets accepted tokens
    ref = generate(target, prompts, max_new_tokens=24, eos_ids=())
    orthrus = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(target.cfg, mask_token_id=100,
                                                                          block_size=4))
    for method, drafter in ((NgramDraft(block_size=4), None), (OrthrusDraft.of(orthrus), orthrus)):
        out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=24,
                                   eos_ids=())
        assert out.tokens == ref.tokens, type(method).__name__
        assert any(a > 1 for row in out.acceptance_lengths for a in row), type(method).__name__


@on_cpu_devices(8)
def test_expert_weights_shard_and_the_forward_equals_unsharded():
    import tempfile
    from pathlib import Path

    from dflash import sharding as sh

    with tempfile.TemporaryDirectory() as tmp:
        small = {**MOE, "num_experts": 4, "moe_intermediate_size": 8}
        make_hf_model("qwen3_moe", **small).save_pretrained(Path(tmp) / "per-expert")
        target = load_target(Path(tmp) / "per-expert")
        mesh = sh.make_mesh(sh.MeshConfig(2, 2, 2))
        sharded = load_target(Path(tmp) / "per-expert", mesh=mesh, replicate_indivisible=True)  # vocab 101
        fuse_experts(Path(tmp) / "per-expert", Path(tmp) / "fused")  # read slice by slice too
        fused = load_target(Path(tmp) / "fused", mesh=mesh, replicate_indivisible=True)
    for x, y in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(fused)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    up = sharded.layers[0].mlp.experts_up[...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # [E, D, F]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 101, (4, 11)))
    pos = jnp.broadcast_to(jnp.arange(11), ids.shape)
    want = np.asarray(target(ids, pos).logits)
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda m, i, p: m(i, p).logits)(sharded, ids, pos))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_dflash_drafter_trains_on_an_moe_target_and_decodes_losslessly(tmp_path):
    """The trainer reads the MoE target's hidden states (its config written as ``mlp_only_layers``)
    and the exported drafter decodes with it losslessly."""
    from conftest import make_tiny_target, tiny_run_config

    from dflash.drafters import resolve_method
    from dflash.training.trainer import run_training

    target_dir = make_tiny_target(tmp_path / "target", moe=True)
    cfg = tiny_run_config(target_dir, tmp_path / "run", "train.steps=2", "eval.num_prompts=1",
                          "eval.heldout_rows=2")
    result = run_training(cfg, progress=False)
    assert result["steps"] == 2 and np.isfinite(result["final_eval"]["loss"])
    target = load_target(target_dir)
    assert [s.mlp for s in target.cfg.layers] == ["moe", "dense", "moe", "dense"]
    method, drafter = resolve_method(result["export_dir"], target)
    prompts = [[5, 9, 14, 3], [7, 7, 7, 7, 7, 7]]
    ref = generate(target, prompts, max_new_tokens=12, eos_ids=())
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=12, eos_ids=())
    assert out.tokens == ref.tokens
    # A tree of 2 beams (one verify pass routes every node of the tree): the same tokens.
    from dflash.drafters import tree_method_for

    tree = speculative_generate(target, prompts, method=tree_method_for(drafter, 2), drafter=drafter,
                                max_new_tokens=12, eos_ids=())
    assert tree.tokens == ref.tokens


class _Holder(nnx.Module):
    """A MoE at a parameter path the rule table knows (``mlp.experts_*``)."""

    def __init__(self, mlp: MoE):
        self.mlp = mlp


EXPERT_MESHES = ((1, 4, 1, 2), (1, 1, 2, 4))  # (data, fsdp, tensor, expert)


@on_cpu_devices(8)
def test_expert_parallel_moe_equals_one_device_with_gradients():
    """Tokens dispatched to their experts' devices and back (expert=2 x fsdp=4, expert=4 x tensor=2;
    21 tokens: padded to the 8-way batch split) give the one-device values and gradients (Orthrus
    trains through the target's MoE layers), with ragged_dot and with the gmm kernel; experts that
    the expert axis does not divide are refused, naming the tensor and the axis."""
    from dflash import sharding as sh

    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, 20)), jnp.float32)

    def value_and_grads(holder, x):
        graphdef, params = nnx.split(holder)
        loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p).mlp(x)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    # Qwen3-Next's shared expert (outside the dispatch); gpt-oss's form (biases; the down bias added
    # once over tensor) with the width split
    shared = {"shared_expert_size": 12, "shared_expert_gate": True}
    for shape, impl, options in ((EXPERT_MESHES[0], "auto", shared), (EXPERT_MESHES[1], "auto", GPT_OSS_MOE),
                                 (EXPERT_MESHES[1], "pallas", GPT_OSS_MOE)):
        moe = _moe(8, 3, True, **options)
        want = value_and_grads(_Holder(moe), x)
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        moe.impl = impl
        holder = sh.shard_model(_Holder(moe), mesh)
        assert holder.mlp.experts_down[...].sharding.spec[0] == "expert"
        with jax.set_mesh(mesh):
            got = value_and_grads(holder, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5,
                                       err_msg=f"{shape} {impl}")
    mesh = sh.make_mesh(sh.MeshConfig(1, 1, 2, 4))
    says = r"'mlp.experts_(gate|up|down)' \(6, .*exp, size 6.*expert of size 4"
    with pytest.raises(sh.ShardingError, match=says):
        sh.shard_model(_Holder(_moe(6, 2, True)), mesh)
    replicated = sh.shard_model(_Holder(_moe(6, 2, True)), mesh, replicate_indivisible=True)
    with jax.set_mesh(mesh), pytest.raises(sh.ShardingError, match="exp, size 6.*expert of size 4"):
        replicated.mlp(x)


@on_cpu_devices(8)
def test_a_moe_target_on_expert_parallel_meshes_gives_the_logits_and_the_decoding_of_one_device():
    """A tiny Qwen3-MoE target: forward logits on both expert meshes; greedy speculative decoding
    (a DFlash drafter, prompt lookup: decode and verify passes) on expert=4 x tensor=2: the same
    tokens and acceptance lengths."""
    import tempfile
    from pathlib import Path

    from conftest import make_tiny_target

    from dflash import sharding as sh
    from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter

    with tempfile.TemporaryDirectory() as tmp:
        target_dir = make_tiny_target(Path(tmp) / "target", moe=True)
        target = load_target(target_dir)
        meshes = [sh.make_mesh(sh.MeshConfig(*shape)) for shape in EXPERT_MESHES]
        sharded = [load_target(target_dir, mesh=mesh) for mesh in meshes]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 4096, (4, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), ids.shape)
    want = np.asarray(target(ids, pos).logits)
    for mesh, on_mesh in zip(meshes, sharded, strict=True):
        with jax.set_mesh(mesh):
            got = np.asarray(jax.jit(lambda m, i, p: m(i, p).logits)(on_mesh, ids, pos))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(dict(mesh.shape)))
    mesh, on_mesh = meshes[1], sharded[1]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 4096, int(n)).tolist() for n in (3, 11, 6)]
    prompts.append(prompts[1] * 2)  # repetition: prompt lookup gets accepted tokens
    drafter = build_drafter(DFlashConfig.for_target(target.cfg, mask_token_id=4095, num_layers=1,
                                                    block_size=4, target_layer_ids=(0, 2)), seed=2)
    for method, d in ((DFlashDraft.of(drafter), drafter), (NgramDraft(block_size=4), None)):
        ref = speculative_generate(target, prompts, method=method, drafter=d, max_new_tokens=12, eos_ids=())
        got = speculative_generate(on_mesh, prompts, method=method, drafter=d and sh.shard_model(d, mesh),
                                   max_new_tokens=12, eos_ids=(), mesh=mesh)
        where = type(method).__name__
        assert got.tokens == ref.tokens and got.acceptance_lengths == ref.acceptance_lengths, where
    assert any(a > 1 for row in got.acceptance_lengths for a in row)
