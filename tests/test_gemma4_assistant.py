"""Gemma 4 MTP assistants (``Gemma4AssistantForCausalLM``) against ``transformers``: tiny random
assistants (plain LM head and centroid-masked head) saved with ``save_pretrained`` load as the
``gemma4_assistant`` drafter kind; their logits and projected hidden states for given inputs and a
given target KV equal transformers' forward; the engine's steps draft what transformers' drafting
recipe drafts; speculative decoding with them over a tiny Gemma 4 target (KV-shared layers,
per-layer inputs, sliding window shorter than the prompt) equals the target's greedy tokens,
through ``dflash-generate --target DIR --drafter DIR``; sampling keeps the target's distribution.
Trained here (``method: gemma4_assistant``): the training chain at an anchor equals the engine's
steps, the loss an unrolled per-document reference; an export is the ``save_pretrained`` layout
(a published assistant exported again gives its own tensors back; transformers' forward of an
export equals ours); a ``dflash-train`` run on a tiny target drafts losslessly.

``transformers==5.23.0`` (our pin) cannot build an assistant: ``Gemma4TextConfig.kv_sharing_modes``
raises when every layer is shared, which an assistant's are (fixed in 5.25.0). The fixture patches
exactly that property, for the test only, to what an all-shared model needs: every layer ``"reuse"``
(no layer computes or stores keys and values). The forward compared against is transformers' own."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from devices import on_cpu_devices
from test_verify import assert_first_three_follow, exact_joint

from dflash.config import ModelConfig
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import drafter_kind, find_export, load_drafter, method_for
from dflash.drafters.gemma4_assistant import AssistantConfig, AssistantDraft, build_assistant
from dflash.errors import ConfigError
from dflash.io import load_target
from dflash.io.loading import SHIPPED

S, F = "sliding_attention", "full_attention"
HEADS = dict(
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=3,
    max_position_embeddings=256,
)
TARGET = dict(
    vocab_size=4096,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    layer_types=[S, F, S, F],
    num_kv_shared_layers=2,
    final_logit_softcapping=3.0,
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=4096,
    tie_word_embeddings=True,
    **HEADS,
)
ASSISTANT = dict(
    vocab_size=4096,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    layer_types=[S, F],
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    **HEADS,
)
CENTROIDS = dict(use_ordered_embeddings=True, num_centroids=64, centroid_intermediate_top_k=4)


def _all_shared_modes(self) -> list[str | None]:
    """``kv_sharing_modes`` for a model whose every layer is shared (transformers 5.25's behaviour);
    otherwise 5.23's own."""
    if self.num_kv_shared_layers == self.num_hidden_layers:
        return ["reuse"] * self.num_hidden_layers
    return ORIGINAL_MODES.fget(self)


ORIGINAL_MODES = transformers.Gemma4TextConfig.kv_sharing_modes


def _randomise(model: torch.nn.Module) -> None:
    """Norms and scalars away from their identity init, so every weight counts."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.7)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny target and two assistants (plain head; centroid head with a random token ordering),
    fp32, eval, saved with ``save_pretrained`` (the target with the shipped tokenizer)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gemma4_assistant")
    target = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**TARGET)).eval()
    _randomise(target)
    target.save_pretrained(root / "target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, root / "target" / name)
    assistants = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Gemma4TextConfig, "kv_sharing_modes", property(_all_shared_modes))
        for name, extra in (("plain", {}), ("centroids", CENTROIDS)):
            cfg = transformers.Gemma4AssistantConfig(
                text_config=transformers.Gemma4TextConfig(**ASSISTANT), backbone_hidden_size=32, **extra
            )
            model = transformers.Gemma4AssistantForCausalLM(cfg).eval()
            _randomise(model)
            if extra:
                model.masked_embedding.token_ordering.copy_(torch.randperm(4096))
            model.save_pretrained(root / name)
            assistants[name] = model
    return target, assistants, root


def _assert_forward_equals_transformers(hf, ours) -> None:
    """Two rows, one query each at position 9 over 9 committed keys per layer type (more than the
    window sees), the cache 12 slots long with garbage past the committed ones: ``ours`` == the
    transformers model ``hf`` given exactly the committed keys and values (logits: over the tokens
    a centroid head selects, the others -inf where transformers writes the smallest selected - 1)."""
    gen = torch.Generator().manual_seed(3)
    n, slots = 9, 12
    kv = {
        S: [torch.randn(2, 2, slots, 8, generator=gen) for _ in range(2)],
        F: [torch.randn(2, 1, slots, 16, generator=gen) for _ in range(2)],
    }
    emb, hid = torch.randn(2, 1, 32, generator=gen), torch.randn(2, 1, 32, generator=gen)
    ours_kv = {kind: tuple(jnp.asarray(t.transpose(1, 2).numpy()) for t in pair) for kind, pair in kv.items()}
    with torch.no_grad():
        ref = hf(
            inputs_embeds=torch.cat([emb, hid], -1),
            position_ids=torch.full((2, 1), n),
            shared_kv_states={t: (k[:, :, :n], v[:, :, :n]) for t, (k, v) in kv.items()},
        )
    y, h = ours(
        jnp.asarray(emb.numpy()), jnp.asarray(hid.numpy()), jnp.full((2, 1), n), ours_kv, jnp.full((2,), n)
    )
    logits, want = np.asarray(ours.logits(y)), ref.logits.numpy()
    np.testing.assert_allclose(np.asarray(h), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    if ours.centroids is None:
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    else:
        chosen = want > want.min()
        assert chosen.sum() == 2 * ours.cfg.centroid_top_k * ours.cfg.vocab_size // ours.cfg.num_centroids
        np.testing.assert_array_equal(np.isfinite(logits), chosen)
        np.testing.assert_allclose(logits[chosen], want[chosen], atol=1e-5, rtol=0)


def test_logits_and_hidden_states_for_a_given_target_kv_equal_transformers(checkpoints):
    """transformers' own forward (plain and centroid head; the plain one also through the Pallas
    verify kernel, interpret mode here: no causal block)."""
    _, assistants, root = checkpoints
    target_cfg = ModelConfig.from_hf(json.loads((root / "target" / "config.json").read_text()))
    for name, impl in (("plain", "auto"), ("plain", "pallas"), ("centroids", "auto")):
        kind, directory = find_export(root / name)
        assert kind.name == "gemma4_assistant"
        ours = load_drafter(directory, target_cfg, attention_impl=impl)
        _assert_forward_equals_transformers(assistants[name], ours)
    # the assistant's window: 3 + 2 in our terms (it sees the last 4 committed keys)
    assert [s.mixer_option("window", 0) for s in ours.cfg.layers.layers] == [5, 0]


def _hf_drafts(target, assistant, ids: list[int], k: int) -> list[int]:
    """transformers' drafting recipe (``Gemma4AssistantCandidateGenerator``) for the committed ``ids``
    whose last token is the anchor: the target's pass over the others, its last final hidden state and
    shared keys and values, then ``k`` argmax steps at the anchor's position."""
    with torch.no_grad():
        out = target(torch.tensor([ids[:-1]]), output_hidden_states=True, return_shared_kv_states=True)
        h, token, drafts = out.hidden_states[-1][:, -1:], torch.tensor([[ids[-1]]]), []
        for _ in range(k):
            step = assistant(
                inputs_embeds=torch.cat([target.get_input_embeddings()(token), h], -1),
                position_ids=torch.tensor([[len(ids) - 1]]),
                shared_kv_states=out.shared_kv_states,
            )
            token, h = step.logits.argmax(-1), step.last_hidden_state
            drafts.append(int(token))
    return drafts


