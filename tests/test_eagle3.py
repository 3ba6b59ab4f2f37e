"""EAGLE-3: the model against its equations, cached == uncached, TTT against an unrolled engine
reference, lossless decoding (greedy and sampling), the dynamic tree's protocol, the vocabulary map
and the vLLM export layout."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_verify import CFG as VCFG
from test_verify import assert_first_three_follow, exact_joint

from dflash.config import ConfigError, ModelConfig
from dflash.decoding.dynamic_tree import DynamicTreeDraft
from dflash.decoding.method import StepInputs
from dflash.decoding.methods import NoDraft
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import find_export, load_drafter
from dflash.drafters.eagle3 import Eagle3Config, Eagle3Draft, build_drafter, vocab_map
from dflash.drafters.eagle3.hf import save_drafter
from dflash.drafters.eagle3.model import check_vocab_map
from dflash.drafters.eagle3.ttt import label_mask, step_weights, ttt_terms
from dflash.errors import CheckpointError

CFG = ModelConfig(model_type="qwen3", vocab_size=13, hidden_size=32, intermediate_size=40, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())
W = 9  # draft vocabulary
IDS = (0, 1, 3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drafter():
    d = build_drafter(Eagle3Config.for_target(CFG, draft_vocab_size=W, target_layer_ids=IDS, block_size=4,
                                              ttt_steps=3), seed=1)
    counts = np.random.default_rng(0).integers(0, 50, CFG.vocab_size)
    d.set_vocab_map(*vocab_map(counts, W))
    for i, (_, p) in enumerate(nnx.iter_graph(d)):  # norms away from 1: every weight matters
        if isinstance(p, nnx.Param) and p.ndim == 1:
            p[...] = p[...] + 0.3 * jax.random.normal(jax.random.key(i), p.shape)
    return d


def _rms(x, w, eps):
    return w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _rope(x_TNH, pos_T, theta):
    h = x_TNH.shape[-1]
    freqs = pos_T[:, None].astype(jnp.float32) * theta ** (-jnp.arange(0, h, 2) / h)
    emb = jnp.concatenate([freqs, freqs], -1)[:, None]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    return x_TNH * cos + jnp.concatenate([-x_TNH[..., h // 2:], x_TNH[..., :h // 2]], -1) * sin


def reference_logits(d, next_tokens_T, feats_TnD, pos_T):
    """vLLM's llama_eagle3 forward written from its equations over one causal sequence: ``[T, V]``."""
    lc, layer = d.layer_cfg, d.layers[0]
    a, eps = layer.self_attn, lc.rms_norm_eps
    k = lambda m: m.kernel[...]  # noqa: E731
    g = feats_TnD @ k(d.fc)
    x2 = jnp.concatenate([_rms(d.embed_tokens[...][next_tokens_T], d.embed_norm.weight[...], eps),
                          _rms(g, layer.input_layernorm.weight[...], eps)], -1)  # [embed ; hidden]
    t, n, kv, h = len(pos_T), lc.num_heads, lc.num_kv_heads, lc.head_dim
    q = _rope((x2 @ k(a.q_proj)).reshape(t, n, h), pos_T, lc.rope.theta)
    kk = _rope((x2 @ k(a.k_proj)).reshape(t, kv, h), pos_T, lc.rope.theta)
    v = (x2 @ k(a.v_proj)).reshape(t, kv, h)
    kk, v = jnp.repeat(kk, n // kv, 1), jnp.repeat(v, n // kv, 1)
    s = jnp.einsum("tnh,snh->nts", q, kk) / np.sqrt(h)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    attn = jnp.einsum("nts,snh->tnh", jax.nn.softmax(s, -1), v).reshape(t, n * h) @ k(a.o_proj)
    r = g + attn  # the residual is the hidden input
    m = _rms(r, layer.post_attention_layernorm.weight[...], eps)
    r = r + (jax.nn.silu(m @ k(layer.mlp.gate_proj)) * (m @ k(layer.mlp.up_proj))) @ k(layer.mlp.down_proj)
    w_logits = _rms(r, d.norm.weight[...], eps) @ k(d.lm_head)
    ids = np.arange(W) + np.asarray(d.d2t[...])
    return jnp.full((t, CFG.vocab_size), -jnp.inf).at[:, ids].set(w_logits)


def test_forward_equals_the_equations_and_cached_equals_uncached(drafter):
    rng = np.random.default_rng(2)
    t = 7
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, t)), jnp.int32)
    feats = jnp.asarray(rng.normal(size=(1, t, 3 * CFG.hidden_size)), jnp.float32)
    pos = jnp.arange(t)[None]
    want = jax.jit(lambda: reference_logits(drafter, toks[0], feats[0], pos[0]))()
    assert np.isinf(np.asarray(want)).sum() == (CFG.vocab_size - W) * t  # -inf outside the draft vocabulary

    def engine(sizes):  # the rows fed through the cache ``sizes`` at a time
        cache, outs, lo = drafter.init_cache(1, 16), [], 0
        for n in sizes:
            rows = slice(lo, lo + n)
            h, cache = drafter.extend(cache, drafter.embed(toks[:, rows]), drafter.project(feats[:, rows]),
                                      pos[:, rows], cache.lengths + n)
            outs.append(h)
            lo += n
        return drafter.target_logits(jnp.concatenate(outs, 1))[0]

    for sizes in ((7,), (4, 1, 2)):
        np.testing.assert_allclose(jax.jit(engine, static_argnums=0)(sizes), want, rtol=2e-5, atol=2e-5)


