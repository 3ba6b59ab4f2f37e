"""Training on a mesh: same loss, gradients and steps on every mesh; checkpoints move between meshes.

Bodies run in a subprocess with 8 simulated CPU devices (``tests/devices.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices
from flax import nnx
from test_sharding import CFG, _mesh, _models

from dflash import sharding as sh

STEP_KW = dict(num_anchors=6, gamma=2.0, ce_weight=1.0, kl_weight=0.5)


def _batch(rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Two packed documents per row (segment ids 1, 2), the loss on every token."""
    rng = np.random.default_rng(0)
    seg = np.where(np.arange(length) < 7, 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(length), np.arange(length) - 7)
    return {"tokens": rng.integers(4, CFG.vocab_size, (rows, length)).astype(np.int32),
            "loss_mask": np.ones((rows, length), bool), "segment_ids": np.broadcast_to(seg, (rows, length)),
            "positions": np.broadcast_to(pos, (rows, length)).astype(np.int32)}


def _run_steps(method: str, shape: tuple[int, ...], steps: int = 3, cfg=CFG, grads: bool = True):
    """Loss and gradients at the start (``grads``; else None, None), then ``steps`` train steps, all
    on mesh ``shape`` (``(data, fsdp, tensor[, expert])``) with a target of ``cfg``."""
    from dflash.configio import load_yaml
    from dflash.drafters.orthrus import OrthrusConfig, OrthrusDrafter
    from dflash.training.config import ExperimentConfig
    from dflash.training.optim import make_optimizer
    from dflash.training.setup import train_state
    from dflash.training.step import drafter_forward, make_step_fns

    mesh = _mesh(shape)
    make_target, make_dflash, _ = _models(cfg)
    target = sh.init_sharded(make_target, mesh)
    if method == "orthrus":
        ocfg = OrthrusConfig.for_target(cfg, mask_token_id=3, block_size=4)
        drafter = OrthrusDrafter.from_target(target, ocfg)
    else:
        drafter = sh.init_sharded(make_dflash, mesh)
    exp = load_yaml(ExperimentConfig, None, ["train.steps=8", "optim.lr=0.01", "optim.warmup_ratio=0"])
    graphdef, state, shardings = train_state(drafter, make_optimizer(exp, 8), mesh)
    tgraph, tstate = nnx.split(target)
    tshardings = sh.tree_shardings(tstate, mesh)
    train_step, _ = make_step_fns(graphdef, tgraph, STEP_KW, jnp.float32, mesh=mesh,
                                  state_shardings=shardings, tstate_shardings=tshardings)
    put = sh.batch_sharding(mesh)
    batch = {k: jax.make_array_from_process_local_data(put, v) for k, v in _batch().items()}

    @jax.jit
    def loss_and_grads(state, tstate, batch, key):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            d, _ = nnx.merge(graphdef, state)
            t = nnx.merge(tgraph, tstate)
            grad_fn = nnx.value_and_grad(lambda d: drafter_forward(d, t, batch, key, **STEP_KW)[0])
            return grad_fn(d)

    loss, grads = loss_and_grads(state, tstate, batch, jax.random.key(7)) if grads else (None, None)
    for i in range(steps):
        state, metrics = train_step(state, tstate, batch, jax.random.key(i))
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)  # params and optimizer state stay put
    params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    return (loss and float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)],
            [np.asarray(x) for x in params], float(metrics["loss"]))


@pytest.mark.slow
@on_cpu_devices(8)
def test_loss_gradients_and_train_steps_agree_on_every_mesh():
    """Data x fsdp x tensor, and fsdp x tensor with more tensor than kv heads (the forward also runs
    on (1, 4, 2): test_sharding; data alone, 8 ways: test_training's one vs eight devices)."""
    for method in ("dflash", "orthrus"):
        loss0, grads0, params0, last0 = _run_steps(method, (1, 1, 1))
        for shape in ((2, 2, 2), (1, 2, 4)):
            loss, grads, params, last = _run_steps(method, shape)
            where = f"{method} on mesh {shape}"
            np.testing.assert_allclose(loss, loss0, rtol=2e-5, err_msg=where)
            np.testing.assert_allclose(last, last0, rtol=2e-5, err_msg=where)
            for g, g0 in zip(grads, grads0, strict=True):
                np.testing.assert_allclose(g, g0, rtol=2e-4, atol=2e-6, err_msg=where)
            # Adam's first steps are ~lr * sign(g): a gradient entry at rounding level may move its
            # parameter by a different fraction of lr (seen: 1.6e-5 of lr=1e-2 in 1 of 2048). Params
            # are compared to 1% of one step; a sharding bug moves them by whole steps.
            for x, x0 in zip(params, params0, strict=True):
                np.testing.assert_allclose(x, x0, rtol=2e-4, atol=1e-4, err_msg=where)


