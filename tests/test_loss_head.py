"""The chunked, vocabulary-parallel loss head equals the dense one (value, gradient, metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices

from dflash.drafters import loss_head as lh
from dflash.drafters import objective as obj

# (ce_weight, kl_weight, target_labels): CE only, CE + KL, KL only, self-distillation CE
CASES = [(1.0, 0.0, False), (0.7, 0.3, False), (0.0, 1.0, False), (1.0, 0.0, True)]
GAMMA = 2.5


def make_case(seed: int = 0, b: int = 4, a: int = 5, k: int = 4, s: int = 29, d: int = 24, v: int = 97):
    """Awkward random shapes: R = a*k = 20 rows per sequence, some labels masked, one block fully."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    h, w, t_final = f(b, a, k, d), f(d, v) * 0.7, f(b, s, d)
    labels = jnp.asarray(rng.integers(0, v, (b, a, k)), jnp.int32)
    mask = jnp.asarray(rng.random((b, a, k)) < 0.7).at[1, 2].set(False)
    idx = jnp.asarray(rng.integers(1, s, (b, a, k)), jnp.int32)
    return h, w, t_final, labels, mask, idx


def dense(h, w, t_final, labels, mask, idx, ce_w, kl_w, tl):
    logits = jnp.einsum("BAkD,DV->BAkV", h, w, preferred_element_type=jnp.float32)
    t_logits = jnp.einsum("BSD,DV->BSV", t_final, w, preferred_element_type=jnp.float32)
    return obj.score_blocks(logits, labels, mask, idx, t_logits, gamma=GAMMA, ce_weight=ce_w, kl_weight=kl_w,
                            target_labels=tl)


def chunked(h, w, t_final, labels, mask, idx, ce_w, kl_w, tl, chunk=7):
    return lh.score_hidden(h, w, labels, mask, idx, t_final, gamma=GAMMA, ce_weight=ce_w, kl_weight=kl_w,
                           target_labels=tl, chunk=chunk)


def value_grads(fn, case, *flags, **kw):
    h, w, t_final, *rest = case
    return jax.jit(jax.value_and_grad(lambda h, w: fn(h, w, t_final, *rest, *flags, **kw), argnums=(0, 1),
                                      has_aux=True))(h, w)


def assert_same(got, want):
    (g_loss, g_metrics), g_grads = got
    (w_loss, w_metrics), w_grads = want
    np.testing.assert_allclose(float(g_loss), float(w_loss), rtol=1e-5)
    for name, value in w_metrics.items():
        np.testing.assert_allclose(np.asarray(g_metrics[name]), np.asarray(value), rtol=1e-5, err_msg=name)
    for g, r in zip(g_grads, w_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ce_w,kl_w,tl", CASES)
@pytest.mark.parametrize("chunk", [7, 20, 64])  # non-dividing, exactly R, larger than R
def test_chunked_head_equals_dense_score_blocks(ce_w, kl_w, tl, chunk):
    case = make_case()
    got = value_grads(chunked, case, ce_w, kl_w, tl, chunk=chunk)
    assert_same(got, value_grads(dense, case, ce_w, kl_w, tl))
    dh = got[1][0]
    assert float(jnp.abs(dh[1, 2]).max()) == 0.0  # a fully masked block gets no gradient


@pytest.mark.parametrize("ce_w,kl_w", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0)])
def test_chunked_loss_equals_reference_decayed_loss(ce_w, kl_w):
    """Against the autodiff-only reference: the loss value and the gradient into ``h`` and ``w``."""
    h, w, t_final, labels, mask, idx = make_case(seed=1)
    b, a, k, _ = h.shape

    def reference(h, w):
        logits = jnp.einsum("BAkD,DV->BAkV", h, w, preferred_element_type=jnp.float32)
        t_h = jnp.take_along_axis(t_final, (idx - 1).reshape(b, a * k)[..., None], axis=1)
        t_logits = (t_h @ w).reshape(logits.shape)
        return obj.reference_decayed_loss(logits, labels, mask, obj.loss_weights(k + 1, GAMMA), t_logits,
                                          ce_w, kl_w)

    got_val, got_grad = jax.value_and_grad(lambda h, w: chunked(h, w, t_final, labels, mask, idx, ce_w, kl_w,
                                                                False)[0], argnums=(0, 1))(h, w)
    want_val, want_grad = jax.value_and_grad(reference, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(float(got_val), float(want_val), rtol=1e-5)
    for g, r in zip(got_grad, want_grad, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_without_target_and_bad_input():
    h, w, _, labels, mask, idx = make_case()
    loss, m = lh.score_hidden(h, w, labels, mask, idx, None, gamma=GAMMA, ce_weight=1.0, kl_weight=0.0,
                              chunk=3)
    logits = jnp.einsum("BAkD,DV->BAkV", h, w)
    ref, rm = obj.score_blocks(logits, labels, mask, idx, None, gamma=GAMMA, ce_weight=1.0, kl_weight=0.0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    np.testing.assert_allclose(float(m["tau_sim"]), float(rm["tau_sim"]), rtol=1e-6)
    with pytest.raises(ValueError, match="KL term"):
        lh.score_hidden(h, w, labels, mask, idx, None, gamma=GAMMA, ce_weight=1.0, kl_weight=0.5)
    with pytest.raises(ValueError, match="chunk"):
        lh.row_stats(h.reshape(4, 20, -1), w, labels.reshape(4, 20), chunk=0)


def sharded_check() -> None:
    """Runs in an 8-device subprocess: every mesh gives the unsharded value, metrics and gradients."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert len(jax.devices()) == 8
    case = make_case(b=8, v=96)  # batch and vocabulary divisible by the meshes' axes
    for ce_w, kl_w, tl in CASES:
        want = value_grads(dense, case, ce_w, kl_w, tl)
        for shape in ((8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)):
            mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
            batch = NamedSharding(mesh, P(("data", "fsdp")))
            h, w, t_final, labels, mask, idx = case
            placed = (jax.device_put(h, batch), jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))),
                      jax.device_put(t_final, batch), jax.device_put(labels, batch),
                      jax.device_put(mask, batch), jax.device_put(idx, batch))
            with jax.set_mesh(mesh):
                got = value_grads(chunked, placed, ce_w, kl_w, tl, chunk=6)
            assert_same(got, want)
            print("ok", shape, ce_w, kl_w, tl)


@on_cpu_devices(8)
def test_vocabulary_parallel_head_on_8_devices():
    sharded_check()  # asserts every mesh equals the unsharded result