def test_vocab_map_by_frequency_and_its_round_trip():
    counts = np.array([0, 5, 2, 5, 0, 9, 1, 0])
    d2t, t2d = vocab_map(counts, 4)
    np.testing.assert_array_equal(np.flatnonzero(t2d), [1, 2, 3, 5])  # most frequent; ties by id
    np.testing.assert_array_equal(np.arange(4) + d2t, [1, 2, 3, 5])
    d2t, t2d = vocab_map(counts, 7)  # more than were seen: unseen ids fill by id order
    np.testing.assert_array_equal(np.flatnonzero(t2d), [0, 1, 2, 3, 4, 5, 6])
    check_vocab_map(d2t, t2d)
    bad = t2d.copy()
    bad[7] = True
    with pytest.raises(ConfigError, match="t2d and d2t disagree"):
        check_vocab_map(d2t, bad)
    with pytest.raises(ConfigError, match="draft_vocab_size=9"):
        vocab_map(counts, 9)


def unrolled_ttt(drafter, feats, t_logits, batch, steps):
    """TTT from the engine's path: for every row t of every document, the real rows up to t through
    the cache, then ``steps - 1`` chained rows (the data's tokens, the drafter's own hidden states)."""
    tokens, seg, pos, lm = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions", "loss_mask"))
    b, s = tokens.shape
    ids = np.arange(W) + np.asarray(drafter.d2t[...])
    t_logits = np.asarray(t_logits)
    total = 0.0
    for r in range(b):
        for t in range(s):
            if seg[r, t] == 0:
                continue
            doc = np.flatnonzero(seg[r] == seg[r, t])
            rows = doc[doc <= t]
            nxt = np.pad(tokens[r], (0, steps + 2))
            cache = drafter.init_cache(1, s + steps)
            h, cache = drafter.extend(cache, drafter.embed(jnp.asarray(nxt[rows + 1])[None]),
                                      drafter.project(feats[r:r + 1, rows]), jnp.asarray(pos[r, rows])[None],
                                      jnp.array([len(rows)]))
            h = h[:, -1:]
            for i in range(steps):
                if i:
                    h, cache = drafter.extend(cache, drafter.embed(jnp.asarray([[nxt[t + 1 + i]]])), h,
                                              jnp.asarray([[pos[r, t] + i]]), cache.lengths + 1)
                j = t + 2 + i
                if j >= s or not lm[r, j] or seg[r, j] != seg[r, t]:
                    continue
                tl = t_logits[r, j - 1]
                if not np.isin(int(np.argmax(tl)), ids):
                    continue
                p = jax.nn.softmax(tl[ids])
                logp = jax.nn.log_softmax(drafter.head(h)[0, 0])
                total = total - step_weights(steps)[i] * (p * logp).sum()
    return total / (b * s)


