"""The Gated DeltaNet mixer kind ("gdn"): its two forms equal the token-by-token delta rule
(values and gradients), packed rows and right-padded prefills equal their documents run alone,
rollback after a verify pass equals decoding the kept prefix, its weight rows read and write both
Hugging Face layouts (Qwen3-Next fused per key-head group, Qwen3.5 separate) with outputs equal to
``transformers``' modules, with and without a cache, and tensor parallelism splits its heads."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices
from flax import nnx

from dflash.attention import causal_mask
from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.io.loading import load_params_into, save_params
from dflash.models.gdn_mixer import (
    GatedDeltaNet,
    GDNState,
    _weights,
    chunked_delta_rule,
    recurrent_delta_rule,
    state_bytes,
)
from dflash.models.layers import Context
from dflash.sharding import MeshConfig, ShardingError, make_mesh

G, H, KD, VD, D = 2, 4, 8, 6, 24  # key heads != value heads: each key head serves two value heads


def reference_rule(q, k, v, g, beta, s, starts=None):
    """The gated delta rule written from its equations, one token at a time (jnp, unjitted)."""
    outs = []
    for t in range(q.shape[1]):
        if starts is not None:
            s = s * (1.0 - starts[:, t].astype(jnp.float32))[:, None, None, None]
        s = s * jnp.exp(g[:, t])[..., None, None]
        read = jnp.einsum("bhkv,bhk->bhv", s, k[:, t])
        s = s + k[:, t][..., :, None] * (beta[:, t][..., None] * (v[:, t] - read))[..., None, :]
        outs.append(jnp.einsum("bhkv,bhk->bhv", s, q[:, t]))
    return jnp.stack(outs, 1), s


def rule_inputs(rng, b, t):
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(rng.normal(size=(b, t, H, KD))), unit(rng.normal(size=(b, t, H, KD)))
    v = rng.normal(size=(b, t, H, VD))
    g = -np.exp(rng.normal(size=(b, t, H))) * 0.7
    beta = 1 / (1 + np.exp(-rng.normal(size=(b, t, H))))
    s0 = rng.normal(size=(b, H, KD, VD))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, s0))


@pytest.mark.parametrize("t", [1, 5, 67, 130])
def test_chunked_and_recurrent_forms_equal_the_token_by_token_rule(t):
    rng = np.random.default_rng(t)
    args = rule_inputs(rng, 2, t)
    starts = jnp.asarray(rng.random((2, t)) < 0.08)  # packed documents: resets anywhere, some chunks none
    o_ref, s_ref = reference_rule(*args, starts)
    o_c, s_c = jax.jit(chunked_delta_rule)(*args, starts)
    o_r, s_r = jax.jit(recurrent_delta_rule)(*args, starts)
    np.testing.assert_allclose(o_c, o_ref, atol=2e-5)
    np.testing.assert_allclose(s_c, s_ref, atol=2e-5)
    np.testing.assert_allclose(o_r, o_ref, atol=2e-5)
    np.testing.assert_allclose(s_r[:, -1], s_ref, atol=2e-5)
    if t in (5, 67):  # gradients of every input, through both forms (and the reference, at 5 tokens)
        w_o, w_s = jnp.asarray(rng.normal(size=o_ref.shape)), jnp.asarray(rng.normal(size=s_ref.shape))

        def loss(rule):
            def f(*xs):
                o, s = rule(*xs, starts)
                return jnp.sum(o * w_o) + jnp.sum((s if s.ndim == 4 else s[:, -1]) * w_s)
            return f

        argnums = tuple(range(6))
        g_c = jax.jit(jax.grad(loss(chunked_delta_rule), argnums))(*args)
        g_r = jax.jit(jax.grad(loss(recurrent_delta_rule), argnums))(*args)
        g_ref = jax.grad(loss(reference_rule), argnums)(*args) if t == 5 else g_r
        for a, b, c in zip(g_ref, g_c, g_r, strict=True):
            np.testing.assert_allclose(b, a, atol=5e-5)
            np.testing.assert_allclose(c, a, atol=5e-5)


# ----------------------------------------------------------------------------- the mixer
def gdn_config(layout: str = "qwen3_next", **extra) -> tuple[ModelConfig, LayerSpec]:
    options = {"key_heads": G, "value_heads": H, "key_dim": KD, "value_dim": VD, "conv_kernel": 4,
               "layout": layout, **extra}
    spec = LayerSpec("gdn", "dense", options)
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=D, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, layers=(spec,))
    return cfg, spec


def mixer(seed: int = 0, **extra) -> tuple[GatedDeltaNet, ModelConfig, LayerSpec]:
    cfg, spec = gdn_config(**extra)
    m = GatedDeltaNet(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    m.dt_bias[...] = jnp.asarray(np.random.default_rng(seed).normal(size=H), jnp.float32)
    return m, cfg, spec


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _forward(graphdef, params, cfg, x, state, start, kw):
    pos = jnp.broadcast_to(start + jnp.arange(x.shape[1]), x.shape[:2])
    ctx = Context(pos, causal_mask(x.shape[1]), cfg.rope, "reference", **kw)
    return nnx.merge(graphdef, params)(x, ctx=ctx, state=state)


def run(m, cfg, x, state=None, start=0, **kw):
    """One forward pass of the mixer ``m`` (compiled once per shape)."""
    graphdef, params = nnx.split(m)
    return _forward(graphdef, params, cfg, x, state, jnp.int32(start), kw)


def test_packed_rows_and_padded_prefills_equal_their_documents_alone():
    """``segment_ids`` resets the recurrence and the convolution at each document start (documents
    of 3, 70 and 9 tokens: one spans a chunk boundary); ``valid_B`` stops the state at each row's
    real tokens (outputs there, the state, and a continued decode equal the unpadded run)."""
    m, cfg, _ = mixer(chunk=16)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 82, D)), jnp.float32)
    seg = jnp.asarray(np.repeat([1, 2, 3], [3, 70, 9])[None], jnp.int32)
    packed, _ = run(m, cfg, x, segment_ids=seg)
    alone = [run(m, cfg, x[:, lo:hi])[0] for lo, hi in ((0, 3), (3, 73), (73, 82))]
    np.testing.assert_allclose(packed, jnp.concatenate(alone, 1), atol=2e-5)

    lengths = (5, 9)
    xs = jnp.asarray(rng.normal(size=(2, 9, D)), jnp.float32)
    padded, state = run(m, cfg, xs, GDNState.zeros(2, m.dims, jnp.float32), valid_B=jnp.asarray(lengths))
    assert not state.trail and state.rollback(jnp.asarray(lengths), 9) is state
    nxt = jnp.asarray(rng.normal(size=(2, 1, D)), jnp.float32)
    for row, n in enumerate(lengths):
        own, own_state = run(m, cfg, xs[row:row + 1, :n], GDNState.zeros(1, m.dims, jnp.float32))
        own_state = own_state.rollback(jnp.asarray([n]), n)
        np.testing.assert_allclose(padded[row, :n], own[0], atol=2e-5)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(own_state), strict=True):
            np.testing.assert_allclose(a[row], b[0], atol=2e-5)
        then, _ = run(m, cfg, nxt[row:row + 1], own_state, start=n)
        again, _ = run(m, cfg, nxt[row:row + 1], state.take_rows(jnp.asarray([row])), start=n)
        np.testing.assert_allclose(again, then, atol=2e-5)


def test_rollback_after_verify_equals_decoding_the_kept_prefix():
    """For every kept count 0..T (different per row), the state after a verify pass of T tokens
    and ``rollback`` equals the state after decoding those tokens one by one."""
    m, cfg, _ = mixer(seed=1)
    rng = np.random.default_rng(4)
    t = 6
    prompt = jnp.asarray(rng.normal(size=(2, 7, D)), jnp.float32)
    block = jnp.asarray(rng.normal(size=(2, t, D)), jnp.float32)
    _, prefix = run(m, cfg, prompt, GDNState.zeros(2, m.dims, jnp.float32), valid_B=jnp.full((2,), 7))
    verify_out, trail = run(m, cfg, block, prefix, start=7)
    assert trail.trail and trail.rec.shape == (2, t + 1, H, KD, VD)
    after, step = [prefix], prefix
    for i in range(t):
        out, step = run(m, cfg, block[:, i:i + 1], step, start=7 + i)
        step = step.rollback(jnp.ones((2,), jnp.int32), 1)
        np.testing.assert_allclose(out[:, 0], verify_out[:, i], atol=2e-5)
        after.append(step)
    row_bytes = sum(x.nbytes for x in jax.tree.leaves(prefix)) // 2
    assert state_bytes(cfg, cfg.layers[0], jnp.float32) == row_bytes
    for k in range(t + 1):
        kept = jnp.asarray([k, t - k])
        rolled = trail.rollback(kept, t)
        for row, n in enumerate((k, t - k)):
            for a, b in zip(jax.tree.leaves(rolled), jax.tree.leaves(after[n]), strict=True):
                np.testing.assert_allclose(a[row], b[row], atol=2e-5)


@pytest.mark.parametrize("options,match", [
    ({"value_heads": 3}, r"value_heads \(3\) must be a multiple of key_heads \(2\)"),
    ({"layout": "mamba"}, "layout must be one of qwen3_next, qwen3_5, got 'mamba'"),
    ({"conv_kernel": 0}, "conv_kernel must be a positive int")])
def test_bad_options_are_refused_naming_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        mixer(**options)


# ----------------------------------------------------------------------------- transformers
class Layer(nnx.Module):
    """The mixer where a decoder layer holds it (``linear_attn``), so the sharding rows match."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        self.linear_attn = GatedDeltaNet(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0))


