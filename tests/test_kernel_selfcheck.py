"""attention_impl=auto checks a Pallas kernel on the device before its first use, and falls back to
the jnp reference, in one line, when the kernel errors or disagrees (dflash/kernels/selfcheck.py).

On CPU ``auto`` is the reference; the fallback is tested by making this host look like a GPU and
injecting a broken kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash.config import ModelConfig
from dflash.kernels import dispatch, selfcheck
from dflash.kernels.anchor_attention import anchor_block_attention
from dflash.kernels.prefill_attention import prefill_attention
from dflash.kernels.verify_attention import verify_attention
from dflash.models.transformer import build

# head_dim 16, 2 query heads per kv head: shapes the GPU (Triton) kernels take
CFG = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=())
LAYOUT = selfcheck.Layout(heads=4, kv_heads=2, head_dim=16, rows=0, q_dtype="float32", kv_dtype="float32")


@pytest.fixture
def like_a_gpu(monkeypatch, tmp_path):
    """This CPU host as a GPU for dispatch and the self-check, with its own empty caches."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(selfcheck, "device_backend", lambda: "gpu")
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setenv("DFLASH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernel_selfcheck.json"


def _decode_step(model) -> jax.Array:
    """A 4-token block against a cache holding a 9-token prefix: the verify-kernel shape."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 60, (2, 9)), jnp.int32)
    block = jnp.asarray(rng.integers(0, 60, (2, 4)), jnp.int32)

    @jax.jit
    def run(m):
        cache = m.init_cache(2, 24)
        pre = m(tokens, jnp.broadcast_to(jnp.arange(9), (2, 9)), cache)
        return m(block, 9 + jnp.broadcast_to(jnp.arange(4), (2, 4)), pre.cache).logits

    return run(m=model)


def test_a_kernel_that_fails_its_self_check_falls_back_to_the_reference_in_one_line(like_a_gpu, monkeypatch,
                                                                                      capsys):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Mosaic could not lower this\nsecond line of the error")

    monkeypatch.setattr(dispatch, "_verify_kernel", broken)
    reference = _decode_step(build(CFG, seed=2, attention_impl="reference"))
    auto = _decode_step(build(CFG, seed=2, attention_impl="auto"))
    np.testing.assert_array_equal(auto, reference)  # the reference ran (the kernel would have raised)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "the Pallas verify_attention kernel failed its self-check on cpu" in lines[0]
    assert "RuntimeError: Mosaic could not lower this)" in lines[0] and "jnp reference instead" in lines[0]
    assert calls == [1]  # the check alone called it (once: the prefill and the block share it)
    # Cached: another model, another trace, no new check and no new line.
    _decode_step(build(CFG, seed=3, attention_impl="auto"))
    assert calls == [1] and capsys.readouterr().err == ""
    # A new process (the in-memory results forgotten) reads the outcome from disk, and says it again.
    assert like_a_gpu.exists()
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    _decode_step(build(CFG, seed=2, attention_impl="auto"))
    assert calls == [1]
    assert "[cached]" in capsys.readouterr().err
    # pallas forces the kernel: no check, the broken kernel runs (and raises).
    with pytest.raises(RuntimeError, match="Mosaic could not lower"):
        _decode_step(build(CFG, seed=2, attention_impl="pallas"))


def test_a_kernel_that_disagrees_with_its_reference_fails_and_a_good_one_passes(like_a_gpu, capsys):
    def wrong(*args, interpret=False):
        return anchor_block_attention(*args, interpret=True) * 1.01

    layout = selfcheck.Layout(heads=4, kv_heads=2, head_dim=16, rows=4, q_dtype="float32", kv_dtype="float32")
    assert not selfcheck.passes("anchor_block_attention", wrong, layout)
    assert "max abs difference" in capsys.readouterr().err
    # The real kernels pass (interpreted here: on a device they are compiled).
    assert selfcheck.check("verify_attention", verify_attention, LAYOUT, interpret=True) is None
    assert selfcheck.check("anchor_block_attention", anchor_block_attention, layout, interpret=True) is None
    # A layer's options are part of the key and of the check: a verify kernel that ignores the
    # sinks fails the form with sinks and a window; the real prefill kernel passes it (the real
    # verify kernel's form is compared with its reference in tests/test_kernels.py).
    gpt_oss = dataclasses.replace(LAYOUT, window=128, sinks=True)
    assert "window 128, sinks" in selfcheck._key("verify_attention", gpt_oss)

    def no_sinks(q, k, v, lengths, bm, sinks, **options):
        return verify_attention(q, k, v, lengths, bm, **options)

    assert "max abs difference" in selfcheck.check("verify_attention", no_sinks, gpt_oss, interpret=True)
    assert selfcheck.check("prefill_attention", prefill_attention, gpt_oss, interpret=True) is None


def test_cpu_auto_is_the_reference_and_checks_nothing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no kernel runs under auto on CPU")

    monkeypatch.setattr(dispatch, "_verify_kernel", never)
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    q, k = jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 32, 2, 16))
    assert dispatch.platform() == "cpu" and not dispatch.use_verify_kernel("auto", q, k)
    assert selfcheck._RESULTS == {}
