"""The attention kind's options (sliding window, sinks, output gate, partial RoPE) against a loop
written from their definitions (docs/design.md §2), and cached == uncached == packed rows for each."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dflash.config import LayerSpec, ModelConfig
from dflash.models import build, init_cache

OPTIONS = {
    "window": {"window": 3},
    "sinks": {"sinks": True, "qkv_bias": True},
    "gate+partial rope": {"output_gate": True, "rotary_dim": 4, "qk_norm": True},
    "all": {"window": 5, "sinks": True, "output_gate": True, "rotary_dim": 6, "qk_norm": True},
}


def config(options: dict) -> ModelConfig:
    spec = LayerSpec(mixer_options=options)
    return ModelConfig(model_type="qwen3", vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, layers=(spec, spec))


def randomized(cfg: ModelConfig, seed: int, impl: str = "auto"):
    """A model whose sinks, biases and norms are random too (they start as zeros / ones)."""
    from flax import nnx

    graphdef, state = nnx.split(build(cfg, seed=seed, attention_impl=impl))
    rng = np.random.default_rng(seed)
    flat = {path: var.replace(jnp.asarray(var[...] + rng.normal(0, 0.5, var.shape), jnp.float32))
            if path[-1] in ("sinks", "weight", "bias") else var for path, var in nnx.to_flat_state(state)}
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def rope_np(x, pos, dim, theta=10000.0):
    """HF rotate_half RoPE on the first ``dim`` channels of every head of ``x [T, N, H]``."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    ang = pos[:, None] * inv[None]  # [T, dim/2]
    emb = np.concatenate([ang, ang], -1)[:, None]  # [T, 1, dim]
    cos, sin = np.cos(emb), np.sin(emb)
    rot, keep = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
    return np.concatenate([rot * cos + rotated * sin, keep], -1)


def reference_attention(attn, cfg: ModelConfig, options: dict, x_TD: np.ndarray) -> np.ndarray:
    """One row's causal attention output, from the definitions, one query at a time."""
    t, n, kh, h = x_TD.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name, x):
        m = getattr(attn, name)
        y = x @ np.asarray(m.kernel[...])
        return y + np.asarray(m.bias[...]) if m.bias is not None else y

    def norm(name, x):
        w = getattr(attn, name)
        if w is None:
            return x
        return np.asarray(w.weight[...]) * x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    qg = lin("q_proj", x_TD)
    if options.get("output_gate"):
        qg = qg.reshape(t, n, 2 * h)
        q, gate = qg[..., :h], qg[..., h:].reshape(t, n * h)
    else:
        q, gate = qg.reshape(t, n, h), None
    k, v = lin("k_proj", x_TD).reshape(t, kh, h), lin("v_proj", x_TD).reshape(t, kh, h)
    pos = np.arange(t, dtype=np.float64)
    dim = options.get("rotary_dim") or h
    q, k = rope_np(norm("q_norm", q), pos, dim), rope_np(norm("k_norm", k), pos, dim)
    sinks = np.asarray(attn.sinks[...]) if options.get("sinks") else None
    out = np.zeros((t, n, h))
    for i in range(t):
        seen = [j for j in range(i + 1) if not options.get("window") or i - j < options["window"]]
        for head in range(n):
            s = np.array([q[i, head] @ k[j, head // (n // kh)] for j in seen]) / np.sqrt(h)
            logits = np.append(s, sinks[head]) if sinks is not None else s
            w = np.exp(logits - logits.max())
            w = (w / w.sum())[: len(seen)]
            out[i, head] = sum(wj * v[j, head // (n // kh)] for wj, j in zip(w, seen, strict=True))
    out = out.reshape(t, n * h)
    if gate is not None:
        out = out / (1 + np.exp(-gate))
    return lin("o_proj", out)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_equals_its_definition(name):
    options = OPTIONS[name]
    cfg = config(options)
    model = randomized(cfg, seed=1)
    x = np.random.default_rng(2).normal(size=(1, 9, cfg.hidden_size)).astype(np.float32)
    pos = jnp.arange(9)[None]
    attn = model.layers[0].self_attn
    got, _ = attn(jnp.asarray(x), ctx=model.context(pos), state=None)
    want = reference_attention(attn, cfg, options, x[0].astype(np.float64))
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-5, rtol=1e-4)


# (option set, attention_impl of the chunks and packed rows; the whole pass is the reference):
# under ``pallas`` the cached chunks run the verify kernel, the packed rows the prefill kernel.
@pytest.mark.parametrize("name,impl", [(name, "auto") for name in OPTIONS] + [("all", "pallas")])
def test_cached_chunks_and_packed_rows_equal_the_whole_pass(name, impl):
    cfg = config(OPTIONS[name])
    model = randomized(cfg, seed=3, impl=impl)
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, 53, (2, 13)), jnp.int32)
    whole = randomized(cfg, seed=3, impl="reference")
    full = np.asarray(whole(ids, jnp.broadcast_to(jnp.arange(13), (2, 13))).logits)
    cache, got = init_cache(cfg, 2, 16), []
    for lo, hi in ((0, 5), (5, 6), (6, 13)):  # prefill, one token, a block
        out = model(ids[:, lo:hi], jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo)), cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5)
    # Two documents packed in one row (segment ids, positions restarting) == each one alone.
    seg = jnp.asarray([[1] * 6 + [2] * 7])
    pos = jnp.asarray([list(range(6)) + list(range(7))])
    packed = np.asarray(model(ids[:1], pos, segment_ids=seg).logits)
    np.testing.assert_allclose(packed[:, :6], np.asarray(whole(ids[:1, :6], pos[:, :6]).logits), atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], np.asarray(whole(ids[:1, 6:], pos[:, 6:]).logits), atol=1e-5)


def test_unknown_option_or_kind_is_a_clear_error():
    from dflash.errors import ConfigError

    with pytest.raises(ConfigError, match="layer 0: mixer kind 'attention' has no option 'windw'"):
        build(config({"windw": 3}))
    with pytest.raises(ConfigError, match="unknown mixer kind 'mamba'"):
        build(ModelConfig(model_type="qwen3", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=4, layers=(LayerSpec("mamba"),)))
