"""The Pallas TPU kernels compile through Mosaic for real chips (v5e, v5p) at Qwen3-8B head shapes.

No TPU needed: ``libtpu`` describes the slice on this host (dflash.plan) and the kernels are
lowered with ``interpret=False`` and compiled by the TPU compiler, as on hardware.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("libtpu")

from dflash import plan  # noqa: E402
from dflash.kernels.anchor_attention import anchor_block_attention  # noqa: E402
from dflash.kernels.prefill_attention import prefill_attention  # noqa: E402
from dflash.kernels.verify_attention import verify_attention  # noqa: E402

N, KH, H = 32, 8, 128  # Qwen3-8B: 32 query heads, 8 kv heads, head_dim 128
BF16 = jnp.bfloat16


# An instruction of compiled HLO that calls a Mosaic kernel: ``%NAME.N = ... custom-call(...),
# custom_call_target="tpu_custom_call"``, NAME being the ``pallas_call``'s ``name=``.
MOSAIC_CALL = re.compile(r'^\s*(?:ROOT )?%([\w-]+?)(?:\.\d+)? = [^\n]*custom_call_target="tpu_custom_call"',
                         re.M)


def compile_on_chip(topology: str, kernel: str, fn, *shapes):
    """Compiles ``fn`` for one chip of ``topology``, checks that it calls the Mosaic kernel named
    ``kernel`` once (not a jnp fallback, whose layout custom calls the text also holds), and
    returns the executable's memory analysis."""
    device = plan.topology_devices(topology)[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P())) for shape, dtype in shapes]
    with plan.compiling_for("tpu"), jax.set_mesh(mesh):  # the mesh tells Mosaic which chip
        compiled = jax.jit(fn).lower(*args).compile()
    assert MOSAIC_CALL.findall(compiled.as_text()) == [kernel]
    return compiled.memory_analysis()


# (topology, window, sinks): the plain kernels on both chips, gpt-oss's options (a window of 128
# and attention sinks) on v5e.
OPTIONS = [("v5e-8", 0, False), ("v5p-8", 0, False), ("v5e-8", 128, True)]


def _sinks(sinks: bool) -> tuple:
    return (((N,), jnp.float32),) if sinks else ()


@pytest.mark.parametrize("topology,window,sinks", OPTIONS)
def test_verify_kernel_compiles(topology, window, sinks):
    b, t, s = 2, 16, 2048
    fn = lambda q, k, v, lens, bm, *sk: verify_attention(q, k, v, lens, bm, *sk, window=window,  # noqa: E731
                                                         backend="tpu")
    mem = compile_on_chip(topology, "verify_attention_tpu", fn, ((b, t, N, H), BF16), ((b, s, KH, H), BF16),
                          ((b, s, KH, H), BF16), ((b,), jnp.int32), ((t, t), jnp.bool_), *_sinks(sinks))
    assert mem.output_size_in_bytes == b * t * N * H * 2


@pytest.mark.parametrize("topology", ["v5e-8", "v5p-8"])
def test_anchor_kernel_compiles(topology):
    b, a, q, s = 2, 16, 16, 1024
    fn = lambda q_, kc, vc, kb, vb, m: anchor_block_attention(q_, kc, vc, kb, vb, m, backend="tpu")  # noqa: E731
    mem = compile_on_chip(topology, "anchor_block_attention_tpu", fn, ((b, a, q, N, H), BF16),
                          ((b, s, KH, H), BF16), ((b, s, KH, H), BF16), ((b, a, q, KH, H), BF16),
                          ((b, a, q, KH, H), BF16), ((b, a, s), jnp.bool_))
    assert mem.output_size_in_bytes == b * a * q * N * H * 2


# ... and Qwen3-30B-A3B's 8 query heads per kv head (32 / 4), whose query tile is capped at 128 rows
# (prefill_attention.MAX_GROUP_ROWS: in the preset's train plan a 256-row tile asked for 17.7 MiB of
# v5e's 16 MiB of scoped VMEM; compiled alone here it fits either way, so the plan is the check).
@pytest.mark.parametrize("topology,window,sinks,kv_heads",
                         [(*o, KH) for o in OPTIONS] + [("v5e-8", 0, False, 4)])
def test_prefill_kernel_compiles(topology, window, sinks, kv_heads):
    b, s = 2, 3072  # the presets' seq_len, 2 rows per chip as in their plans
    fn = lambda q, k, v, seg, *sk: prefill_attention(q, k, v, seg, *sk, window=window)  # noqa: E731
    mem = compile_on_chip(topology, "prefill_attention_tpu", fn, ((b, s, N, H), BF16),
                          ((b, s, kv_heads, H), BF16), ((b, s, kv_heads, H), BF16), ((b, s), jnp.int32),
                          *_sinks(sinks))
    assert mem.output_size_in_bytes == b * s * N * H * 2
    # flash: temporaries (layout copies of q/k/v/out) a small fraction of the dense form's
    # [N, S, S] fp32 scores (1.2 GB here)
    assert mem.temp_size_in_bytes < N * s * s * 4 // 10


@pytest.mark.parametrize("topology", ["v5e-8", "v5p-8"])
def test_grouped_matmul_kernel_compiles(topology):
    """A MoE layer's grouped matmul at Qwen3-30B-A3B shapes (128 experts, D=2048, F=768; 4096
    token-expert pairs) goes through megablox ``gmm`` on TPU (``attention_impl=auto``)."""
    from dflash.kernels.dispatch import grouped_matmul

    m, e, d, f = 4096, 128, 2048, 768
    fn = lambda x, w, sizes: grouped_matmul(x, w, sizes, impl="auto")  # noqa: E731
    mem = compile_on_chip(topology, "gmm", fn, ((m, d), BF16), ((e, d, f), BF16), ((e,), jnp.int32))
    assert mem.output_size_in_bytes == m * f * 2


def test_expert_parallel_moe_compiles_for_a_v5e_mesh():
    """On TPU the expert-parallel MoE layer (fsdp=2 x expert=4 of a v5e-8) sends its tokens with
    ``ragged_all_to_all`` (which XLA:CPU lacks: the CPU tests run the slotted ``all_to_all``) and
    runs its three grouped matmuls through ``gmm``."""
    from flax import nnx

    from dflash import sharding as sh
    from dflash.config import LayerSpec, ModelConfig
    from dflash.models.moe_mlp import MoE

    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=256, intermediate_size=256,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=128)
    spec = LayerSpec(mlp="moe", mlp_options={"experts": 8, "top_k": 2, "intermediate_size": 256})

    class Layer(nnx.Module):
        def __init__(self):
            self.mlp = MoE(cfg, spec, dtype=BF16, rngs=nnx.Rngs(0))

    mesh = sh.make_mesh(sh.MeshConfig(1, 2, 1, expert=4), plan.topology_devices("v5e-8"))
    graphdef, state = nnx.split(sh.abstract_sharded(Layer, mesh))
    x = jax.ShapeDtypeStruct((8, 32, 256), BF16, sharding=sh.batch_sharding(mesh))
    with plan.compiling_for("tpu"), jax.set_mesh(mesh):
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s).mlp(x)).lower(state, x).compile().as_text()
    assert MOSAIC_CALL.findall(text) == ["gmm"] * 3
    assert len(re.findall(r"= [^\n]* ragged-all-to-all\(", text)) == 3  # rows, expert ids there; outputs back