def test_ttt_loss_and_gradient_equal_the_unrolled_engine_reference(drafter):
    rng = np.random.default_rng(4)
    b, s, steps = 1, 11, 3  # two documents and a padding slot in one packed row
    batch = {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (b, s)), jnp.int32),
             "segment_ids": jnp.asarray([[1] * 6 + [2] * 4 + [0]]),
             "positions": jnp.asarray([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0]]),
             "loss_mask": jnp.asarray([[True] * 4 + [False] + [True] * 6])}
    feats = jnp.asarray(rng.normal(size=(b, s, 3 * CFG.hidden_size)), jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(b, s, CFG.vocab_size)) * 2, jnp.float32)
    assert label_mask(batch["loss_mask"], batch["segment_ids"], 2).sum() > 4
    graphdef, params, rest = nnx.split(drafter, nnx.Param, ...)

    def ours(p, chunk, remat):
        d = nnx.merge(graphdef, p, rest)
        d.remat = remat
        return ttt_terms(d, feats, t_logits, batch, steps, chunk=chunk)[0]

    def ref(p):
        return unrolled_ttt(nnx.merge(graphdef, p, rest), feats, t_logits, batch, steps)

    l2, g2 = jax.jit(jax.value_and_grad(ref))(params)
    # one chunk; and chunks of 4 rows (11 = 4 + 4 + 3: a padded last chunk) with each step recomputed
    for chunk, remat in ((256, False), (4, True)):
        l1, g1 = jax.jit(jax.value_and_grad(ours), static_argnums=(1, 2))(params, chunk, remat)
        assert float(l1) > 0
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def small():
    """The 6-token target of test_verify (drafts are often accepted) and a random drafter for it."""
    target, prompt, joint = exact_joint()
    d = build_drafter(Eagle3Config.for_target(VCFG, draft_vocab_size=5, target_layer_ids=(0, 1, 2),
                                              block_size=4), seed=7)
    d.set_vocab_map(*vocab_map(np.array([3, 1, 4, 0, 5, 9]), 5))  # token 3 cannot be drafted
    return target, d, prompt, joint


def test_speculative_greedy_equals_autoregressive(small):
    """A random drafter, and one whose draft vocabulary is the single token the target loops on
    (its chains are accepted whole: every commit path runs)."""
    target, d, _, _ = small
    only5 = build_drafter(Eagle3Config.for_target(VCFG, draft_vocab_size=1, target_layer_ids=(0, 1, 2),
                                                  block_size=4), seed=3)
    only5.set_vocab_map(*vocab_map(np.eye(6)[5], 1))
    prompts = [[1, 4, 2], [3, 3, 1, 2, 5, 0, 1], [2]]
    ar = speculative_generate(target, prompts, method=NoDraft(), max_new_tokens=20, eos_ids=())
    for drafter, k in ((d, 4), (only5, 4)):
        out = speculative_generate(target, prompts, method=Eagle3Draft.of(drafter, block_size=k),
                                   drafter=drafter, max_new_tokens=20, eos_ids=())
        assert out.tokens == ar.tokens
    assert max(a for row in out.acceptance_lengths for a in row) == 4
    # The same drafters as EAGLE-2 dynamic trees (the engine hands the accepted path's tokens to commit).
    for drafter in (d, only5):
        tree = DynamicTreeDraft.around(Eagle3Draft.of(drafter, block_size=4), top_k=2, total_tokens=5)
        out = speculative_generate(target, prompts, method=tree, drafter=drafter, max_new_tokens=20,
                                   eos_ids=())
        assert out.tokens == ar.tokens
    assert max(a for row in out.acceptance_lengths for a in row) == 4


def test_prefill_and_commits_pair_each_positions_features_with_the_next_token(small):
    """After a prefill and two commits (2, then 3 drafts accepted) the drafter's cache holds exactly
    the rows one pass over the sequence gives (features at t with token t+1), and it holds the
    features of the last committed position for the next anchor."""
    target, d, _, _ = small
    state, full, feats = jax.jit(lambda: _commits_and_one_pass(target, d))()
    assert int(state.cache.lengths[0]) == 10  # rows 0..9; 11 tokens committed
    ours, one_pass = state.cache.layers[0], full.layers[0]
    for got, want in ((ours.k, one_pass.k), (ours.v, one_pass.v)):
        np.testing.assert_allclose(got[:, :10], want[:, :10], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.feats_BnD, feats[:, 10])


def _commits_and_one_pass(target, d):
    method = Eagle3Draft.of(d)
    seq = jnp.asarray([[1, 4, 2, 3, 0, 5, 1, 1, 2, 4, 0, 3, 5]])
    hidden = target(seq, jnp.arange(13)[None], hidden_layers=method.hidden_layers).hidden  # [n, 1, 13, D]
    state = method.prefill(d, method.init(d, 1, 24, jnp.float32), hidden[:, :, :4], jnp.array([4]),
                           tokens_BP=seq[:, :4])
    for length, accepted in ((4, 2), (7, 3)):  # the verified block [anchor, 3 drafts] at length..length+3
        state = method.commit(d, state, hidden[:, :, length:length + 4], jnp.array([length]),
                              jnp.array([accepted]), tokens_BQ=seq[:, length:length + 4])
    feats = jnp.transpose(hidden, (1, 2, 0, 3)).reshape(1, 13, -1)
    _, full = d.extend(d.init_cache(1, 24), d.embed(seq[:, 1:11]), d.project(feats[:, :10]),
                       jnp.arange(10)[None], jnp.array([10]))
    return state, full, feats


