"""Verification rules: exact enumeration on tiny vocabularies and end-to-end sampling statistics."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import FALSE_ALARM, chi2_pvalue

from dflash.config import LayerSpec, ModelConfig
from dflash.decoding.method import ChainDraft
from dflash.decoding.sampling import SamplingParams
from dflash.decoding.speculative import speculative_generate
from dflash.decoding.verify import block_stop_probs, verify_block, verify_greedy, verify_token
from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter
from dflash.models import build


def _random_dist(rng, *shape):
    x = rng.gamma(0.5, size=shape)
    return x / x.sum(-1, keepdims=True)


@pytest.mark.parametrize("seed", range(40))
def test_block_verification_never_accepts_less_than_token_wise(seed):
    """Exact expectations over all draft sequences X ~ q (V = 3, gamma = 3)."""
    rng = np.random.default_rng(seed)
    v, gamma = 3, 3
    p_tree = {(): _random_dist(rng, v)}
    q_tree = {(): _random_dist(rng, v)}
    for n in range(1, gamma + 1):
        for prefix in itertools.product(range(v), repeat=n):
            p_tree[prefix] = _random_dist(rng, v)
            if n < gamma:
                q_tree[prefix] = _random_dist(rng, v)
    seqs = list(itertools.product(range(v), repeat=gamma))
    p_rows = np.stack([[p_tree[x[:i]] for i in range(gamma + 1)] for x in seqs])  # [N, K, V]
    q_rows = np.stack([[q_tree[x[:i]] for i in range(gamma)] for x in seqs])  # [N, K-1, V]
    prob_x = np.array([np.prod([q_tree[x[:i]][x[i]] for i in range(gamma)]) for x in seqs])
    drafts = jnp.asarray(seqs, jnp.int32)
    h, _, _ = block_stop_probs(jnp.asarray(p_rows), jnp.asarray(q_rows), drafts)
    h = np.asarray(h, np.float64)
    e_block = np.zeros(len(seqs))
    for i in range(1, gamma + 1):  # P(tau = i) = h_i * prod_{j > i} (1 - h_j)
        e_block += i * h[:, i] * np.prod(1 - h[:, i + 1:], axis=1)
    ratio = np.minimum(1.0, np.array([[p_rows[n, i, x[i]] / q_rows[n, i, x[i]] for i in range(gamma)]
                                      for n, x in enumerate(seqs)]))
    e_token = np.cumprod(ratio, axis=1).sum(axis=1)
    assert prob_x @ e_block >= prob_x @ e_token - 1e-6


def test_rules_at_temperature_zero_equal_greedy():
    rng = np.random.default_rng(0)
    b, k, v = 64, 6, 5
    logits = jnp.asarray(rng.normal(size=(b, k, v)), jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    drafts = greedy[:, :-1].copy()
    cut = rng.integers(0, k, size=b)  # corrupt from a random point on
    for i in range(b):
        drafts[i, cut[i]:] = (drafts[i, cut[i]:] + 1 + rng.integers(0, v - 1, k - 1 - cut[i])) % v
    drafts = jnp.asarray(drafts, jnp.int32)
    want = verify_greedy(logits, drafts, mask_id=-1)
    for fn in (verify_block, verify_token):
        got = fn(logits, drafts, None, jax.random.key(1), SamplingParams(), -1)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert set(np.asarray(want[0]).tolist()) >= {0, 1, k - 1}


VOCAB = 6
CFG = ModelConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())


@pytest.fixture(scope="module")
def exact():
    return exact_joint()


# The same target with a Qwen3-MoE mixture (4 experts, top 2) as every layer's MLP.
CFG_MOE = dataclasses.replace(CFG, model_type="qwen3_moe", layers=(LayerSpec(
    mixer_options={"qk_norm": True}, mlp="moe", mlp_options={"experts": 4, "top_k": 2, "norm_topk_prob": True,
                                                             "intermediate_size": 16}),) * CFG.num_layers)

# A hybrid target (Qwen3.5's family): two Gated DeltaNet layers around a gated attention layer.
_GDN = LayerSpec("gdn", mixer_options={"key_heads": 2, "value_heads": 4, "key_dim": 8, "value_dim": 8,
                                       "layout": "qwen3_5"})
CFG_HYBRID = dataclasses.replace(CFG, model_type="qwen3_5", zero_centred_norm=True, layers=(
    _GDN, LayerSpec(mixer_options={"qk_norm": True, "output_gate": True, "rotary_dim": 4}), _GDN))


def exact_joint(cfg: ModelConfig = CFG):
    """The target and the exact joint distribution of its first three sampled tokens."""
    target = build(cfg, seed=3)
    target.embed_tokens[...] = target.embed_tokens[...] * 30.0  # far from uniform, not degenerate
    prompt = [1, 4, 2]
    seqs = list(itertools.product(range(VOCAB), repeat=2))
    ids = jnp.asarray([prompt + list(s) for s in seqs])
    logits = target(ids, jnp.broadcast_to(jnp.arange(5), ids.shape)).logits
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)  # [36, 5, V]
    joint = np.zeros((VOCAB,) * 3)
    for n, (a, b) in enumerate(seqs):
        joint[a, b, :] = probs[n, 2, a] * probs[n, 3, b] * probs[n, 4, :]
    return target, prompt, joint


@dataclasses.dataclass(frozen=True)
class FixedDraft(ChainDraft):
    """Test-only deterministic drafter: always proposes the same tokens (q is one-hot)."""

    tokens: tuple[int, ...]
    hidden_layers: tuple[int, ...] = ()

    @property
    def block_size(self) -> int:
        return len(self.tokens) + 1

    def init(self, drafter, batch, max_len, dtype):
        return ()

    def prefill(self, drafter, state, hidden, prompt_lens):
        return state

    def propose(self, drafter, target, state, step, key, sampling):
        b = step.anchor_B.shape[0]
        drafts = jnp.broadcast_to(jnp.asarray(self.tokens, jnp.int32), (b, len(self.tokens)))
        return drafts, None

    def commit(self, drafter, state, hidden, lengths, accepted):
        return state


@pytest.mark.parametrize("rule,drafts", [("token", "fixed"), ("token", "dflash-sampled"), ("block", "fixed"),
                                         ("block", "dflash-sampled")])
def test_speculative_sampling_preserves_the_target_distribution(exact, rule, drafts):
    """Chi-square on the joint of the first three tokens (two come from one verify step).

    Deterministic drafts (fixed likely tokens, q one-hot) and stochastic drafts (an untrained
    DFlash drafter sampling from its own q) under each rule.
    """
    assert_speculative_sampling_follows(*exact, CFG, rule, drafts)


def test_speculative_sampling_preserves_an_moe_targets_distribution():
    """The same on a mixture-of-experts target: a verify block routes each of its tokens to its
    own experts, and the sampled tokens still follow the target's distribution."""
    assert_speculative_sampling_follows(*exact_joint(CFG_MOE), CFG_MOE, "block", "dflash-sampled")


