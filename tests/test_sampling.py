"""Sampling transforms against numpy references; sampled distributions against exact ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.config import ConfigError, ModelConfig
from dflash.decoding import SamplingParams, generate
from dflash.decoding.sampling import probabilities, process_logits
from dflash.models import build

FALSE_ALARM = 1e-4  # per goodness-of-fit check


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness-of-fit p-value (upper regularized gamma, df = bins - 1)."""
    import torch

    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    x = logits / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(-x)
    p = np.exp(x[order] - x[order][0])
    p /= p.sum()
    keep = np.zeros_like(x, bool)
    mass = 0.0
    for rank, idx in enumerate(order):
        if mass < top_p or rank == 0:
            keep[idx] = True
        mass += p[rank]
    return np.where(keep, x, -np.inf)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 11, 0.6)])
def test_process_logits_matches_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 37)).astype(np.float32) * 3
    got = np.asarray(process_logits(jnp.asarray(logits), SamplingParams(temperature, top_k, top_p)))
    for row in range(4):
        want = _reference_filter(logits[row].astype(np.float64), temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(got[row]), np.isinf(want))
        finite = ~np.isinf(want)
        np.testing.assert_allclose(got[row][finite], want[finite], rtol=1e-5)


def test_greedy_probabilities_are_one_hot():
    logits = jnp.asarray([[0.1, 2.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(probabilities(logits, SamplingParams())), [[0, 1, 0]])


def test_bad_sampling_params_are_errors():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(temperature=1, top_p=0)


CFG = ModelConfig(model_type="qwen3", vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())


def test_generated_tokens_follow_the_target_distribution():
    """First and second tokens of on-device sampling vs the exact model distribution.

    Chi-square goodness of fit, false-alarm rate ``FALSE_ALARM`` per check.
    """
    model = build(CFG, seed=7)
    # Sharpen the random model so the distribution is far from uniform.
    model.embed_tokens[...] = model.embed_tokens[...] * 60.0
    prompt = [3, 9, 4]
    n = 6000
    sampling = SamplingParams(temperature=1.0)
    result = generate(model, [prompt] * n, max_new_tokens=2, sampling=sampling, key=jax.random.key(11))
    first = np.array([t[0] for t in result.tokens])
    logits = model(jnp.asarray([prompt]), jnp.arange(3)[None]).logits[0, -1]
    p1 = np.asarray(jax.nn.softmax(logits), np.float64)
    assert p1.max() < 0.9
    counts = np.bincount(first, minlength=16)
    assert chi2_pvalue(counts, p1) > FALSE_ALARM
    # Second token given the most common first token.
    a = int(np.argmax(counts))
    second = np.array([t[1] for t in result.tokens if t[0] == a])
    logits2 = model(jnp.asarray([prompt + [a]]), jnp.arange(4)[None]).logits[0, -1]
    p2 = np.asarray(jax.nn.softmax(logits2), np.float64)
    # Pool the rare bins (expected count < 5) into the most likely bin, as chi-square requires.
    c2 = np.bincount(second, minlength=16).astype(np.float64)
    rare = p2 * len(second) < 5
    top = int(np.argmax(p2))
    c2[top] += c2[rare].sum()
    p2[top] += p2[rare].sum()
    counts2, probs2 = c2[~rare], p2[~rare]
    assert chi2_pvalue(counts2, probs2) > FALSE_ALARM


def test_top_k_sampling_stays_in_support():
    model = build(CFG, seed=7)
    result = generate(model, [[1, 2]] * 500, max_new_tokens=1, key=jax.random.key(0),
                      sampling=SamplingParams(temperature=1.0, top_k=3))
    logits = np.asarray(model(jnp.asarray([[1, 2]]), jnp.arange(2)[None]).logits[0, -1])
    allowed = set(np.argsort(-logits)[:3].tolist())
    assert {t[0] for t in result.tokens} <= allowed


def test_sampling_is_reproducible_with_the_same_key():
    model = build(CFG, seed=7)
    kwargs = dict(max_new_tokens=10, sampling=SamplingParams(temperature=1.0), eos_ids=())
    a = generate(model, [[1, 2, 3]], key=jax.random.key(42), **kwargs)
    b = generate(model, [[1, 2, 3]], key=jax.random.key(42), **kwargs)
    assert a.tokens == b.tokens


def test_rows_stop_at_their_own_eos():
    model = build(CFG, seed=7)
    free = generate(model, [[5, 6], [7, 8, 9]], max_new_tokens=12, eos_ids=())
    eos = free.tokens[0][3]
    stopped = generate(model, [[5, 6], [7, 8, 9]], max_new_tokens=12, eos_ids=(eos,))
    for row_free, row in zip(free.tokens, stopped.tokens, strict=True):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:cut]
    assert stopped.tokens[0][-1] == eos and len(stopped.tokens[0]) <= 4


def test_chi2_check_rejects_a_wrong_distribution():
    """The goodness-of-fit check has power: a 10% shift of mass is caught."""
    rng = np.random.default_rng(0)
    p = np.linspace(1, 3, 16)
    p /= p.sum()
    q = p.copy()
    q[0] += 0.1
    q /= q.sum()
    counts = np.bincount(rng.choice(16, size=6000, p=q), minlength=16)
    assert chi2_pvalue(counts, p) < FALSE_ALARM
    assert chi2_pvalue(np.bincount(rng.choice(16, size=6000, p=p), minlength=16), p) > FALSE_ALARM