def test_the_engines_prefill_commit_and_chain_draft_as_transformers_does(checkpoints):
    """The method's steps (prefill, propose, a verify pass of which one draft is kept, commit, propose)
    against transformers' drafting recipe from scratch at each point: the same drafts (the hidden state
    kept is the right one, the cache is read as committed: the rejected drafts' slots unseen); the
    dynamic tree's start and expansions follow the same chain."""
    from dflash.decoding.method import StepInputs
    from dflash.models.transformer import FINAL_NORMED

    hf, assistants, root = checkpoints
    target = load_target(root / "target")
    head = load_drafter(root / "plain", target)
    method = method_for(head, block_size=4)
    prompt, anchor, nxt = [5, 9, 300, 41, 7, 7, 2000, 13], 17, 99  # nxt: the correction after draft 1
    p = len(prompt)

    @jax.jit  # the whole scenario as one program (eager dispatch of its ops is slower than compiling)
    def scenario(chain_1):
        out = target(jnp.asarray([prompt]), jnp.arange(p)[None], target.init_cache(1, 24),
                     hidden_layers=(FINAL_NORMED,))
        state = method.prefill(head, method.init(head, 1, 24, jnp.float32), out.hidden, jnp.array([p]))
        step = StepInputs(jnp.array([anchor]), out.cache.lengths, None, None, out.cache)
        first = method.propose(head, target, state, step, jax.random.key(0), SamplingParams())[0]
        # the dynamic tree's steps: along transformers' chain through a sibling (second, then first node)
        logp0, carry = method.tree_start(head, target, state, step)
        logp1, carry = method.tree_expand(head, target, carry, jnp.stack([jnp.array([6]), chain_1[:1]], 1),
                                          jnp.array([[0, 0]]), 1)
        logp2, carry = method.tree_expand(head, target, carry, jnp.stack([chain_1[1:2], jnp.array([7])], 1),
                                          jnp.array([[1, 0]]), 2)
        tree = jnp.stack([jnp.argmax(logp0[0]), jnp.argmax(logp1[0, 1]), jnp.argmax(logp2[0, 0])])
        block = jnp.concatenate([jnp.array([[anchor]]), first], axis=1)
        verified = target(block, jnp.arange(p, p + 4)[None], out.cache, hidden_layers=(FINAL_NORMED,))
        state = method.commit(head, state, verified.hidden, out.cache.lengths, jnp.array([1]))  # one kept
        cache = verified.cache.keep(jnp.array([2]), 4)
        step = StepInputs(jnp.array([nxt]), cache.lengths, None, None, cache)
        second = method.propose(head, target, state, step, jax.random.key(0), SamplingParams())[0]
        return first[0], tree, second[0]

    want_1 = _hf_drafts(hf, assistants["plain"], prompt + [anchor], 3)
    want_2 = _hf_drafts(hf, assistants["plain"], prompt + [anchor, want_1[0], nxt], 3)
    first, tree, second = (np.asarray(x).tolist() for x in scenario(jnp.asarray(want_1)))
    assert first == want_1
    assert tree == want_1
    assert second == want_2