def test_speculative_sampling_preserves_a_hybrid_targets_distribution():
    """The same on a Gated DeltaNet hybrid: each verify step rolls the recurrent states back to
    the accepted prefix, and the sampled tokens still follow the target's distribution."""
    assert_speculative_sampling_follows(*exact_joint(CFG_HYBRID), CFG_HYBRID, "token", "dflash-sampled")


def assert_speculative_sampling_follows(target, prompt: list[int], joint: np.ndarray, cfg: ModelConfig,
                                        rule: str, drafts: str) -> None:
    if drafts == "fixed":  # the most likely 2nd and 3rd tokens: often accepted, often not
        second = int(np.argmax(joint.sum((0, 2))))
        third = int(np.argmax(joint.sum((0, 1))))
        method, drafter = FixedDraft((second, third, second)), None
    else:
        drafter = build_drafter(DFlashConfig.for_target(cfg, mask_token_id=VOCAB - 1, block_size=4,
                                                        target_layer_ids=(0,)), seed=9)
        method = DFlashDraft.of(drafter, stochastic=True)
    n = 6000
    out = speculative_generate(target, [prompt] * n, method=method, drafter=drafter, max_new_tokens=3,
                               eos_ids=(), mask_token_id=VOCAB - 1, sampling=SamplingParams(temperature=1.0),
                               rule=rule, key=jax.random.key(5))
    assert all(len(t) == 3 for t in out.tokens)
    # Drafts were really accepted (else this would only test plain sampling).
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20
    assert_first_three_follow(out.tokens, joint)


