"""The seams, proven: a mixer kind, an MLP kind and a drafter kind defined only in this file plug
into the model, the engine, the trainer and the plan without any edit outside it (issue 28).

- ``toy_recurrence``: a decayed linear recurrence whose cache state is one vector per row, not a
  slot per token. A verify pass returns the state before and after every block token and
  ``Cache.keep`` selects each row's (docs/design.md §3); it cannot commit a tree path.
- ``toy_experts``: a dense mixture of experts whose weights are stored per expert in the checkpoint
  (``experts.{e}.up_proj.weight``) and stacked ``[E, D, F]`` in the model (3-D sharding rows).
- ``toy_bigram``: a drafter that drafts a chain token by token from the previous token alone,
  trained with the shared anchor-block loss, exported in a layout of its own.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dflash import sharding
from dflash.config import LayerSpec, ModelConfig
from dflash.decoding import generate
from dflash.decoding.method import ChainDraft, StepInputs
from dflash.decoding.methods import NgramDraft, check_block
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import blocks as blk
from dflash.drafters import loss_head
from dflash.drafters.registry import DrafterKind, register, resolve_method, tree_method_for
from dflash.errors import ConfigError
from dflash.io.loading import SHIPPED, load_params_into, load_target, save_params, save_target
from dflash.models import build, init_cache
from dflash.models.cache import LayerState
from dflash.models.kinds import (
    MixerKind,
    MLPKind,
    WeightRow,
    mlp_option,
    option,
    register_mixer,
    register_mlp,
)
from dflash.models.layers import Linear, RMSNorm, normal


# ----------------------------------------------------------------------------- a mixer kind
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrailState(LayerState):
    """``s``: the committed state ``[B, R]``; after a forward over T tokens, ``[B, T+1, R]`` (the state
    before the block, then after each of its tokens) until ``rollback`` picks each row's."""

    s: jax.Array
    AXES: ClassVar[dict[str, tuple[Any, ...]]] = {"s": ("batch", ...)}

    def rollback(self, kept_B: jax.Array, block_len: int) -> TrailState:
        return TrailState(jnp.take_along_axis(self.s, kept_B[:, None, None], axis=1)[:, 0])


class Recurrence(nnx.Module):
    """``s_t = sigmoid(decay) * s_{t-1} + tanh(x_t @ in)``, output ``s_t @ out``; reset at documents."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype, rngs: nnx.Rngs):
        r = option(spec, "width")
        self.in_proj = Linear(cfg.hidden_size, r, bias=False, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(r, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)
        self.decay = normal(rngs, (r,), dtype, std=1.0)

    def __call__(self, x_BTD, *, ctx, state):
        b, t, _ = x_BTD.shape
        u_BTR = jnp.tanh(self.in_proj(x_BTD))
        s0_BR = jnp.zeros((b, u_BTR.shape[-1]), u_BTR.dtype) if state is None else state.s
        keep_BT = jnp.ones((b, t), u_BTR.dtype)
        if ctx.segment_ids is not None:  # packed documents: no state crosses a boundary
            seg = ctx.segment_ids
            keep_BT = jnp.concatenate([jnp.zeros((b, 1)), (seg[:, 1:] == seg[:, :-1])], 1).astype(u_BTR.dtype)
        a_R = jax.nn.sigmoid(self.decay[...])

        def step(s_BR, inputs):
            u, k = inputs
            s_BR = a_R * s_BR * k[:, None] + u
            return s_BR, s_BR

        _, s_TBR = jax.lax.scan(step, s0_BR, (u_BTR.swapaxes(0, 1), keep_BT.swapaxes(0, 1)))
        s_BTR = s_TBR.swapaxes(0, 1)
        trail = None if state is None else TrailState(jnp.concatenate([s0_BR[:, None], s_BTR], axis=1))
        return self.out_proj(s_BTR), trail


register_mixer(MixerKind(
    name="toy_recurrence", module=Recurrence, attr="mix", options={"width": 12},
    weights=lambda cfg, spec: (WeightRow("in_proj.weight", "in_proj.kernel", transpose=True),
                               WeightRow("out_proj.weight", "out_proj.kernel", transpose=True),
                               WeightRow("decay", "decay")),
    sharding=((r"(^|\.)mix\.in_proj\.kernel$", ("embed", None)), (r"(^|\.)mix\.out_proj\.kernel$", (None,
                                                                                                    "embed")),
              (r"(^|\.)mix\.decay$", (None,))),
    flops=lambda cfg, spec, rows, keys: 4.0 * rows * cfg.hidden_size * option(spec, "width"),
    state=lambda cfg, spec, batch, max_len, dtype: TrailState(jnp.zeros((batch, option(spec, "width")),
                                                                        dtype)),
))


# ----------------------------------------------------------------------------- an MLP kind
class Experts(nnx.Module):
    """A dense mixture: every expert's SwiGLU-free MLP, weighted by a softmax router."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype, rngs: nnx.Rngs):
        e, d, f = mlp_option(spec, "experts"), cfg.hidden_size, cfg.intermediate_size
        self.router = Linear(d, e, bias=False, dtype=dtype, rngs=rngs)
        self.up = normal(rngs, (e, d, f), dtype)
        self.down = normal(rngs, (e, f, d), dtype)

    def __call__(self, x):
        hidden = jax.nn.silu(jnp.einsum("...d,edf->...ef", x, self.up[...]))
        out = jnp.einsum("...ef,efd->...ed", hidden, self.down[...])
        return jnp.einsum("...e,...ed->...d", jax.nn.softmax(self.router(x), axis=-1), out)