def test_speculative_greedy_with_an_assistant_equals_the_targets_greedy_tokens(checkpoints, capsys):
    """``dflash-generate --target DIR --drafter DIR`` (plain head) and the engine with the centroid
    head (blocks of 3): the target's own greedy tokens from transformers, over prompts longer than
    the window; the drafts read the target's KV-shared cache as committed and roll back with it."""
    from dflash.cli.generate import main

    hf, _, root = checkpoints
    assert (
        main(
            [
                "--target",
                str(root / "target"),
                "--drafter",
                str(root / "plain"),
                "--prompt",
                "def fib(n):\n    a, b = 0, 1\n",
                "--max-new-tokens",
                "20",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    prompts = [out["prompt_tokens"], [7, 1, 2, 8, 8, 5, 40, 11]]
    with torch.no_grad():
        ref = [
            hf.generate(
                torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    assert out["tokens"] == ref[0]
    assert out["block_size"] == 4  # the assistant's chain of 3 (its random drafts are all rejected here:
    # the wiring test commits an accepted draft, the sampling test accepts many)
    target = load_target(root / "target")
    head = load_drafter(root / "centroids", target)
    spec = speculative_generate(
        target, prompts, method=method_for(head, block_size=3), drafter=head, max_new_tokens=20, eos_ids=()
    )
    assert spec.tokens == ref
    # --dynamic-tree: the assistant's steps as an EAGLE-2 tree (depth 2, top 3, 6 nodes) verified by the
    # KV-shared target in one pass, the tree's rows rolled back to the accepted path
    argv = ["--target", str(root / "target"), "--drafter", str(root / "centroids"), "--prompt",
            "def fib(n):\n    a, b = 0, 1\n", "--max-new-tokens", "20", "--dynamic-tree", "2,3,6", "--json"]
    assert main(argv) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["tokens"] == ref[0] and tree["block_size"] == 3, tree  # the depth + 1, not the chain's 4


def test_speculative_sampling_with_an_assistant_preserves_the_target_distribution():
    """Chi-square on the first three sampled tokens (test_verify's exact joint) of a tiny Gemma 4
    target, drafts sampled from a random centroid-head assistant's distribution over two chained steps."""
    target, prompt, joint, head = _small_vocab_pair()
    n = 4000
    out = speculative_generate(
        target,
        [prompt] * n,
        method=AssistantDraft.of(head, stochastic=True),
        drafter=head,
        max_new_tokens=3,
        eos_ids=(),
        sampling=SamplingParams(temperature=1.0),
        rule="token",
        key=jax.random.key(5),
    )
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20
    assert_first_three_follow(out.tokens, joint)


def _small_vocab_pair(vocab: int = 6):
    """A tiny Gemma 4 target (KV-shared layers, per-layer inputs, soft-cap) of ``vocab`` tokens, far
    from uniform (test_verify's ``exact_joint``), and a centroid-head assistant for it whose drafts
    are often accepted: ``(target, prompt, joint, assistant)``."""
    hf = {"model_type": "gemma4_text", **TARGET, "vocab_size": vocab, "vocab_size_per_layer_input": vocab}
    target, prompt, joint = exact_joint(ModelConfig.from_hf(hf))
    cfg = AssistantConfig.from_hf(
        {
            "text_config": {**ASSISTANT, "vocab_size": vocab},
            "backbone_hidden_size": 32,
            **CENTROIDS,
            "num_centroids": 3,
            "centroid_intermediate_top_k": 2,
        },
        block_size=3,
    )
    head = build_assistant(cfg, seed=2)
    head.pre_projection.kernel[...] = head.pre_projection.kernel[...] * 5.0  # far from uniform
    return target, prompt, joint, head


@on_cpu_devices(8)
def test_an_assistant_on_a_mesh_drafts_and_decodes_as_unsharded():
    """Greedy speculative decoding with the assistant on a data x fsdp x tensor mesh (target and
    assistant read into their shards by the rule table): the unsharded run's tokens and acceptance,
    which equal the target's own greedy tokens."""
    from dflash import sharding as sh
    from dflash.decoding.autoregressive import generate

    target, _, _, head = _small_vocab_pair()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 6, size=n).tolist() for n in (5, 9, 3, 7)]
    common = dict(max_new_tokens=[12, 7, 15, 10], eos_ids=())
    ref = speculative_generate(target, prompts, method=AssistantDraft.of(head), drafter=head, **common)
    assert ref.tokens == generate(target, prompts, **common).tokens
    assert any(a > 1 for row in ref.acceptance_lengths for a in row)  # drafts were accepted
    # data 2 x fsdp 2 x tensor 2: tensor splits the heads, the MLPs and the vocabulary (the full
    # layers' one kv head replicated, as mesh.replicate_indivisible asks), fsdp the widths
    mesh = sh.make_mesh(sh.MeshConfig(2, 2, 2))
    on_mesh = sh.shard_model(head, mesh, replicate_indivisible=True)
    got = speculative_generate(sh.shard_model(target, mesh, replicate_indivisible=True), prompts,
                               method=AssistantDraft.of(on_mesh), drafter=on_mesh, mesh=mesh, **common)
    assert got.tokens == ref.tokens and got.acceptance_lengths == ref.acceptance_lengths


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"backbone_hidden_size": 48}, "backbone_hidden_size=48"),
        ({"text_config": {**ASSISTANT, "head_dim": 4}}, r"layer 0 \(sliding_attention\) expects"),
        ({"text_config": {**ASSISTANT, "enable_moe_block": True}}, "enable_moe_block"),
        ({"use_ordered_embeddings": True, "num_centroids": 100}, "num_centroids=100 must divide"),
    ],
)
def test_a_mismatched_or_unsupported_assistant_is_refused_naming_the_field(bad, match):
    target = ModelConfig.from_hf({"model_type": "gemma4_text", **TARGET})
    with pytest.raises(ConfigError, match=match):
        AssistantConfig.from_hf({"text_config": ASSISTANT, "backbone_hidden_size": 32, **bad}).check_target(
            target
        )


