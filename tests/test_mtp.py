"""MTP heads: a hybrid target's own ``mtp.*`` head (written into a transformers checkpoint in the
HF layout) loads and equals a reference built from transformers' own decoder layer and the MTP
equations; the engine's cached chain and dynamic-tree steps equal uncached recomputation;
speculative decoding with it is lossless (greedy == AR, sampling by chi-square); a head trained
here exports and re-imports identically (docs/design.md, "MTP heads")."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_hybrid import _hf_model
from test_verify import CFG, VOCAB, assert_first_three_follow, exact_joint

from dflash.decoding import generate
from dflash.decoding.method import StepInputs
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import find_export, load_drafter, method_for
from dflash.drafters.mtp import MTPConfig, MTPDraft, build_head, mtp_rows
from dflash.errors import CheckpointError
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
    nnx.update(head, jax.tree.map(lambda p: 0.2 * jax.random.normal(next(keys), p.shape, p.dtype),
                                  nnx.state(head, nnx.Param)))
    save_params(head, mtp_rows(head.cfg), path / "mtp.safetensors")
    full = path / "full"
    hf.save_pretrained(full)
    file = full / "model.safetensors"
    save_file({**load_file(file), **load_file(path / "mtp.safetensors")}, file, metadata={"format": "pt"})
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return hf, path


def _reference_logits(hf, mtp: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The MTP equations in torch on transformers' own full-attention layer: position t reads the
    target's final-normed hidden h_t and the embedding of token t+1 -> logits of token t+2."""
    t = torch.from_numpy
    model = hf.model
    layer = copy.deepcopy(model.layers[FULL_LAYER])
    prefix = "mtp.layers.0."
    tensors = {k[len(prefix):]: t(v) for k, v in mtp.items() if k.startswith(prefix)}
    experts = hf.config.num_experts  # transformers 5 holds the experts fused: gate and up side by side
    one = "mlp.experts.{}.{}_proj.weight".format
    tensors["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([tensors.pop(one(e, "gate")), tensors.pop(one(e, "up"))]) for e in range(experts)])
    tensors["mlp.experts.down_proj"] = torch.stack([tensors.pop(one(e, "down")) for e in range(experts)])
    layer.load_state_dict(tensors)
    eps = hf.config.rms_norm_eps

    def norm(x, w):  # zero-centred RMSNorm (Qwen3-Next)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)

    with torch.no_grad():
        ids_t = t(ids)
        h = model(ids_t).last_hidden_state[:, :-1]  # after the final norm
        e = model.embed_tokens(ids_t[:, 1:])
        x = torch.cat([norm(e, t(mtp["mtp.pre_fc_norm_embedding.weight"])),
                       norm(h, t(mtp["mtp.pre_fc_norm_hidden.weight"]))], -1) @ t(mtp["mtp.fc.weight"]).T
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        y = layer(x, position_embeddings=model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        return hf.lm_head(norm(y, t(mtp["mtp.norm.weight"]))).numpy()


def test_a_targets_own_mtp_head_loads_and_equals_the_equations(next_ckpt):
    """``--drafter DIR`` and ``mtp:DIR`` find the head in the target's checkpoint; its logits equal
    the reference; a checkpoint without ``mtp.*`` tensors is refused naming them."""
    hf, path = next_ckpt
    target = load_target(path / "full")
    assert find_export(path / "full")[0].name == find_export(f"mtp:{path / 'full'}")[0].name == "mtp"
    head = load_drafter(path / "full", target)
    ids = np.random.default_rng(3).integers(0, 101, size=(2, 13))
    pos = jnp.broadcast_to(jnp.arange(13), ids.shape)
    out = target(jnp.asarray(ids), pos, hidden_layers=(INPUT_EMBEDDINGS, FINAL_NORMED))
    x = head.inputs(out.hidden[0][:, 1:], out.hidden[1][:, :-1])
    y, _ = head(x, pos[:, :-1], None)
    got = np.asarray(target.unembed(y))
    want = _reference_logits(hf, load_file(path / "mtp.safetensors"), ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    with pytest.raises(CheckpointError, match=r"no MTP head.*mtp\.fc\.weight"):
        load_drafter(f"mtp:{path / 'plain'}", target)


def _committed_state(method: MTPDraft, head, target, prompt: list[int], block: list[int], accepted: int):
    """The method's state after the prompt's prefill and one verified block with ``accepted`` drafts,
    through the engine's own calls (the target's hidden states as the engine asks for them)."""
    p = len(prompt)
    cache = target.init_cache(1, 64)
    ids = jnp.asarray([prompt])
    out = target(ids, jnp.arange(p)[None], cache, hidden_layers=method.hidden_layers)
    state = method.prefill(head, method.init(head, 1, 64, jnp.float32), out.hidden, jnp.asarray([p]))
    cache = out.cache.keep(jnp.asarray([p]), p)
    out = target(jnp.asarray([block]), p + jnp.arange(len(block))[None], cache, hidden_layers=method.hidden_layers)
    return method.commit(head, state, out.hidden, jnp.asarray([p]), jnp.asarray([accepted]))


def _uncached_chain(head, target, seq: list[int], anchor_and_path: list[int]) -> np.ndarray:
    """Log-probabilities after each of ``anchor_and_path`` by recomputation without a cache: the
    committed pairs (h_t, token t+1) and then the chain (previous output, previous token)."""
    ids = jnp.asarray([seq])
    out = target(ids, jnp.arange(len(seq))[None], hidden_layers=(INPUT_EMBEDDINGS, FINAL_NORMED))
    emb_next = target.embed(jnp.asarray([seq[1:] + anchor_and_path[:1]]))
    xs = head.inputs(emb_next, out.hidden[1])  # positions 0 .. len(seq)-1
    logps = []
    for i, tok in enumerate(anchor_and_path):
        y, _ = head(xs, jnp.arange(xs.shape[1])[None], None)
        logps.append(jax.nn.log_softmax(target.unembed(y[:, -1]), -1)[0])
        if i + 1 < len(anchor_and_path):
            xs = jnp.concatenate([xs, head.inputs(target.embed(jnp.asarray([[anchor_and_path[i + 1]]])),
                                                  y[:, -1:])], axis=1)
    return np.asarray(jnp.stack(logps))


def test_cached_chain_and_tree_steps_equal_recomputation(next_ckpt):
    """After prefill + a verified block (2 of 3 drafts accepted), the chain's drafts, tree_start and
    two depths of tree_expand equal recomputing the head over the committed text without a cache."""
    _, path = next_ckpt
    target = load_target(path / "full")
    head = load_drafter(path / "full", target)
    method = method_for(head, block_size=4)
    prompt, block, accepted = [5, 9, 2, 77, 31], [40, 8, 63, 12], 2
    state = _committed_state(method, head, target, prompt, block, accepted)
    committed = prompt + block[:accepted + 1]
    anchor = 55  # the bonus token the verify step chose
    step = StepInputs(jnp.asarray([anchor]), jnp.asarray([len(committed)]), None, None, None)
    drafts, q = method.propose(head, target, state, step, jax.random.key(0), SamplingParams())
    ref = _uncached_chain(head, target, committed, [anchor, *np.asarray(drafts)[0].tolist()])
    assert q is None and np.asarray(drafts)[0].tolist() == ref[:3].argmax(-1).tolist()
    logp, carry = method.tree_start(head, target, state, step)
    np.testing.assert_allclose(np.asarray(logp[0]), ref[0], atol=1e-4)
    tops = [int(t) for t in np.argsort(-ref[0])[:2]]  # two children of the root, then two under child 1
    logp1, carry = method.tree_expand(head, target, carry, jnp.asarray([tops]), jnp.zeros((1, 2), jnp.int32), 1)
    kids = [3, 17]
    logp2, _ = method.tree_expand(head, target, carry, jnp.asarray([kids]), jnp.asarray([[1, 1]]), 2)
    for j, tok in enumerate(tops):
        np.testing.assert_allclose(np.asarray(logp1[0, j]), _uncached_chain(head, target, committed,
                                                                            [anchor, tok])[-1], atol=1e-4)
    for j, tok in enumerate(kids):
        np.testing.assert_allclose(np.asarray(logp2[0, j]), _uncached_chain(head, target, committed,
                                                                            [anchor, tops[1], tok])[-1], atol=1e-4)


def test_speculative_greedy_with_the_targets_mtp_head_equals_ar(next_ckpt):
    _, path = next_ckpt
    target = load_target(path / "full")
    head = load_drafter(f"mtp:{path / 'full'}", target)
    prompts = [[3, 9, 4], [7, 1, 2, 8, 8, 5, 40, 11, 6, 2, 9]]
    ar = generate(target, prompts, max_new_tokens=20, eos_ids=())
    spec = speculative_generate(target, prompts, method=method_for(head, block_size=3), drafter=head,
                                max_new_tokens=20, eos_ids=())
    assert spec.tokens == ar.tokens


def test_speculative_sampling_with_an_mtp_head_preserves_the_target_distribution():
    """Chi-square on the first three sampled tokens (test_verify's exact joint), drafts sampled
    from a random head's own distribution through two chained steps."""
    target, prompt, joint = exact_joint()
    head = build_head(MTPConfig.for_target(CFG, block_size=3), seed=2)
    head.fc.kernel[...] = head.fc.kernel[...] * 5.0  # a head far from uniform
    method = MTPDraft.of(head, stochastic=True)
    n = 6000
    out = speculative_generate(target, [prompt] * n, method=method, drafter=head, max_new_tokens=3, eos_ids=(),
                               sampling=SamplingParams(temperature=1.0), rule="token", key=jax.random.key(5))
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20
    assert_first_three_follow(out.tokens, joint)
    assert VOCAB == joint.shape[0] and dataclasses.is_dataclass(method)