def _expert_rows(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    e = mlp_option(spec, "experts")
    return (WeightRow("router.weight", "router.kernel", transpose=True),
            WeightRow("experts.{e}.up_proj.weight", "up", transpose=True, experts=e),
            WeightRow("experts.{e}.down_proj.weight", "down", transpose=True, experts=e))


register_mlp(MLPKind(
    name="toy_experts", module=Experts, options={"experts": 3}, weights=_expert_rows,
    sharding=((r"(^|\.)mlp\.router\.kernel$", ("embed", None)), (r"(^|\.)mlp\.up$", (None, "embed", "mlp")),
              (r"(^|\.)mlp\.down$", (None, "mlp", "embed"))),
    flops=lambda cfg, spec, rows: 4.0 * rows * mlp_option(spec, "experts") * cfg.hidden_size
    * cfg.intermediate_size,
))


def hybrid_config(vocab: int = 4096) -> ModelConfig:
    """Attention and recurrence layers, dense and expert MLPs, interleaved."""
    att, rec = {"qk_norm": True}, {"width": 12}
    layers = (LayerSpec(mixer_options=att), LayerSpec("toy_recurrence", "toy_experts", rec),
              LayerSpec("toy_recurrence", "dense", rec), LayerSpec("attention", "toy_experts", att))
    return ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                       num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True, eos_token_id=(0,),
                       layers=layers)


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    """The hybrid target saved as a checkpoint, with the shipped tokenizer (so it trains on text)."""
    directory = tmp_path_factory.mktemp("hybrid")
    save_target(build(hybrid_config(), seed=5), directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, directory / name)
    return directory


def test_the_toy_kinds_build_load_and_save_and_cache_equals_no_cache(hybrid_dir):
    from safetensors.numpy import load_file

    target = load_target(hybrid_dir)
    assert target.cfg == hybrid_config() and target.layers[1].mixer_attr == "mix"
    keys = set(load_file(str(hybrid_dir / "model.safetensors")))
    assert {"model.layers.1.mix.decay", "model.layers.1.mlp.experts.2.up_proj.weight"} <= keys
    written = json.loads((hybrid_dir / "config.json").read_text())["dflash_layers"]
    assert written[1]["mixer"] == "toy_recurrence"
    resaved = save_target(target, hybrid_dir.parent / "resaved")
    assert load_file(str(resaved / "model.safetensors")).keys() == keys
    # Cached in chunks == uncached: the recurrence carries its state between passes.
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 4096, (2, 21)), jnp.int32)
    full = target(ids, jnp.broadcast_to(jnp.arange(21), (2, 21))).logits
    cache, got = init_cache(target.cfg, 2, 32), []
    for lo, hi in ((0, 9), (9, 10), (10, 21)):
        out = target(ids[:, lo:hi], jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo)), cache)
        cache = out.cache.keep(jnp.full((2,), hi - lo), hi - lo)
        got.append(out.logits)
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5)