@on_cpu_devices(8)
def test_train_steps_on_an_expert_parallel_mesh_equal_one_device():
    """DFlash on a MoE target (layers 0 and 2: 4 experts, top 2) on data=2 x tensor=2 x expert=2:
    the target's MoE layers dispatch their tokens over expert; three steps give the one-device
    drafter. (Gradients through the dispatch, what Orthrus needs: tests/test_moe.py.)"""
    import dataclasses

    from dflash.config import LayerSpec

    moe = LayerSpec(mixer_options={"qk_norm": True}, mlp="moe", mlp_options={
        "experts": 4, "top_k": 2, "norm_topk_prob": True, "intermediate_size": 16})
    cfg = dataclasses.replace(CFG, model_type="qwen3_moe", layers=(moe, CFG.layers[1], moe))
    _, _, params0, last0 = _run_steps("dflash", (1, 1, 1), cfg=cfg, grads=False)
    _, _, params, last = _run_steps("dflash", (2, 1, 2, 2), cfg=cfg, grads=False)
    np.testing.assert_allclose(last, last0, rtol=2e-5)
    for x, x0 in zip(params, params0, strict=True):  # (tolerance: the test above)
        np.testing.assert_allclose(x, x0, rtol=2e-4, atol=1e-4)


def _exported(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.mark.slow
@on_cpu_devices(8)
def test_checkpoints_move_between_meshes_and_resume_exactly_on_one():
    from conftest import make_tiny_target, tiny_run_config

    from dflash.training.trainer import run_training

    mesh222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    one, eight = jax.devices()[:1], jax.devices()
    quiet = dict(progress=False, final_eval=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        target = make_tiny_target(tmp / "target")
        run = lambda name, *extra: tiny_run_config(target, tmp / name, *extra)  # noqa: E731
        run_training(run("straight", *mesh222), devices=eight, **quiet)
        stopped = run_training(run("killed", *mesh222), devices=eight, stop_after=2, **quiet)
        assert stopped == {"stopped_at": 2}
        shutil.copytree(tmp / "killed", tmp / "to_one")
        run_training(run("killed", *mesh222), devices=eight, **quiet)  # resumed on the same mesh
        straight = _exported(tmp / "straight")
        for name, value in _exported(tmp / "killed").items():  # exact resume: bit-identical
            np.testing.assert_array_equal(value, straight[name], err_msg=name)
        # (2, 2, 2) -> (1, 1, 1): the checkpoint restores onto one device and continues.
        run_training(run("to_one"), devices=one, **quiet)
        # (1, 1, 1) -> (2, 2, 2).
        run_training(run("to_eight"), devices=one, stop_after=2, **quiet)
        run_training(run("to_eight", *mesh222), devices=eight, **quiet)
        for moved in ("to_one", "to_eight"):
            for name, value in _exported(tmp / moved).items():
                np.testing.assert_allclose(value, straight[name], rtol=2e-4, atol=1e-4,
                                           err_msg=f"{moved} {name}")
        # The exporter reads the (2, 2, 2) checkpoint in a process with one device.
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run([sys.executable, "-m", "dflash.cli.export", "--run", str(tmp / "straight"),
                               "--step", "4", "--out", str(tmp / "exported")], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from safetensors.numpy import load_file

        for name, value in load_file(str(tmp / "exported" / "model.safetensors")).items():
            np.testing.assert_array_equal(value, straight[name], err_msg=name)
