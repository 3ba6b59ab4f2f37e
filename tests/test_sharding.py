"""Meshes and the partition-rule table: specs, bytes per device, sharded == unsharded, errors.

Multi-device bodies run in a subprocess with 8 simulated CPU devices (``tests/devices.py``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash import sharding as sh
from dflash.config import ConfigError, ModelConfig

MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4), (1, 1, 1))
# Every sharded dimension divisible by 4; kv heads (2) too few for tensor=4 (the cache then
# keeps its heads whole); awkward sequence / block sizes.
CFG = ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
    """``(data, fsdp, tensor)`` (expert 1) as an abstract mesh of ``sh.AXES``."""
    sizes = sh.MeshConfig(*shape).shape(math.prod(shape))
    return AbstractMesh(sizes, sh.AXES, axis_types=(AxisType.Auto,) * len(sh.AXES))


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    return sh.make_mesh(sh.MeshConfig(*shape), jax.devices()[: math.prod(shape)])


def _models(cfg: ModelConfig = CFG):
    """Constructors of a target, a DFlash drafter and an Orthrus drafter for ``cfg``."""
    from dflash.drafters.dflash import DFlashConfig, DFlashDrafter
    from dflash.drafters.orthrus import OrthrusConfig, OrthrusDrafter
    from dflash.models.transformer import Transformer

    dcfg = DFlashConfig.for_target(cfg, mask_token_id=3, num_layers=2, block_size=4, target_layer_ids=(0, 2))
    ocfg = OrthrusConfig.for_target(cfg, mask_token_id=3, block_size=4)
    return (lambda: Transformer(cfg, rngs=nnx.Rngs(0)), lambda: DFlashDrafter(dcfg, rngs=nnx.Rngs(1)),
            lambda: OrthrusDrafter(ocfg, rngs=nnx.Rngs(2)))


# ----------------------------------------------------------------------------- no devices needed
def test_mesh_config_resolves_and_refuses_bad_shapes():
    assert sh.AXES == ("data", "fsdp", "expert", "tensor")  # shape()'s order; positional: data, fsdp, tensor
    assert sh.MeshConfig().shape(8) == (8, 1, 1, 1)
    assert sh.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 1, 2)
    assert sh.MeshConfig(1, 4, 2).shape(8) == (1, 4, 1, 2)
    assert sh.MeshConfig(1, 2, 2, 2).shape(8) == sh.MeshConfig(1, 2, 2, expert=-1).shape(8) == (1, 2, 2, 2)
    with pytest.raises(sh.ShardingError, match="at most one mesh axis may be -1"):
        sh.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(sh.ShardingError, match="mesh.tensor must be a positive int"):
        sh.MeshConfig(tensor=0)
    with pytest.raises(sh.ShardingError, match="has 4 devices but there are 8"):
        sh.MeshConfig(2, 2, 1).shape(8)
    with pytest.raises(sh.ShardingError, match="do not divide the 8 devices"):
        sh.MeshConfig(-1, 3, 1).shape(8)
    assert issubclass(sh.ShardingError, ConfigError)
    with pytest.raises(sh.ShardingError, match="has 8 devices but there are 1"):
        sh.make_mesh(sh.MeshConfig(2, 2, 2))


def test_cross_host_split_puts_hosts_on_the_outer_axes():
    assert sh.dcn_split((4, 2, 1), 2) == (2, 1, 1)
    assert sh.dcn_split((1, 8, 2), 4) == (1, 4, 1)
    assert sh.dcn_split((2, 4, 2), 8) == (2, 4, 1)
    with pytest.raises(sh.ShardingError, match="cannot be laid out over 3 hosts"):
        sh.dcn_split((2, 2, 2), 3)


def test_rule_table_specs():
    mesh = _abstract_mesh((2, 2, 2))
    spec = lambda path, shape: sh.param_spec(path, shape, mesh)  # noqa: E731
    assert spec("layers.0.self_attn.q_proj.kernel", (32, 32)) == P("fsdp", "tensor")
    assert spec("layers.0.self_attn.k_proj.kernel", (32, 16)) == P("fsdp", "tensor")
    assert spec("layers.1.self_attn.o_proj.kernel", (32, 32)) == P("tensor", "fsdp")
    assert spec("layers.0.mlp.up_proj.kernel", (32, 64)) == P("fsdp", "tensor")
    assert spec("layers.0.mlp.down_proj.kernel", (64, 32)) == P("tensor", "fsdp")
    assert spec("layers.2.v_proj_diff.kernel", (32, 16)) == P("fsdp", "tensor")
    assert spec("layers.2.o_proj_diff.kernel", (32, 32)) == P("tensor", "fsdp")
    assert spec("layers.0.self_attn.q_proj.bias", (32,)) == P("tensor")
    assert spec("layers.0.self_attn.o_proj.bias", (32,)) == P(None)
    assert spec("embed_tokens", (256, 32)) == P("tensor", "fsdp")
    assert spec("lm_head", (32, 256)) == P("fsdp", "tensor")
    assert spec("fc.kernel", (64, 32)) == P("fsdp", None)
    for norm in ("norm.weight", "layers.0.input_layernorm.weight", "layers.0.q_norm_diff.weight",
                 "layers.0.self_attn.k_norm.weight", "hidden_norm.weight"):
        assert spec(norm, (32,)) == P(None)
    # Size-1 axes are left out; data never splits a parameter.
    assert sh.param_spec("lm_head", (32, 256), _abstract_mesh((8, 1, 1))) == P(None, None)
    assert sh.param_spec("lm_head", (32, 256), _abstract_mesh((1, 2, 4))) == P("fsdp", "tensor")
    # Optimizer-state leaves match by the end of their path.
    assert spec("opt_state.0.mu.layers.0.mlp.gate_proj.kernel", (32, 64)) == P("fsdp", "tensor")


def test_indivisible_dimension_names_the_tensor_and_the_axis():
    mesh = _abstract_mesh((1, 2, 4))
    k_proj = r"'layers.3.self_attn.k_proj.kernel' \(32, 10\): dimension 1 \(kv_heads, size 10\)"
    with pytest.raises(sh.ShardingError, match=k_proj + " is not divisible by mesh axis tensor of size 4"):
        sh.param_spec("layers.3.self_attn.k_proj.kernel", (32, 10), mesh)
    with pytest.raises(sh.ShardingError, match="'embed_tokens'.*dimension 1 .*mesh axis fsdp of size 2"):
        sh.param_spec("embed_tokens", (256, 33), mesh)
    replicated = sh.param_spec("layers.3.self_attn.k_proj.kernel", (32, 10), mesh, replicate_indivisible=True)
    assert replicated == P("fsdp", None)
    with pytest.raises(sh.ShardingError, match="no sharding rule matches parameter 'layers.0.mystery'"):
        sh.param_spec("layers.0.mystery", (4, 4), mesh)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert sh.constrain(x, ("batch", ..., "vocab")) is x
    same = []
    jax.jit(lambda a: same.append(sh.constrain(a, ("batch", None, "mlp")) is a) or a)(x)  # traced too
    assert same == [True]


# ----------------------------------------------------------------------------- 8 simulated devices
@on_cpu_devices(8)
def test_params_are_born_in_their_shards_with_the_rule_tables_bytes():
    def split_over(name: str) -> tuple[str, ...]:  # by hand: matrices fsdp x tensor, fc fsdp, norms none
        owner = name.split(".")[-2] if name.endswith((".kernel", ".weight")) else name
        return () if "norm" in owner else ("fsdp",) if owner == "fc" else ("fsdp", "tensor")

    for shape in MESHES:
        mesh = _mesh(shape)
        for make in _models():
            eager = jax.jit(lambda make=make: nnx.state(make()))()  # same numbers, one device
            model = sh.init_sharded(make, mesh)
            for (path, arr), ref in zip(jax.tree_util.tree_leaves_with_path(nnx.state(model)),
                                        jax.tree.leaves(eager), strict=True):
                name = sh.dotted(path)
                assert arr.sharding.spec == sh.param_spec(name, arr.shape, mesh), name
                split = math.prod(dict(zip(("data", "fsdp", "tensor"), shape, strict=True))[a]
                                  for a in split_over(name))
                assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // split}, name
                np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref), err_msg=name)
    # FSDP = 4: a quarter of each sharded tensor per device; norms whole.
    mesh = _mesh((2, 4, 1))
    target = sh.init_sharded(_models()[0], mesh)
    assert target.layers[0].mlp.up_proj.kernel[...].addressable_shards[0].data.shape == (8, 64)
    assert target.norm.weight[...].addressable_shards[0].data.shape == (32,)
    table = sh.describe_sharding(target, mesh)
    assert "layers.0.mlp.up_proj.kernel" in table and "P('fsdp', None)" in table
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(target)))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.state(target)))
    assert table.splitlines()[-1].endswith(f"{per_device:,} of {total:,}")


def _forwards(target, dflash, orthrus):
    """Logits / hidden states of every model path the trainer and the engine use (jit, on a mesh)."""
    from dflash.models import init_cache

    rng = np.random.default_rng(0)
    b, s, a, q = 8, 13, 3, 4
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, s)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    anchors = jnp.asarray(rng.integers(2, s - q, (b, a)), jnp.int32)
    q_pos = anchors[..., None] + jnp.arange(q, dtype=jnp.int32)  # [B, A, Q]
    ctx_mask = jnp.arange(s)[None, None, :] < anchors[..., None]  # [B, A, S]
    slot_mask = jnp.arange(16)[None, None, :] < anchors[..., None]  # [B, A, 16] over a 16-slot cache
    x_blk = jnp.asarray(rng.normal(size=(b, a, q, CFG.hidden_size)), jnp.float32)

    @jax.jit
    def run(target, dflash, orthrus):
        out = target(tokens, pos, hidden_layers=(0, 2))
        cache = target(tokens[:, :9], pos[:, :9], init_cache(CFG, b, 16)).cache
        verify = target(tokens[:, 9:], pos[:, 9:], cache)
        feats = jnp.moveaxis(out.hidden, 0, 2).reshape(b, s, -1)  # [B, S, n*D]
        ctx = dflash.project_context(feats)
        d_train = dflash(x_blk, q_pos, ctx, pos, ctx_mask)
        dcache = dflash.extend_context(dflash.init_context_cache(b, 16), feats[:, :9], pos[:, :9],
                                       jnp.full((b,), 9, jnp.int32))
        d_draft = dflash.draft_logits(target, dcache, tokens[:, 9])
        full = target(tokens, pos, init_cache(CFG, b, 16)).cache
        o_train = orthrus(target, x_blk, q_pos, full.layers, slot_mask)
        o_draft = orthrus.draft_logits(target, cache, tokens[:, 9])
        return dict(logits=out.logits, hidden=out.hidden, verify=verify.logits,
                    cache_k=[s.k for s in verify.cache.layers],
                    d_train=d_train, d_draft=d_draft, o_train=o_train, o_draft=o_draft)

    return run(target, dflash, orthrus)


@on_cpu_devices(8)
def test_forward_on_every_mesh_equals_unsharded():
    makes = _models()
    models = [make() for make in makes]
    want = _forwards(*models)
    for shape in MESHES:
        mesh = _mesh(shape)
        sharded = [sh.shard_model(m, mesh) for m in models]
        with jax.set_mesh(mesh):
            got = _forwards(*sharded)
        for key in want:
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=2e-5, atol=2e-5,
                                       err_msg=f"{key} on mesh {shape}")
        # The constraints are live: logits vocabulary-parallel, batch over data x fsdp, cache by batch.
        batch = tuple(a for a, n in zip(("data", "fsdp"), shape, strict=False) if n > 1)
        batch_entry = None if not batch else batch[0] if len(batch) == 1 else batch
        vocab = "tensor" if shape[2] > 1 else None
        want_logits = NamedSharding(mesh, P(batch_entry, None, vocab))
        assert got["logits"].sharding.is_equivalent_to(want_logits, 3), (shape, got["logits"].sharding)
        kv_heads = "tensor" if shape[2] == 2 else None  # 2 kv heads: tensor=4 does not divide them
        want_cache = NamedSharding(mesh, P(batch_entry, None, kv_heads, None))  # each layer's [B, S, K, H]
        for k_layer in got["cache_k"]:
            assert k_layer.sharding.is_equivalent_to(want_cache, 4), (shape, k_layer.sharding)


@on_cpu_devices(8)
def test_sharded_load_reads_slices_into_shards_and_equals_unsharded_load():
    from dflash.drafters.dflash.hf import load_drafter, save_drafter
    from dflash.drafters.orthrus.hf import load_orthrus, save_orthrus
    from dflash.io import load_target, loading, save_target

    target, dflash, orthrus = (make() for make in _models())
    reads: list[tuple[str, int, int]] = []  # (key, bytes read, bytes of the whole tensor)
    full_slice = loading._TensorSource.slice

    class Recorder:  # a safetensors slice that logs the bytes each read returns
        def __init__(self, view, key):
            self.view, self.key = view, key

        def get_shape(self):
            return self.view.get_shape()

        def __getitem__(self, index):
            part = self.view[index]
            reads.append((self.key, part.nbytes, math.prod(self.get_shape()) * part.itemsize))
            return part

    def never_whole(self, key):
        raise AssertionError(f"sharded load read {key} whole")

    with tempfile.TemporaryDirectory() as tmp:
        save_target(target, Path(tmp) / "t")
        save_drafter(dflash, Path(tmp) / "d", target_name=str(Path(tmp) / "t"), target_cfg=CFG)
        save_orthrus(orthrus, target, Path(tmp) / "o", target_name=str(Path(tmp) / "t"), form="delta")
        plain = [load_target(Path(tmp) / "t"), load_drafter(Path(tmp) / "d", CFG),
                 load_orthrus(Path(tmp) / "o", target_cfg=CFG)]
        loading._TensorSource.slice = lambda self, key: Recorder(full_slice(self, key), key)
        loading._TensorSource.get = never_whole
        for shape in ((2, 2, 2), (1, 2, 4)):
            mesh = _mesh(shape)
            reads.clear()
            loaded = [load_target(Path(tmp) / "t", mesh=mesh), load_drafter(Path(tmp) / "d", CFG, mesh=mesh),
                      load_orthrus(Path(tmp) / "o", target_cfg=CFG, mesh=mesh)]
            for ours, ref in zip(loaded, plain, strict=True):
                for (path, arr), want in zip(jax.tree_util.tree_leaves_with_path(nnx.state(ours)),
                                             jax.tree.leaves(nnx.state(ref)), strict=True):
                    name = sh.dotted(path)
                    assert arr.sharding.spec == sh.param_spec(name, arr.shape, mesh), name
                    np.testing.assert_array_equal(np.asarray(arr), np.asarray(want), err_msg=name)
            # Each distinct shard is read once: a tensor's reads add up to the tensor, never more.
            per_key: dict[str, int] = {}
            for key, nbytes, whole in reads:
                per_key[key] = per_key.get(key, 0) + nbytes
                assert per_key[key] <= whole, key
            assert len(per_key) == sum(len(jax.tree.leaves(nnx.state(m))) for m in loaded)
            assert all(per_key[k] == whole for k, _, whole in reads)
            q = "model.layers.0.self_attn.q_proj.weight"
            assert {n for k, n, _ in reads if k == q} == {per_key[q] // (shape[1] * shape[2])}