def test_speculative_sampling_with_eagle3_drafts_preserves_the_target_distribution(small):
    target, d, prompt, joint = small
    n = 6000
    out = speculative_generate(target, [prompt] * n, method=Eagle3Draft.of(d, stochastic=True), drafter=d,
                               max_new_tokens=3, eos_ids=(), sampling=SamplingParams(temperature=1.0),
                               rule="token", key=jax.random.key(5))
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20
    assert_first_three_follow(out.tokens, joint)


def test_tree_protocol_nodes_see_only_their_ancestors(small):
    """tree_start / tree_expand == chained engine steps along each node's own path."""
    target, d, _, _ = small
    jax.jit(lambda: _tree_vs_chains(target, d))()


def _tree_vs_chains(target, d):
    method = Eagle3Draft.of(d)
    prompt = jnp.asarray([[1, 4, 2, 3, 0]])
    lens = jnp.array([5])
    cache = target.init_cache(1, 32)
    out = target(prompt, jnp.arange(5)[None], cache, hidden_layers=method.hidden_layers)
    state = method.prefill(d, method.init(d, 1, 32, jnp.float32), out.hidden, lens, tokens_BP=prompt)
    anchor = jnp.array([2])
    step = StepInputs(anchor, lens, jnp.zeros((1, 40), jnp.int32), lens + 1, out.cache)
    logp0, carry = method.tree_start(d, target, state, step)
    logp1, carry = method.tree_expand(d, target, carry, jnp.array([[4, 1]]), jnp.array([[0, 0]]), 1)
    logp2, carry = method.tree_expand(d, target, carry, jnp.array([[3, 0]]), jnp.array([[1, 0]]), 2)

    def chain(path):  # the rows at L-1, L, ... along one path through the real cache
        cache, feats = state.cache, d.project(state.feats_BnD)[:, None]
        h, cache = d.extend(cache, d.embed(anchor)[:, None], feats, cache.lengths[:, None], cache.lengths + 1)
        got = [jax.nn.log_softmax(d.target_logits(h[:, 0]))]
        for tok in path:
            h, cache = d.extend(cache, d.embed(jnp.array([[tok]])), h, cache.lengths[:, None],
                                cache.lengths + 1)
            got.append(jax.nn.log_softmax(d.target_logits(h[:, 0])))
        return got

    a = chain([1, 3])  # node 1 at depth 1, then its child
    b = chain([4, 0])
    pairs = ((logp0, a[0]), (logp1[:, 1], a[1]), (logp1[:, 0], b[1]), (logp2[:, 0], a[2]),
             (logp2[:, 1], b[2]))
    jax.debug.callback(_check_tree, pairs, logp2)


def _check_tree(pairs, logp2):
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.asarray(logp2[..., 3])).all()  # outside the draft vocabulary