def load_hf(hf, directory, layout: str, mesh=None) -> tuple[GatedDeltaNet, tuple, dict]:
    """``hf``'s tensors saved under ``linear_attn.`` and read back through our weight rows."""
    from safetensors.numpy import save_file

    cfg, spec = gdn_config(layout)
    tensors = {f"linear_attn.{k}": v.detach().numpy() for k, v in hf.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    rows = tuple(row.prefixed("linear_attn.", "linear_attn.") for row in _weights(cfg, spec))
    layer = load_params_into(nnx.eval_shape(lambda: Layer(cfg, spec)), directory, rows, jnp.float32,
                             ignorable=(), mesh=mesh)
    return layer, rows, tensors


def hf_module(layout: str, seed: int):
    """A transformers GDN module of our tiny sizes with random weights (A_log, dt_bias, the norm's)."""
    import torch

    if layout == "qwen3_next":
        from transformers import Qwen3NextConfig as Config
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as Module
    else:
        from transformers import Qwen3_5TextConfig as Config
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet as Module
    config = Config(hidden_size=D, linear_num_key_heads=G, linear_num_value_heads=H, linear_key_head_dim=KD,
                    linear_value_head_dim=VD, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                    num_hidden_layers=1, layer_types=["linear_attention"], hidden_act="silu")
    torch.manual_seed(seed)
    module = Module(config, layer_idx=0).float().eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if name == "norm.weight" else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + centre)
    return module, config