def assert_first_three_follow(tokens: list[list[int]], joint: np.ndarray) -> None:
    """Chi-square of the sampled first three tokens against their exact joint distribution."""
    n = len(tokens)
    counts = np.zeros(VOCAB ** 3)
    np.add.at(counts, [a * VOCAB * VOCAB + b * VOCAB + c for a, b, c in tokens], 1)
    probs = joint.reshape(-1).copy()
    rare = probs * n < 5  # pool rare cells into the most likely one
    top = int(np.argmax(probs))
    counts[top] += counts[rare].sum()
    probs[top] += probs[rare].sum()
    assert chi2_pvalue(counts[~rare], probs[~rare]) > FALSE_ALARM


@pytest.mark.parametrize("rule", ["token", "block"])
@pytest.mark.parametrize("drafts", ["fixed", "sampled"])
def test_one_verify_step_emits_the_targets_distribution_including_the_bonus(rule, drafts):
    """The rule itself, at every position of one step: drafts (fixed, or sampled from a q tree),
    the emitted prefix ``d_1 .. d_a, extra``, completed to K tokens by plain sampling from p,
    must follow p's joint over all K = 3 tokens. The end-to-end tests stop before the bonus;
    here every draft is accepted (extra = the bonus, from p's last row) in a good share of rows."""
    rng = np.random.default_rng(11)
    v, gamma, n = 3, 2, 60_000
    prefixes = [pre for m in range(gamma + 1) for pre in itertools.product(range(v), repeat=m)]
    p_tree = {pre: _random_dist(rng, v) for pre in prefixes}  # p(. | prefix), prefixes of 0..gamma tokens
    q_tree = {pre: _random_dist(rng, v) for pre in prefixes if len(pre) < gamma}
    if drafts == "fixed":  # the target's likeliest path: accepted often, rejected often
        path = (int(np.argmax(p_tree[()])),)
        path += (int(np.argmax(p_tree[path])),)
        d = np.tile(np.array(path), (n, 1))
    else:
        d = np.zeros((n, gamma), np.int64)
        for i in range(gamma):
            for row in range(n):
                d[row, i] = rng.choice(v, p=q_tree[tuple(d[row, :i])])
    p_rows = np.stack([[p_tree[tuple(x[:i])] for i in range(gamma + 1)] for x in d])  # [N, K, V]
    q_rows = None if drafts == "fixed" else jnp.asarray(
        np.stack([[q_tree[tuple(x[:i])] for i in range(gamma)] for x in d]), jnp.float32)  # [N, K-1, V]
    rule_fn = verify_token if rule == "token" else verify_block
    accepted, extra = rule_fn(jnp.asarray(np.log(p_rows), jnp.float32), jnp.asarray(d, jnp.int32), q_rows,
                              jax.random.key(3), SamplingParams(temperature=1.0), mask_id=v + 1)
    accepted, extra = np.asarray(accepted), np.asarray(extra)
    assert (accepted == gamma).mean() > 0.1  # the bonus path is exercised
    counts = np.zeros(v ** (gamma + 1))
    for row in range(n):
        seq = [*d[row, :accepted[row]], int(extra[row])]
        while len(seq) < gamma + 1:
            seq.append(int(rng.choice(v, p=p_tree[tuple(seq)])))
        counts[int(np.ravel_multi_index(seq, (v,) * (gamma + 1)))] += 1
    joint = np.array([np.prod([p_tree[x[:i]][x[i]] for i in range(gamma + 1)])
                      for x in itertools.product(range(v), repeat=gamma + 1)])
    assert chi2_pvalue(counts, joint) > FALSE_ALARM