def test_rollback_keeps_each_rows_accepted_prefix(hybrid_dir):
    """After a verify pass of 6 tokens, keeping k of them gives exactly the state of a run over
    the prompt and those k tokens, for every k and differently per row."""
    target = load_target(hybrid_dir)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 4096, (2, 13)), jnp.int32)
    pos = lambda lo, hi: jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))  # noqa: E731
    prefix = target(ids[:, :7], pos(0, 7), init_cache(target.cfg, 2, 16)).cache.keep(jnp.full((2,), 7), 7)
    verified = target(ids[:, 7:], pos(7, 13), prefix).cache
    step, after = prefix, [prefix.layers[1].s]  # after[k]: the recurrence after the prompt and k tokens
    for i in range(7, 13):  # one token at a time: one compiled shape, and a different pass than `verified`
        step = target(ids[:, i:i + 1], pos(i, i + 1), step).cache.keep(jnp.ones((2,), jnp.int32), 1)
        after.append(step.layers[1].s)
    for kept in ((0, 6), (3, 1), (6, 2)):
        rolled = verified.keep(jnp.asarray(kept), 6)
        for row, k in enumerate(kept):
            np.testing.assert_allclose(rolled.layers[1].s[row], after[k][row], atol=1e-5)
            assert int(rolled.lengths[row]) == 7 + k


def test_the_engine_is_lossless_on_the_hybrid_target_and_refuses_what_it_cannot_do(hybrid_dir):
    from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter
    from dflash.drafters.orthrus import OrthrusConfig

    target = load_target(hybrid_dir)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 4096, n).tolist() for n in (5, 11, 8)]
    ref = generate(target, prompts, max_new_tokens=20, eos_ids=())
    dflash = build_drafter(DFlashConfig.for_target(target.cfg, mask_token_id=4095, block_size=4,
                                                   target_layer_ids=(1, 2)), seed=1)  # features of toy layers
    for method, drafter in ((NgramDraft(block_size=5), None), (DFlashDraft.of(dflash), dflash)):
        out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=20,
                                   eos_ids=())
        assert out.tokens == ref.tokens
    refusal = r"layer 1 is toy_recurrence \(its TrailState cannot commit a tree path\)"
    with pytest.raises(ConfigError, match=refusal):  # up front, from LayerState.TREE: nothing traced
        speculative_generate(target, prompts, method=tree_method_for(dflash, 2), drafter=dflash, eos_ids=())
    with pytest.raises(ConfigError, match="Orthrus needs full attention .* layer 1 is toy_recurrence"):
        OrthrusConfig.for_target(target.cfg, mask_token_id=4095)


def test_a_runs_evaluation_decodes_chains_only_on_the_hybrid_target(hybrid_dir, monkeypatch):
    """DFlash's extra evaluation method is a tree (``tau_with_ngram``): left out here, not a crash."""
    import types

    from dflash.drafters.dflash import DFlashConfig, build_drafter
    from dflash.training import evaluation

    decoded = []

    def fake(target, prompts, *, method, **kw):  # records what would be decoded, decodes nothing
        decoded.append(method)
        return types.SimpleNamespace(tokens=[[1]], tau=1.0, mean_acceptance_length=1.0, num_generated=1,
                                     histogram=lambda: [1])

    monkeypatch.setattr(evaluation, "speculative_generate", fake)
    target = load_target(hybrid_dir)
    dflash = build_drafter(DFlashConfig.for_target(target.cfg, mask_token_id=4095, block_size=4,
                                                   target_layer_ids=(1, 2)), seed=1)
    out = evaluation.measure_tau(target, dflash, [[5, 6, 7]], max_new_tokens=4)
    assert [m.tree for m in decoded] == [False, False] and "tau_with_ngram" not in out
    plain = load_target(SHIPPED["tiny-code"])  # all attention: the tree runs
    out = evaluation.measure_tau(plain, build_drafter(DFlashConfig.for_target(plain.cfg, mask_token_id=7,
                                                                              block_size=4), seed=1),
                                 [[5, 6, 7]], max_new_tokens=4)
    assert [m.tree for m in decoded[2:]] == [False, False, True] and "tau_with_ngram" in out


@pytest.mark.parametrize("command, options", [("generate", ["--tree-width", "2"]),
                                              ("bench", ["--ngram-branch"]), ("bench", ["--dynamic-tree"])])