def test_export_is_vllms_layout_and_round_trips_exactly(drafter, tmp_path):
    out = save_drafter(drafter, tmp_path / "e3", target_name="t", target_cfg=CFG)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == W
    assert hf["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in IDS]  # the input of layer i+1
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["d2t"].dtype == np.int64 and tensors["t2d"].dtype == bool
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (32, 64)  # [N*H, 2·D]
    assert tensors["lm_head.weight"].shape == (W, 32)
    assert {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "fc.weight",
            "embed_tokens.weight", "norm.weight"} <= set(tensors)
    kind, _ = find_export(out)
    assert kind.name == "eagle3"
    loaded = load_drafter(out, CFG)
    assert loaded.cfg == drafter.cfg
    for a, c in zip(jax.tree.leaves(nnx.state(drafter)), jax.tree.leaves(nnx.state(loaded)), strict=True):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(CheckpointError, match="does not match the target: .*vocab_size=13"):
        load_drafter(out, VCFG)


def test_an_export_without_embed_tokens_shares_the_targets_embedding(small, tmp_path):
    """A published-style file with no ``embed_tokens`` loads against its target with the target's
    embedding (vLLM shares it too): the same parameters and draft logits as the full file when the
    drafter's embedding is the target's; without a loaded target it is a clear error."""
    from dflash.drafters.eagle3 import EAGLE3

    target = small[0]
    d = EAGLE3.build(Eagle3Config.for_target(VCFG, draft_vocab_size=5, target_layer_ids=(0, 1, 2)), target,
                     seed=5)  # its embedding starts as the target's
    d.set_vocab_map(*vocab_map(np.array([3, 1, 4, 0, 5, 9]), 5))
    full = save_drafter(d, tmp_path / "full", target_cfg=VCFG)
    shared = save_drafter(d, tmp_path / "shared", target_cfg=VCFG)
    tensors = load_file(str(shared / "model.safetensors"))
    del tensors["embed_tokens.weight"]
    save_file(tensors, str(shared / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_drafter(full, target), load_drafter(shared, target)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    toks = jnp.asarray([[1, 4, 2, 5, 0]])
    feats = jnp.asarray(np.random.default_rng(4).normal(size=(1, 5, 96)), jnp.float32)

    def logits(m):
        h, _ = m.extend(m.init_cache(1, 8), m.embed(toks), m.project(feats), jnp.arange(5)[None],
                        jnp.asarray([5]))
        return m.target_logits(h)

    np.testing.assert_array_equal(jax.jit(lambda: logits(a))(), jax.jit(lambda: logits(b))())
    with pytest.raises(ConfigError, match="no 'embed_tokens.weight'.*against a loaded target"):
        load_drafter(shared, VCFG)


def test_dflash_train_method_eagle3_end_to_end(tiny_target, tmp_path, capsys):
    """``configs/tiny_code_eagle3.yaml`` shrunk: train (the vocabulary fitted to the data), export,
    decode losslessly through resolve_method and ``dflash-generate --drafter DIR``."""
    from dflash.cli.generate import main as generate_main
    from dflash.configio import load_yaml
    from dflash.drafters import resolve_method
    from dflash.io import load_target
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    run = tmp_path / "run"
    cfg = load_yaml(ExperimentConfig, ROOT / "configs/tiny_code_eagle3.yaml", [
        f"target.name={tiny_target}", f"run_dir={run}", "data.max_examples=40", "data.seq_len=64",
        "train.batch_size=2", "train.steps=2", "train.eval_every=2", "train.save_every=2",
        "drafter.draft_vocab_size=512", "drafter.ttt_steps=3", "drafter.block_size=4", "eval.num_prompts=1",
        "eval.max_new_tokens=8", "eval.heldout_rows=2", "regen.num_sequences=0"])
    result = run_training(cfg, progress=False)
    assert result["method"] == "eagle3" and result["final_eval"]["tau_sim"] >= 1.0
    target = load_target(tiny_target)
    method, drafter = resolve_method(str(run / "export"), target)
    assert isinstance(method, Eagle3Draft) and method.block_size == 4 and drafter.cfg.ttt_steps == 3
    t2d = np.asarray(drafter.t2d[...])
    assert t2d.sum() == 512 and not t2d.all()  # fitted to the data, not the first 512 ids
    capsys.readouterr()
    args = ["--target", str(tiny_target), "--prompt", "def f(x):\n", "--max-new-tokens", "12", "--json"]
    assert generate_main(args) == 0
    ar = json.loads(capsys.readouterr().out)
    assert generate_main([*args, "--drafter", str(run / "export")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ar["tokens"]


def test_qwen3_8b_preset_is_specforges_recipe():
    """configs/qwen3_8b_eagle3.yaml builds abstractly to the published drafter's shapes
    (SpecForge's configs/qwen3-8b-eagle3.json) and recipe; vLLM's aux ids 2, 18, 33."""
    from dflash.config import preset_for_hub_id
    from dflash.configio import load_yaml
    from dflash.drafters import drafter_kind
    from dflash.drafters.eagle3.hf import hf_config
    from dflash.training.config import ExperimentConfig

    cfg = load_yaml(ExperimentConfig, ROOT / "configs/qwen3_8b_eagle3.yaml")
    assert (cfg.optim.lr, cfg.optim.clip_norm, cfg.train.epochs, cfg.data.seq_len) == (1e-4, 0.5, 10, 4096)
    kind = drafter_kind(cfg.method)
    dcfg = kind.config(cfg.drafter, preset_for_hub_id(cfg.target.name), mask_token_id=0,
                       block_size=cfg.block_size)
    hf = hf_config(dcfg)
    published = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "draft_vocab_size": 32000,
                 "rope_theta": 1000000, "rms_norm_eps": 1e-6, "num_hidden_layers": 1}
    assert {k: hf[k] for k in published} == published
    assert hf["eagle_aux_hidden_state_layer_ids"] == [2, 18, 33] and dcfg.ttt_steps == 7
    shapes = kind.abstract(dcfg)
    assert shapes.layers[0].self_attn.q_proj.kernel.shape == (8192, 4096)
    assert shapes.lm_head.kernel.shape == (4096, 32000) and shapes.fc.kernel.shape == (3 * 4096, 4096)