def _fresh(num_layers: int = 2, block_size: int = 4, seed: int = 1):
    """A tiny random Gemma 4 target (KV-shared layers, per-layer inputs, window 3) and a fresh
    assistant for it as ``method: gemma4_assistant`` builds one, its weights scaled up (far from
    uniform drafts)."""
    from flax import nnx

    from dflash.models import build
    from dflash.training.config import DrafterSection

    target = build(ModelConfig.from_hf({"model_type": "gemma4_text", **TARGET}), seed=3)
    kind = drafter_kind("gemma4_assistant")
    section = DrafterSection(num_layers=num_layers)
    dcfg = kind.config(section, target.cfg, mask_token_id=0, block_size=block_size)
    head = kind.build(dcfg, target, seed=seed)
    np.testing.assert_array_equal(np.asarray(head.embed_tokens[...]), np.asarray(target.embed_tokens[...]))
    nnx.update(head, jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, nnx.state(head, nnx.Param)))
    return target, head


def _packed(docs: list[list[list[int]]]) -> dict[str, jax.Array]:
    """Rows of documents packed back to back (positions restart per document), zero-padded."""
    s = max(sum(len(d) for d in row) for row in docs)
    out = {name: np.zeros((len(docs), s), np.int32) for name in ("tokens", "segment_ids", "positions")}
    for r, row in enumerate(docs):
        at = 0
        for i, doc in enumerate(row):
            span = slice(at, at + len(doc))
            out["tokens"][r, span], out["segment_ids"][r, span] = doc, i + 1
            out["positions"][r, span] = np.arange(len(doc))
            at += len(doc)
    batch = {k: jnp.asarray(v) for k, v in out.items()}
    return {**batch, "loss_mask": batch["segment_ids"] > 0}