def test_the_commands_refuse_trees_on_the_hybrid_target_in_one_line(hybrid_dir, command, options, capsys):
    """Before the drafter loads (its path need not exist) and before anything compiles."""
    from dflash.cli import bench, generate

    main = {"generate": generate.main, "bench": bench.main}[command]
    extra = ["--prompt", "def f"] if command == "generate" else []
    assert main(["--target", str(hybrid_dir), "--drafter", str(hybrid_dir / "none"), *extra, *options]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"dflash-{command}: error: tree verification (--tree-width, --ngram-branch, "
                   "--dynamic-tree) is not "
                   "available for this target: layer 1 is toy_recurrence (its TrailState cannot commit a "
                   "tree path); decode it with a chain (drop those options)"]


# ----------------------------------------------------------------------------- a drafter kind
@dataclasses.dataclass(frozen=True)
class BigramConfig:
    hidden_size: int
    width: int = 24
    block_size: int = 4
    mask_token_id: int | None = None


class Bigram(nnx.Module):
    """The next token from the previous one alone, through the target's embedding and LM head."""

    remat = False

    def __init__(self, cfg: BigramConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bigram_up = Linear(cfg.hidden_size, cfg.width, bias=False, dtype=dtype, rngs=rngs)
        self.bigram_down = Linear(cfg.width, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, 1e-6, dtype)

    def hidden(self, target, tokens):
        x = target.embed(tokens).astype(self.bigram_up.kernel[...].dtype)
        return self.norm(x + self.bigram_down(jax.nn.silu(self.bigram_up(x))))


@dataclasses.dataclass(frozen=True)
class BigramDraft(ChainDraft):
    block_size: int

    def propose(self, drafter, target, state, step: StepInputs, key, sampling):
        def one(tok_B, _):
            nxt = jnp.argmax(target.unembed(drafter.hidden(target, tok_B)), axis=-1).astype(jnp.int32)
            return nxt, nxt

        _, drafts_kB = jax.lax.scan(one, step.anchor_B, None, length=self.block_size - 1)
        return drafts_kB.T, None


ROWS = (WeightRow("up.weight", "bigram_up.kernel", transpose=True),
        WeightRow("down.weight", "bigram_down.kernel", transpose=True), WeightRow("norm.weight",
                                                                                  "norm.weight"))


class BigramKind(DrafterKind):
    name, label, module, architectures = "toy_bigram", "Bigram", Bigram, ("ToyBigramDraft",)
    default_block_size, default_loss_weights = 4, (1.0, 0.0)
    sharding = ((r"(^|\.)bigram_up\.kernel$", ("embed", None)), (r"(^|\.)bigram_down\.kernel$", (None,
                                                                                                 "embed")))

    def config(self, section, target, *, mask_token_id, block_size):
        return BigramConfig(target.hidden_size, block_size=block_size, mask_token_id=mask_token_id)

    def construct(self, dcfg, *, dtype=jnp.float32, seed=0):
        return Bigram(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))

    def build(self, dcfg, target, *, seed, mesh=None, replicate_indivisible=False):
        if mesh is None:
            return self.construct(dcfg, seed=seed)
        return sharding.init_sharded(lambda: self.construct(dcfg, seed=seed), mesh)

    def claims(self, hf):
        return "ToyBigramDraft" in (hf.get("architectures") or [])

    def read_config(self, directory):
        return BigramConfig(**json.loads((directory / "config.json").read_text())["bigram"])

    def load(self, directory, target=None, *, target_cfg=None, dtype=jnp.float32, attention_impl="auto",
             mesh=None,
             replicate_indivisible=False):
        return load_params_into(self.abstract(self.read_config(directory), dtype), directory, ROWS, dtype,
                                mesh=mesh)

    def save(self, drafter, target, target_cfg, out, *, target_name, dtype=None, form="delta", **prepared):
        out.mkdir(parents=True, exist_ok=True)
        save_params(drafter, ROWS, out / "model.safetensors", dtype)
        (out / "config.json").write_text(json.dumps({"architectures": ["ToyBigramDraft"],
                                                     "bigram": dataclasses.asdict(drafter.cfg)}))
        return out

    def loss(self, drafter, target, batch, key, *, num_anchors, gamma, ce_weight, kl_weight,
             target_labels=False,
             target_metrics=True, loss_chunk=loss_head.DEFAULT_CHUNK):
        """Teacher-forced: row k of a block is drafted from the true token before it."""
        tokens, q = batch["tokens"], drafter.cfg.block_size
        blocks = blk.anchor_blocks(target, batch, key, num_anchors, q, 0)
        b, a, k = blocks.labels.shape
        prev = jnp.take_along_axis(tokens, jnp.maximum(blocks.label_idx - 1, 0).reshape(b, a * k), axis=1)
        h = drafter.hidden(target, prev.reshape(b, a, k))  # [B, A, Q-1, D]
        need = target_metrics or kl_weight > 0 or target_labels
        t_final = None
        if need:
            out = target(tokens, batch["positions"], segment_ids=batch["segment_ids"], compute_logits=False,
                         final_hidden=True)
            t_final = jax.lax.stop_gradient(out.final)
        return blk.score(h, target, blocks, t_final, batch, gamma=gamma, ce_weight=ce_weight,
                         kl_weight=kl_weight,
                         target_labels=target_labels, chunk=loss_chunk)

    def flops(self, target, dcfg, *, batch, seq, anchors, block, target_logits, remat):
        rows = batch * anchors * (block - 1)
        draft = 3.0 * 2.0 * rows * 2 * dcfg.hidden_size * dcfg.width
        head = 3.0 * 2.0 * rows * target.hidden_size * target.vocab_size
        return {"target": 0.0, "drafter": draft, "loss_head": head, "total": draft + head}

    def method(self, drafter, *, stochastic=False, block_size=None):
        return BigramDraft(check_block(block_size, drafter.cfg.block_size))


