"""MTP heads: a hybrid target's own ``mtp.*`` head (written into a transformers checkpoint in the
HF layout) loads and equals a reference built from transformers' own decoder layer and the MTP
equations; the engine's cached chain and dynamic-tree steps equal uncached recomputation;
speculative decoding with it is lossless (greedy == AR, sampling by chi-square); a head trained
here exports and re-imports identically (docs/design.md, "MTP heads")."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_hybrid import _hf_model
from test_verify import CFG, VOCAB, assert_first_three_follow, exact_joint

from dflash.decoding import generate
from dflash.decoding.method import StepInputs
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import dynamic_tree_method_for, find_export, load_drafter, method_for
from dflash.drafters.mtp import MTPConfig, MTPDraft, build_head, mtp_rows
from dflash.errors import CheckpointError, ConfigError
from dflash.io import load_target
from dflash.io.loading import save_params
from dflash.models.transformer import FINAL_NORMED, INPUT_EMBEDDINGS

FULL_LAYER = 2  # the tiny Qwen3-Next's full-attention layer (experts + shared expert, as MTP layer 0's rule)


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    """A tiny Qwen3-Next checkpoint from ``save_pretrained`` with a random MTP head added in the HF
    layout (``mtp.*`` in model.safetensors, ``num_nextn_predict_layers`` in config.json)."""
    from flax import nnx

    path = tmp_path_factory.mktemp("qwen3_next")
    hf = _hf_model("qwen3_next")
    hf.save_pretrained(path / "plain")
    target = load_target(path / "plain")
    head = build_head(MTPConfig.for_target(target.cfg), seed=4)
    keys = iter(jax.random.split(jax.random.key(7), 256))
    nnx.update(
        head,
        jax.tree.map(
            lambda p: 0.2 * jax.random.normal(next(keys), p.shape, p.dtype), nnx.state(head, nnx.Param)
        ),
    )
    save_params(head, mtp_rows(head.cfg), path / "mtp.safetensors")
    full = path / "full"
    hf.save_pretrained(full)
    file = full / "model.safetensors"
    save_file({**load_file(file), **load_file(path / "mtp.safetensors")}, file, metadata={"format": "pt"})
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    target = load_target(full)
    return hf, path, target, load_drafter(full, target)


def _reference_logits(hf, mtp: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The MTP equations in torch on transformers' own full-attention layer: position t reads the
    target's final-normed hidden h_t and the embedding of token t+1 -> logits of token t+2."""
    t = torch.from_numpy
    model = hf.model
    layer = copy.deepcopy(model.layers[FULL_LAYER])
    prefix = "mtp.layers.0."
    tensors = {k[len(prefix) :]: t(v) for k, v in mtp.items() if k.startswith(prefix)}
    experts = hf.config.num_experts  # transformers 5 holds the experts fused: gate and up side by side
    one = "mlp.experts.{}.{}_proj.weight".format
    tensors["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([tensors.pop(one(e, "gate")), tensors.pop(one(e, "up"))]) for e in range(experts)]
    )
    tensors["mlp.experts.down_proj"] = torch.stack([tensors.pop(one(e, "down")) for e in range(experts)])
    layer.load_state_dict(tensors)
    eps = hf.config.rms_norm_eps

    def norm(x, w):  # zero-centred RMSNorm (Qwen3-Next)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)

    with torch.no_grad():
        ids_t = t(ids)
        h = model(ids_t).last_hidden_state[:, :-1]  # after the final norm
        e = model.embed_tokens(ids_t[:, 1:])
        x = (
            torch.cat(
                [
                    norm(e, t(mtp["mtp.pre_fc_norm_embedding.weight"])),
                    norm(h, t(mtp["mtp.pre_fc_norm_hidden.weight"])),
                ],
                -1,
            )
            @ t(mtp["mtp.fc.weight"]).T
        )
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        y = layer(x, position_embeddings=model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        return hf.lm_head(norm(y, t(mtp["mtp.norm.weight"]))).numpy()


def test_a_targets_own_mtp_head_loads_and_equals_the_equations(next_ckpt):
    """``--drafter DIR`` and ``mtp:DIR`` find the head in the target's checkpoint; its logits equal
    the reference; a checkpoint without ``mtp.*`` tensors is refused naming them."""
    hf, path, target, _ = next_ckpt
    assert find_export(path / "full")[0].name == find_export(f"mtp:{path / 'full'}")[0].name == "mtp"
    head = load_drafter(path / "full", target)
    ids = np.random.default_rng(3).integers(0, 101, size=(2, 13))
    pos = jnp.broadcast_to(jnp.arange(13), ids.shape)

    def ours():
        out = target(jnp.asarray(ids), pos, hidden_layers=(INPUT_EMBEDDINGS, FINAL_NORMED))
        x = head.inputs(out.hidden[0][:, 1:], out.hidden[1][:, :-1])
        return target.unembed(head(x, pos[:, :-1], None)[0])

    got = np.asarray(_once(ours))
    want = _reference_logits(hf, load_file(path / "mtp.safetensors"), ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    with pytest.raises(CheckpointError, match=r"no MTP head.*mtp\.fc\.weight"):
        load_drafter(f"mtp:{path / 'plain'}", target)


def _draft_logits(target, head, ids: np.ndarray) -> jax.Array:
    """One MTP step at every position of ``ids``: logits of token t+2 from h_t and token t+1."""
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    out = target(jnp.asarray(ids), pos, hidden_layers=(INPUT_EMBEDDINGS, FINAL_NORMED))
    x = head.inputs(out.hidden[0][:, 1:], out.hidden[1][:, :-1])
    return target.unembed(head(x, pos[:, :-1], None)[0])


def _same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_head_exports_into_its_targets_checkpoint_as_vllm_serves_it(next_ckpt, tmp_path):
    """``--form full``: the target's files linked (not copied), its config.json with the head's depth
    under the key vLLM reads (Qwen3-Next: top level; a Qwen3.5 wrapper: text_config), the head in
    mtp.safetensors under the target's mtp.* names, one index over both; the directory reads back as
    the same target and (``mtp:DIR``, or found by its config) the same head with the same draft
    logits. A dense target (vLLM has no MTP model for it) and one that ships a head are refused."""
    from test_hybrid import _hf_model

    from dflash.drafters.mtp import MTP
    from dflash.drafters.mtp.hf import HEAD_FILE, INDEX
    from dflash.io.loading import read_config, resolve

    _, path, target, head = next_ckpt
    plain, out = path / "plain", tmp_path / "next"
    MTP.save(head, None, target.cfg, out, target_name=str(plain), form="full")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["architectures"] == ["Qwen3NextForCausalLM"]
    assert os.path.samefile(out / "model.safetensors", plain / "model.safetensors")
    index = json.loads((out / INDEX).read_text())["weight_map"]
    head_keys = {k for row in mtp_rows(head.cfg) for k in row.hf_keys()}
    assert {k for k, f in index.items() if f == HEAD_FILE} == head_keys == set(load_file(out / HEAD_FILE))
    assert {k: f for k, f in index.items() if f != HEAD_FILE} == dict.fromkeys(
        load_file(plain / "model.safetensors"), "model.safetensors")
    _same_params(load_target(out), target)
    again = load_drafter(f"mtp:{out}", target)
    assert again.cfg == head.cfg
    _same_params(again, head)
    ids = np.random.default_rng(5).integers(0, 101, size=(2, 9))
    np.testing.assert_array_equal(_once(lambda: _draft_logits(target, again, ids)),
                                  _once(lambda: _draft_logits(target, head, ids)))

    _hf_model("qwen3_5").save_pretrained(tmp_path / "q35")  # the published multimodal wrapper
    q35 = read_config(tmp_path / "q35")
    h35 = build_head(MTPConfig.for_target(q35, block_size=3), seed=2)
    MTP.save(h35, None, q35, tmp_path / "o35", target_name=str(tmp_path / "q35"), form="full")
    cfg = json.loads((tmp_path / "o35" / "config.json").read_text())
    assert cfg["text_config"]["mtp_num_hidden_layers"] == 1 and "mtp_num_hidden_layers" not in cfg
    loaded = load_drafter(tmp_path / "o35", q35)
    assert loaded.cfg == h35.cfg
    _same_params(loaded, h35)

    with pytest.raises(ConfigError, match="only from a Qwen3-Next / Qwen3.5 checkpoint.*'qwen3'"):
        MTP.save(head, None, target.cfg, tmp_path / "dense", target_name="tiny-code", form="full")
    assert "vLLM has no MTP architecture for 'qwen3'" in MTP.export_note(resolve("tiny-code"), out, "delta")
    with pytest.raises(ConfigError, match="already ships an MTP head"):
        MTP.save(head, None, target.cfg, tmp_path / "twice", target_name=str(path / "full"), form="full")


def _once(fn):
    """``fn()`` as one compiled program (modules closed over as constants): eager, every op of new
    shapes would compile on its own."""
    return jax.jit(fn)()


def _committed_state(method: MTPDraft, head, target, prompt: list[int], block: list[int], accepted: int):
    """The method's state after the prompt's prefill and one verified block with ``accepted`` drafts,
    through the engine's own calls (the target's hidden states as the engine asks for them)."""
    p = len(prompt)
    cache = target.init_cache(1, 64)
    ids = jnp.asarray([prompt])
    out = target(ids, jnp.arange(p)[None], cache, hidden_layers=method.hidden_layers)
    state = method.prefill(head, method.init(head, 1, 64, jnp.float32), out.hidden, jnp.asarray([p]))
    cache = out.cache.keep(jnp.asarray([p]), p)
    out = target(
        jnp.asarray([block]), p + jnp.arange(len(block))[None], cache, hidden_layers=method.hidden_layers
    )
    return method.commit(head, state, out.hidden, jnp.asarray([p]), jnp.asarray([accepted]))


def _uncached_chain(
    head, target, seq: list[int], hidden_1SD: jax.Array, anchor_and_path: list[int]
) -> np.ndarray:
    """Log-probabilities after each of ``anchor_and_path`` by recomputation without a cache: the
    committed pairs (h_t, token t+1; ``hidden``: the target's final-normed states of ``seq``) and
    then the chain (previous output, previous token)."""
    emb_next = target.embed(jnp.asarray([seq[1:] + anchor_and_path[:1]]))
    xs = head.inputs(emb_next, hidden_1SD)  # positions 0 .. len(seq)-1
    logps = []
    for i in range(len(anchor_and_path)):
        y, _ = head(xs, jnp.arange(xs.shape[1])[None], None)
        logps.append(jax.nn.log_softmax(target.unembed(y[:, -1]), -1)[0])
        if i + 1 < len(anchor_and_path):
            xs = jnp.concatenate(
                [xs, head.inputs(target.embed(jnp.asarray([[anchor_and_path[i + 1]]])), y[:, -1:])], axis=1
            )
    return jnp.stack(logps)


def test_cached_chain_and_tree_steps_equal_recomputation():
    """After prefill + a verified block (2 of 3 drafts accepted), the chain's drafts, tree_start and
    two depths of tree_expand equal recomputing the head over the committed text without a cache
    (a dense target: the head's cache does not depend on the target's layer kinds)."""
    from dflash.models import build

    target = build(dataclasses.replace(CFG, vocab_size=101), seed=3)
    head = build_head(MTPConfig.for_target(target.cfg), seed=6)
    head.fc.kernel[...] = head.fc.kernel[...] * 4.0  # distinct log-probabilities, far from uniform
    method = method_for(head, block_size=4)
    prompt, block, accepted = [5, 9, 2, 77, 31], [40, 8, 63, 12], 2
    state = _once(lambda: _committed_state(method, head, target, prompt, block, accepted))
    committed = prompt + block[: accepted + 1]
    anchor = 55  # the bonus token the verify step chose
    step = StepInputs(jnp.asarray([anchor]), jnp.asarray([len(committed)]), None, None, None)
    drafts, q = _once(lambda: method.propose(head, target, state, step, jax.random.key(0), SamplingParams()))
    hidden = target(
        jnp.asarray([committed]), jnp.arange(len(committed))[None], hidden_layers=(FINAL_NORMED,)
    ).hidden[0]
    ref = _once(
        lambda: _uncached_chain(
            head, target, committed, hidden, [anchor, *np.asarray(drafts)[0, :2].tolist()]
        )
    )
    assert q is None and np.asarray(drafts)[0].tolist() == ref[:3].argmax(-1).tolist()
    logp, carry = _once(lambda: method.tree_start(head, target, state, step))
    np.testing.assert_allclose(np.asarray(logp[0]), ref[0], atol=1e-4)
    # Depth 1: the chain's first draft and another child of the root; depth 2: the chain's second
    # draft under the first, and a token under the other (parents [0, 1]).
    d1, d2 = np.asarray(drafts)[0, :2].tolist()
    other, x = int(np.argsort(-ref[0])[1]), 17  # the root's second most likely child
    other_ref = _once(lambda: _uncached_chain(head, target, committed, hidden, [anchor, other, x]))
    nodes1, root = jnp.asarray([[d1, other]]), jnp.zeros((1, 2), jnp.int32)
    logp1, carry = _once(lambda: method.tree_expand(head, target, carry, nodes1, root, 1))
    logp2, _ = _once(
        lambda: method.tree_expand(head, target, carry, jnp.asarray([[d2, x]]), jnp.asarray([[0, 1]]), 2)
    )
    for got, want in (
        (logp1[0, 0], ref[1]),
        (logp1[0, 1], other_ref[1]),
        (logp2[0, 0], ref[2]),
        (logp2[0, 1], other_ref[2]),
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_speculative_greedy_with_the_targets_mtp_head_equals_ar(next_ckpt):
    _, path, target, _ = next_ckpt
    head = load_drafter(f"mtp:{path / 'full'}", target)
    prompts = [[3, 9, 4], [7, 1, 2, 8, 8, 5, 40, 11, 6, 2, 9]]
    ar = generate(target, prompts, max_new_tokens=20, eos_ids=())
    spec = speculative_generate(
        target, prompts, method=method_for(head, block_size=3), drafter=head, max_new_tokens=20, eos_ids=()
    )
    assert spec.tokens == ar.tokens


def test_speculative_sampling_with_an_mtp_head_preserves_the_target_distribution():
    """Chi-square on the first three sampled tokens (test_verify's exact joint), drafts sampled
    from a random head's own distribution through two chained steps."""
    target, prompt, joint = exact_joint()
    head = build_head(MTPConfig.for_target(CFG, block_size=3), seed=2)
    head.fc.kernel[...] = head.fc.kernel[...] * 5.0  # a head far from uniform
    method = MTPDraft.of(head, stochastic=True)
    n = 4000
    out = speculative_generate(
        target,
        [prompt] * n,
        method=method,
        drafter=head,
        max_new_tokens=3,
        eos_ids=(),
        sampling=SamplingParams(temperature=1.0),
        rule="token",
        key=jax.random.key(5),
    )
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20
    assert_first_three_follow(out.tokens, joint)


# ----------------------------------------------------------------------------- a head trained here
def _packed_batch() -> dict[str, jax.Array]:
    """Two packed rows: two documents (7 + 5 tokens), and one of 9 tokens then padding."""
    rng = np.random.default_rng(8)
    seg = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
    pos = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
    tokens = np.where(seg > 0, rng.integers(1, VOCAB, size=seg.shape), 0).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
        "loss_mask": jnp.asarray(seg > 0),
    }


def _depth_logps(head, target, doc_1T: jax.Array, k: int) -> jax.Array:
    """``[k, T, V]``: one document alone, depth j's log-probabilities at each position i (of token
    i+j+1), each depth from the previous one's outputs and the embedding of token i+j."""
    t = doc_1T.shape[1]
    hid = target(doc_1T, jnp.arange(t)[None], hidden_layers=(FINAL_NORMED,)).hidden[0]
    emb, logp = target.embed(doc_1T), []
    for j in range(1, k + 1):
        hid, _ = head(
            head.inputs(jnp.pad(emb[:, j:], ((0, 0), (0, j), (0, 0))), hid), jnp.arange(t)[None], None
        )
        logp.append(jax.nn.log_softmax(target.unembed(hid)[0], -1))
    return jnp.stack(logp)


def test_the_chained_training_loss_equals_a_per_document_unrolled_reference():
    """The DeepSeek-V3 objective, chained 3 deep over packed rows == each document on its own:
    depth j at position i reads depth j-1's output there and token i+j, CE against token i+j+1,
    weighted w_j over the sampled anchors (a = i+1)."""
    from dflash.drafters import blocks as blk
    from dflash.drafters.mtp import MTP
    from dflash.drafters.objective import loss_weights
    from dflash.models import build

    target = build(CFG, seed=3)
    head = build_head(MTPConfig.for_target(CFG, block_size=4), seed=1)
    batch, key, k, gamma = _packed_batch(), jax.random.key(4), 3, 2.0
    kw = dict(num_anchors=12, gamma=gamma, ce_weight=1.0, kl_weight=0.0, target_metrics=False)
    loss, metrics = _once(lambda: MTP.loss(head, target, batch, key, **kw))
    anchors = np.asarray(blk.anchor_blocks(target, batch, key, 12, k + 1, 0).label_idx[:, :, 0] - 1)
    valid = np.asarray(blk.anchor_blocks(target, batch, key, 12, k + 1, 0).valid)
    w, tokens, seg = (
        np.asarray(loss_weights(k + 1, gamma)),
        np.asarray(batch["tokens"]),
        np.asarray(batch["segment_ids"]),
    )
    num = den = 0.0
    for row in range(2):
        for doc in (1, 2):
            where = np.flatnonzero(seg[row] == doc)
            if not where.size:
                continue
            start, doc_tok = where[0], jnp.asarray(tokens[row, where])[None]
            t = doc_tok.shape[1]
            logp = np.asarray(_once(lambda doc_tok=doc_tok, t=t: _depth_logps(head, target, doc_tok, k)))
            for a in anchors[row][valid[row]]:
                i = a - 1 - start
                for j in range(1, k + 1):
                    if i >= 0 and a + j - start < t:
                        num += w[j - 1] * -logp[j - 1][i, tokens[row, a + j]]
                        den += w[j - 1]
    assert den > 0
    np.testing.assert_allclose(float(metrics["ce"]), num / den, rtol=1e-5)
    np.testing.assert_allclose(float(loss), num / den, rtol=1e-5)


def test_dflash_train_trains_an_mtp_head_that_exports_and_reimports_identically(tmp_path):
    """configs/tiny_code_mtp.yaml for two steps through the trainer; its export is the mtp.* layout
    (config.json naming the target) and re-imports to the same parameters and the same drafts."""
    from conftest import make_tiny_target
    from flax import nnx

    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    target_dir = make_tiny_target(tmp_path / "target")
    cfg = load_yaml(
        ExperimentConfig,
        root / "configs/tiny_code_mtp.yaml",
        [
            f"target.name={target_dir}",
            f"run_dir={tmp_path / 'r'}",
            "data.max_examples=24",
            "data.seq_len=64",
            "train.batch_size=2",
            "train.num_anchors=32",
            "train.steps=2",
            "train.save_every=2",
            "train.eval_every=2",
            "train.log_every=1",
            "drafter.block_size=3",
            "eval.num_prompts=1",
            "eval.max_new_tokens=6",
            "eval.heldout_rows=2",
            "regen.num_sequences=0",
        ],
    )
    result = run_training(cfg, progress=False)
    export = tmp_path / "r" / "export"
    hf = json.loads((export / "config.json").read_text())
    assert hf["architectures"] == ["MTPDraftModel"] and hf["dflash_mtp_target"] == str(target_dir)
    assert set(load_file(export / "model.safetensors")) == {
        row.hf for row in mtp_rows(MTPConfig.for_target(load_target(target_dir).cfg))
    }
    assert result["tau"] >= 1.0
    target = load_target(target_dir)
    head = load_drafter(export, target)
    assert head.cfg.block_size == 3
    from dflash.drafters.mtp import MTP

    MTP.save(head, target, target.cfg, tmp_path / "again", target_name=str(target_dir))
    again = load_drafter(tmp_path / "again", target)
    for a, b in zip(
        jax.tree.leaves(nnx.state(head, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = [[5, 6, 7, 8, 9]]
    one = speculative_generate(
        target, prompts, method=method_for(head), drafter=head, max_new_tokens=8, eos_ids=()
    )
    two = speculative_generate(
        target, prompts, method=method_for(again), drafter=again, max_new_tokens=8, eos_ids=()
    )
    assert one.tokens == two.tokens and one.acceptance_lengths == two.acceptance_lengths
    ar = generate(target, prompts, max_new_tokens=8, eos_ids=())
    tree = dynamic_tree_method_for(head, depth=2, top_k=3, total_tokens=5)  # the head as an EAGLE-2 tree
    three = speculative_generate(target, prompts, method=tree, drafter=head, max_new_tokens=8, eos_ids=())
    assert one.tokens == ar.tokens and three.tokens == ar.tokens
    # dflash-export says what the head's export is for a dense target, and refuses vLLM's layout
    from dflash.export.from_run import export_checkpoint

    info = export_checkpoint(tmp_path / "ex", run_dir=tmp_path / "r")
    assert "vLLM has no MTP architecture for 'qwen3'" in info["note"]
    with pytest.raises(ConfigError, match="only from a Qwen3-Next / Qwen3.5 checkpoint"):
        export_checkpoint(tmp_path / "ex_full", run_dir=tmp_path / "r", form="full")