def test_the_training_chain_at_an_anchor_equals_the_engines_chained_steps():
    """An anchor in the second document of a packed row, its prefix (11 tokens) longer than the
    window, the row going on with the engine's own drafts: the training chain's logits at that
    anchor (target pass over the packed row, the anchor's mask) == the engine's steps (prefill,
    then ``AssistantDraft`` over the target's cache) step for step."""
    from dflash.drafters.gemma4_assistant import train
    from dflash.drafters.objective import anchor_context_mask
    from dflash.models.transformer import FINAL_NORMED

    target, head = _fresh()
    method = method_for(head, block_size=4)
    rng = np.random.default_rng(5)
    before, prefix, anchor = rng.integers(0, 4096, 6).tolist(), rng.integers(0, 4096, 11).tolist(), 77

    @jax.jit
    def engine():
        p = len(prefix)
        out = target(jnp.asarray([prefix]), jnp.arange(p)[None], target.init_cache(1, 16),
                     hidden_layers=(FINAL_NORMED,))
        state = method.prefill(head, method.init(head, 1, 16, jnp.float32), out.hidden, jnp.array([p]))
        kv = head.target_kv(target.cfg, out.cache)
        token, h, logits = jnp.array([[anchor]]), state.pending_BD[:, None], []
        for _ in range(3):
            step_logits, h = method._step(head, target, kv, out.cache.lengths, token, h)
            token = jnp.argmax(step_logits, -1)
            logits.append(step_logits[0, 0])
        return jnp.stack(logits)

    want = np.asarray(engine())
    drafts = want.argmax(-1).tolist()
    batch = _packed([[before, prefix + [anchor] + drafts + [5]]])
    anchors = jnp.array([[len(before) + len(prefix)]])

    @jax.jit
    def training():
        t_final, cache = train.target_pass(target, batch)
        visible = anchor_context_mask(anchors, jnp.ones((1, 1), bool), batch["segment_ids"])
        y = train.chain_at_anchors(head, target, batch, t_final, cache, anchors, visible)
        return head.logits(y[:, 0])[0]

    got = np.asarray(training())
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert len(set(drafts)) > 1  # the drafts are the assistant's, not one token repeated