@pytest.mark.parametrize("layout", ["qwen3_next", "qwen3_5"])
def test_transformers_gdn_modules_load_into_ours_with_equal_outputs_and_save_back_exactly(layout, tmp_path):
    import torch
    from safetensors.numpy import load_file
    from transformers import DynamicCache

    hf, config = hf_module(layout, seed=5)
    layer, rows, tensors = load_hf(hf, tmp_path, layout)
    save_params(layer, rows, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    ours, cfg = layer.linear_attn, gdn_config(layout)[0]

    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 11, D)).astype(np.float32)
    with torch.no_grad():
        want = hf(torch.from_numpy(x[:, :7])).numpy()  # no cache: the torch chunked form
        cache = DynamicCache(config=config)
        steps = [hf(torch.from_numpy(x[:, lo:hi]), cache_params=cache).numpy() for lo, hi in ((0, 7), (7, 8),
                                                                                             (8, 11))]
    np.testing.assert_allclose(run(ours, cfg, jnp.asarray(x[:, :7]))[0], want, atol=2e-5)
    state = GDNState.zeros(2, ours.dims, jnp.float32)
    got, state = run(ours, cfg, jnp.asarray(x[:, :7]), state, valid_B=jnp.full((2,), 7))  # prefill
    np.testing.assert_allclose(got, steps[0], atol=2e-5)
    for (lo, hi), expected in zip(((7, 8), (8, 11)), steps[1:], strict=True):  # decode, then verify
        got, state = run(ours, cfg, jnp.asarray(x[:, lo:hi]), state, start=lo)
        state = state.rollback(jnp.full((2,), hi - lo), hi - lo)
        np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(state.rec, cache.layers[0].recurrent_states[0].numpy(), atol=2e-5)


@on_cpu_devices(4)
def test_tensor_parallel_forward_equals_unsharded_and_indivisible_heads_are_refused():
    """The fused Qwen3-Next tensors read slice by slice onto ``fsdp=2 x tensor=2`` (each device's
    columns of every key-head group): the same outputs and states; ``tensor=4`` does not divide
    the two key heads: a ShardingError naming them."""
    import tempfile
    from pathlib import Path

    hf, _ = hf_module("qwen3_next", seed=7)
    cfg = gdn_config()[0]
    plain = load_hf(hf, Path(tempfile.mkdtemp()), "qwen3_next")[0].linear_attn
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, D)), jnp.float32)
    state = GDNState.zeros(2, plain.dims, jnp.float32)
    want = run(plain, cfg, x, state)
    mesh = make_mesh(MeshConfig(1, 2, 2), jax.devices()[:4])
    sharded = load_hf(hf, Path(tempfile.mkdtemp()), "qwen3_next", mesh)[0].linear_attn
    assert sharded.in_proj_q.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh):
        got = run(sharded, cfg, x, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    wide = make_mesh(MeshConfig(1, 1, 4), jax.devices()[:4])
    wide_layer = load_hf(hf, Path(tempfile.mkdtemp()), "qwen3_next", wide)[0].linear_attn
    with jax.set_mesh(wide), pytest.raises(ShardingError, match=r"key_heads \(2\) is not divisible by mesh "
                                                                r"axis tensor of size 4"):
        run(wide_layer, cfg, x)