BIGRAM = register(BigramKind())


def test_a_toy_drafter_trains_on_the_toy_target_exports_and_decodes_losslessly(hybrid_dir, run_config,
                                                                               tmp_path):
    """The whole pipeline through the kinds of this file: ``method: toy_bigram`` on the hybrid
    target trains (its loss falls), exports its own layout, and the engine resolves the export and
    decodes exactly what the target decodes alone."""
    from dflash.training.trainer import run_training

    toy = ("method=toy_bigram", "drafter.num_target_features=5", "drafter.block_size=0")  # DFlash keys unset
    cfg = run_config(hybrid_dir, tmp_path / "run", *toy, "train.steps=6", "optim.lr=0.02",
                     "optim.warmup_ratio=0.0")
    with pytest.raises(ConfigError,
                       match="drafter.num_target_features is not an option of method 'toy_bigram'"):
        run_config(hybrid_dir, tmp_path / "bad", "method=toy_bigram")  # the tiny config's 3 features
    result = run_training(cfg, progress=False)
    assert result["method"] == "toy_bigram" and result["block_size"] == 4
    history = [h["loss"] for h in result_history(tmp_path / "run")]
    assert history[-1] < history[0]
    export = Path(result["export_dir"])
    assert json.loads((export / "config.json").read_text())["architectures"] == ["ToyBigramDraft"]
    target = load_target(hybrid_dir)
    method, drafter = resolve_method(str(export), target)
    assert isinstance(method, BigramDraft) and type(drafter) is Bigram
    prompts = [[5, 9, 11], [7, 7, 7, 7, 7]]
    ref = generate(target, prompts, max_new_tokens=16, eos_ids=())
    out = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=16, eos_ids=())
    assert out.tokens == ref.tokens


def result_history(run_dir: Path) -> list[dict[str, float]]:
    """The evaluations a run logged (``scalars.csv``: eval/loss per evaluation step)."""
    rows = [line.split(",") for line in (run_dir / "scalars.csv").read_text().splitlines()[1:]]
    return [{"step": int(s), "loss": float(v)} for s, tag, v in rows if tag == "eval/loss"]


def test_the_plan_compiles_the_toy_kinds_for_a_tpu_slice(hybrid_dir, run_config, tmp_path):
    """The AOT plan of the toy drafter on the hybrid target, for 8 virtual v5e chips over
    ``fsdp x tensor``: the kinds' sharding rows place every parameter (3-D expert weights included)."""
    pytest.importorskip("libtpu")
    from dflash import plan

    cfg = run_config(hybrid_dir, tmp_path / "plan", "method=toy_bigram", "drafter.num_target_features=5")
    result = plan.train_plan(cfg, "v5e-8", (1, 4, 2))
    assert result["fits"] and result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert result["flops_by_part"]["drafter"] > 0 and result["per_device_bytes"]["drafter"] > 0