def test_the_training_loss_equals_an_unrolled_per_document_reference():
    """CE + KL (to the target's soft-capped distribution), 3 steps, over two packed rows of two
    documents, in loss chunks of 5 rows: == each document on its own through the engine's step (the
    target's cache of the document, the step at the anchor over its committed slots), teacher-forced,
    weighted w_j over the sampled anchors whose h_{a-1} is in their document."""
    from dflash.drafters import blocks as blk
    from dflash.drafters.objective import loss_weights

    target, head = _fresh()
    rng = np.random.default_rng(2)
    docs = [[rng.integers(0, 4096, n).tolist() for n in lens] for lens in ((7, 9), (9, 7))]
    batch, key, k, gamma = _packed(docs), jax.random.key(4), 3, 2.0
    kw = dict(num_anchors=10, gamma=gamma, ce_weight=1.0, kl_weight=0.5, target_labels=False,
              target_metrics=True, loss_chunk=5)
    loss, metrics = jax.jit(lambda: drafter_kind("gemma4_assistant").loss(head, target, batch, key, **kw))()
    blocks = blk.anchor_blocks(target, batch, key, 10, k + 1, 0)
    anchors, valid = np.asarray(blocks.label_idx[:, :, 0] - 1), np.asarray(blocks.valid)

    @jax.jit
    def per_doc(doc_1S):
        """[S, k, V] log-probs of every anchor a = 1 .. S-1 of one document, and the target's [S, V]."""
        s = doc_1S.shape[1]
        out = target(doc_1S, jnp.arange(s)[None], target.init_cache(1, s), final_hidden=True)
        kv = {t: (jnp.repeat(kk, s - 1, 0), jnp.repeat(vv, s - 1, 0))
              for t, (kk, vv) in head.target_kv(target.cfg, out.cache).items()}
        a = jnp.arange(1, s)
        h, logp = out.final[0, :-1, None], []
        for j in range(k):
            tok = doc_1S[0, jnp.minimum(a + j, s - 1)][:, None]
            y, h = head(target.embed(tok), h, a[:, None], kv, a)
            logp.append(jax.nn.log_softmax(head.logits(y)[:, 0], -1))
        return jnp.stack(logp, 1), jax.nn.log_softmax(out.logits[0], -1)

    w, num, den = np.asarray(loss_weights(k + 1, gamma)), 0.0, 0.0
    seg, tokens = np.asarray(batch["segment_ids"]), np.asarray(batch["tokens"])
    for row in range(2):
        for doc in (1, 2):
            where = np.flatnonzero(seg[row] == doc)
            start, doc_tok = where[0], np.asarray(tokens[row, where])
            logp, t_logp = (np.asarray(x) for x in per_doc(jnp.asarray(doc_tok)[None]))
            for a in anchors[row][valid[row]]:
                i = a - start
                for j in range(1, k + 1):
                    if a in where and i >= 1 and i + j < len(doc_tok):
                        q, pt = logp[i - 1, j - 1], t_logp[i + j - 1]
                        ce = -q[doc_tok[i + j]]
                        kl = float((np.exp(pt) * (pt - q)).sum())
                        num += w[j - 1] * (ce + 0.5 * kl)
                        den += w[j - 1]
    assert den > 0
    np.testing.assert_allclose(float(loss), num / den, rtol=2e-5)


def _transformers_assistant(directory):
    """``Gemma4AssistantForCausalLM.from_pretrained(directory)`` (under the kv_sharing_modes patch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Gemma4TextConfig, "kv_sharing_modes", property(_all_shared_modes))
        return transformers.Gemma4AssistantForCausalLM.from_pretrained(directory).eval()


def test_an_export_is_what_save_pretrained_wrote_and_transformers_loads_it(checkpoints, tmp_path):
    """A published assistant (plain and centroid head) loaded and exported again: the same tensors
    under the same names (token ordering included) and the same config as transformers reads it;
    transformers' forward of the export == ours; our loader reads it back to the same parameters."""
    from flax import nnx
    from safetensors.numpy import load_file

    _, _, root = checkpoints
    kind = drafter_kind("gemma4_assistant")
    target_cfg = ModelConfig.from_hf(json.loads((root / "target" / "config.json").read_text()))
    for name in ("plain", "centroids"):
        ours = load_drafter(root / name, target_cfg)
        out = kind.save(ours, None, target_cfg, tmp_path / name, target_name="t")
        want, got = load_file(root / name / "model.safetensors"), load_file(out / "model.safetensors")
        assert set(got) == set(want)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        mine, theirs = _transformers_assistant(out).config, _transformers_assistant(root / name).config
        for key in ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "tie_word_embeddings",
                    "centroid_intermediate_top_k"):
            assert getattr(mine, key) == getattr(theirs, key), key
        text = mine.get_text_config()
        for key in ("hidden_size", "layer_types", "sliding_window", "num_kv_shared_layers", "rope_parameters",
                    "intermediate_size", "num_attention_heads", "attention_k_eq_v"):  # head shapes: forward
            assert getattr(text, key) == getattr(theirs.get_text_config(), key), key
        _assert_forward_equals_transformers(_transformers_assistant(out), ours)
        again = load_drafter(out, target_cfg)
        assert again.cfg == dataclasses.replace(ours.cfg, block_size=again.cfg.block_size)
        for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dflash_train_trains_an_assistant_that_drafts_losslessly_and_transformers_loads_it(
    checkpoints, tmp_path
):
    """``method: gemma4_assistant`` for a tiny Gemma 4 target saved by ``save_pretrained`` (which
    ships no assistant): two trainer steps from a fresh assistant; the export is a
    ``Gemma4AssistantForCausalLM`` directory that transformers' forward agrees with. The run's own
    evaluation decodes a held-out prompt greedily with the trained assistant and with prompt lookup
    (lossless, its own tests): the same 16 tokens, so the assistant's speculative greedy == AR."""
    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig
    from dflash.training.trainer import run_training

    _, _, root = checkpoints
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_yaml(
        ExperimentConfig,
        repo / "configs/tiny_code_mtp.yaml",
        [
            "method=gemma4_assistant",
            f"target.name={root / 'target'}",
            f"run_dir={tmp_path / 'r'}",
            "drafter.num_layers=2",
            "drafter.block_size=3",
            "data.max_examples=24",
            "data.seq_len=48",
            "train.batch_size=2",
            "train.num_anchors=24",
            "train.steps=2",
            "train.save_every=2",
            "train.eval_every=2",
            "train.log_every=1",
            "eval.num_prompts=1",
            "eval.max_new_tokens=16",
            "eval.heldout_rows=2",
            "regen.num_sequences=0",
        ],
    )
    result = run_training(cfg, progress=False)
    assert result["eval_new_tokens"] == 16 and "outputs_differ" not in result  # assistant == prompt lookup
    export = tmp_path / "r" / "export"
    hf = json.loads((export / "config.json").read_text())
    assert hf["architectures"] == ["Gemma4AssistantForCausalLM"] and hf["dflash_block_size"] == 3
    target = load_target(root / "target")
    head = load_drafter(export, target)
    assert head.cfg.num_layers == 2 and head.centroids is None
    _assert_forward_equals_transformers(_transformers_assistant(export), head)


def test_a_fresh_assistant_needs_a_gemma4_target_and_two_layers():
    from dflash.config import PRESETS

    target = ModelConfig.from_hf({"model_type": "gemma4_text", **TARGET})
    with pytest.raises(ConfigError, match="drafter.num_layers=1: a Gemma 4 assistant needs at least 2"):
        AssistantConfig.for_target(target, num_layers=1)
    with pytest.raises(ConfigError, match="drafts for a gemma4 target, not 'qwen3'"):
        AssistantConfig.for_target(PRESETS["qwen3_0_6b"], num_layers=2)
    cfg = AssistantConfig.for_target(target, num_layers=3, block_size=5)
    assert AssistantConfig.from_hf(cfg.to_hf()) == cfg  # the export's config.json reads back
