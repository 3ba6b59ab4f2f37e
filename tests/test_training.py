"""Drafter training: exact resume, checkpoint safety, frozen target, logs, configs, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from recount import tau_from_metrics
from safetensors.numpy import load_file

from dflash.config import ConfigError, ModelConfig
from dflash.configio import load_yaml
from dflash.drafters import load_drafter
from dflash.drafters.dflash import DFlashConfig, build_drafter
from dflash.errors import CheckpointError, TrainingError
from dflash.models import build
from dflash.training.config import ExperimentConfig
from dflash.training.optim import make_optimizer
from dflash.training.scalars import histogram_counts, read_scalars
from dflash.training.step import make_step_fns
from dflash.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_kill_and_resume_equals_uninterrupted(run_config, tiny_target, tmp_path):
    straight = run_training(run_config(tiny_target, tmp_path / "a"), progress=False, final_eval=False)
    assert straight["steps"] == 4
    cfg_b = run_config(tiny_target, tmp_path / "b")
    assert run_training(cfg_b, progress=False, stop_after=2) == {"stopped_at": 2}
    resumed = run_training(cfg_b, progress=False, final_eval=False)  # resumes by default
    assert resumed["steps"] == 4
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # scalars.csv: the killed run's rows are not repeated by the resumed one (timings aside, equal).
    rows_a, rows_b = (read_scalars(tmp_path / r) for r in "ab")
    assert rows_a.keys() == rows_b.keys() and "eval/acceptance/len_1" in rows_a
    for tag, (steps, values) in rows_a.items():
        assert rows_b[tag][0].tolist() == steps.tolist(), tag
        if tag != "train/tokens_per_s":
            np.testing.assert_allclose(rows_b[tag][1], values, rtol=1e-6, err_msg=tag)
    # Kept: the last 2 checkpoints (the best by eval tau is one of them or also kept).
    steps = sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-2:] == [2, 4] and len(steps) <= 3


def test_outputs_logs_metrics_and_export(run_config, tiny_target, tmp_path):
    result = run_training(run_config(tiny_target, tmp_path / "r"), progress=False)
    run = tmp_path / "r"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tau"] == result["tau"] and "outputs_differ" not in metrics
    # Each τ is tokens emitted by verify steps / verify steps (design §7), recounted from the decoded
    # tokens and the steps of its histogram (the methods emit the same tokens: checked inside).
    for tau, histogram in (("tau", "acceptance_histogram"), ("tau_ngram", "acceptance_histogram_ngram"),
                           ("tau_with_ngram", "acceptance_histogram_with_ngram")):
        assert metrics[tau] == tau_from_metrics(metrics, histogram), tau
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboardX.proto import event_pb2  # read the event file back: real scalars inside

    tags = set()
    data = events[0].read_bytes()
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + length + 4
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/tau_sim",
            "train_accuracy/pos_1", "eval/tau_real", "eval/tau_with_ngram", "eval/acceptance",
            "decode/acceptance"} <= tags  # the last two: histograms of acceptance lengths
    decoded = histogram_counts(read_scalars(run), "decode/acceptance")
    assert decoded.tolist() == metrics["acceptance_histogram"] and decoded.sum() > 0
    drafter = load_drafter(run / "export")
    assert drafter.cfg.block_size == 4
    assert (run / "config.yaml").exists()


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(run_config, tiny_target, tmp_path):
    cfg = run_config(tiny_target, tmp_path / "c")
    run_training(cfg, progress=False, stop_after=2)
    ckpt = tmp_path / "c" / "checkpoints"
    victims = [p for p in (ckpt / "2").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in victims:
        p.write_bytes(b"\x00garbage")
    snapshot = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="could be restored, nothing was changed .*step 2 .*damaged"):
        run_training(cfg, progress=False)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == snapshot


def test_the_best_checkpoint_is_kept_even_between_save_steps(run_config, tiny_target, tmp_path):
    # lr ~ 0: the eval tau never improves after step 1, so step 1 stays the best, and it is no
    # save step (save_every=4) nor one of the last keep_last=1.
    cfg = run_config(tiny_target, tmp_path / "b", "optim.lr=1e-12", "train.eval_every=1",
                     "train.save_every=4", "train.keep_last=1")
    result = run_training(cfg, progress=False, final_eval=False, export=False)
    steps = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit())
    assert result["best_step"] == 1 and steps == [1, 4]


def test_too_little_data_or_too_many_devices_are_clear_errors(run_config, tiny_target, tmp_path):
    with pytest.raises(TrainingError, match="cannot fill one batch of train.batch_size=4000"):
        run_training(run_config(tiny_target, tmp_path / "rows", "train.batch_size=4000"), progress=False)
    with pytest.raises(ConfigError, match="mesh data=64, fsdp=1, tensor=1 has 64 devices but there are 1"):
        run_training(run_config(tiny_target, tmp_path / "dev", "mesh.data=64"), progress=False)


def test_resume_without_checkpoint_and_overwrite_are_refused(run_config, tiny_target, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        run_training(run_config(tiny_target, tmp_path / "empty"), resume=True, progress=False)
    cfg = run_config(tiny_target, tmp_path / "d")
    run_training(cfg, progress=False, stop_after=2)
    with pytest.raises(TrainingError, match="refusing to overwrite"):
        run_training(cfg, resume=False, progress=False)
    # Resuming with settings that change the trajectory is refused (naming them), and nothing
    # is touched; logging/eval cadence may change.
    saved = (tmp_path / "d" / "config.yaml").read_text()
    changed = run_config(tiny_target, tmp_path / "d", "optim.lr=1e-3", "train.seed=5", "train.log_every=2")
    with pytest.raises(TrainingError, match=r"optim.lr: 0.003 -> 0.001; train.seed: 0 -> 5\)"):
        run_training(changed, progress=False)
    assert (tmp_path / "d" / "config.yaml").read_text() == saved
    cadence = run_config(tiny_target, tmp_path / "d", "train.log_every=2", "train.eval_every=4")
    assert run_training(cadence, progress=False, final_eval=False, export=False)["steps"] == 4


def _tiny_step_setup(compute=jnp.float32, num_anchors=6, *overrides: str, kl_weight: float = 0.0):
    """A random tiny target + DFlash drafter, their optimizer state and jitted step functions."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    target = build(cfg, seed=0)
    drafter = build_drafter(DFlashConfig.for_target(cfg, mask_token_id=63, block_size=4,
                                                    target_layer_ids=(1, 2)), seed=1)
    exp = load_yaml(ExperimentConfig, None, ["train.steps=8", "optim.lr=0.01", "optim.warmup_ratio=0",
                                             *overrides])
    optimizer = nnx.Optimizer(drafter, make_optimizer(exp, 8), wrt=nnx.Param)
    graphdef, state = nnx.split((drafter, optimizer))
    tgraph, tstate = nnx.split(target)
    train_step, eval_step = make_step_fns(graphdef, tgraph, dict(num_anchors=num_anchors, gamma=2.0,
                                                                 ce_weight=1.0, kl_weight=kl_weight), compute)
    return graphdef, state, tstate, train_step, eval_step


def _batch(seed: int, rows: int = 2, length: int = 16) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(0, 60, (rows, length)), jnp.int32),
            "loss_mask": jnp.ones((rows, length), bool), "segment_ids": jnp.ones((rows, length), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


def _drafter_params(graphdef, state) -> list[np.ndarray]:
    drafter, _ = nnx.merge(graphdef, state)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(drafter, nnx.Param))]


def test_frozen_target_is_bit_identical_after_steps():
    graphdef, state, tstate, train_step, _ = _tiny_step_setup(kl_weight=0.5)
    before_t = [np.array(x) for x in jax.tree.leaves(tstate)]
    before_d = _drafter_params(graphdef, state)
    batch = _batch(0)
    for i in range(3):
        state, metrics = train_step(state, tstate, batch, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) >= 0
    for a, b in zip(before_t, jax.tree.leaves(tstate), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    after_d = _drafter_params(graphdef, state)
    assert any(not np.array_equal(a, b) for a, b in zip(before_d, after_d, strict=True))


def test_train_step_without_target_logits_has_the_same_loss_and_gradient():
    """Train steps skip the target's layers above the deepest feature and its LM head when the
    loss needs no target logits; the loss and its gradient are unchanged, the simulated tau is
    then measured against the labels, and the KL term without target logits is refused."""
    from dflash.drafters import objective as obj
    from dflash.drafters.dflash import DFLASH

    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    target = build(cfg, seed=0)
    drafter = build_drafter(DFlashConfig.for_target(cfg, mask_token_id=63, block_size=4,
                                                    target_layer_ids=(1, 2)))
    batch, key = _batch(3), jax.random.key(5)
    kw = dict(num_anchors=6, gamma=2.0, ce_weight=1.0, kl_weight=0.0)

    def run(target_metrics):
        fn = lambda d: DFLASH.loss(d, target, batch, key, **kw, target_metrics=target_metrics)  # noqa: E731
        return nnx.value_and_grad(fn, has_aux=True)(drafter)

    (loss_t, m_t), g_t = run(True)
    (loss_l, m_l), g_l = run(False)
    np.testing.assert_allclose(float(loss_l), float(loss_t), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_l), jax.tree.leaves(g_t), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert float(m_l["tau_sim"]) == float(m_t["tau_sim_labels"])
    np.testing.assert_array_equal(np.asarray(m_l["accuracy"]), np.asarray(m_t["accuracy"]))
    logits = jnp.zeros((1, 1, 3, 64))
    labels = jnp.zeros((1, 1, 3), jnp.int32)
    with pytest.raises(ValueError, match="need the target's logits"):
        obj.score_blocks(logits, labels, labels == 0, labels + 1, None, gamma=2.0, ce_weight=1.0,
                         kl_weight=1.0)


def test_gradient_accumulation_equals_one_step_on_the_joined_batch():
    # With every position an anchor the loss does not depend on the key, and equal masks make
    # the joined batch's loss the mean of the two halves': 2 accumulated micro-steps == 1 step.
    b1, b2 = _batch(1), _batch(2)
    joined = {k: jnp.concatenate([b1[k], b2[k]]) for k in b1}
    graphdef, state, tstate, step, _ = _tiny_step_setup(jnp.float32, 15, "optim.grad_accum=2")
    start = _drafter_params(graphdef, state)
    state, _ = step(state, tstate, b1, jax.random.key(0))
    for a, b in zip(start, _drafter_params(graphdef, state), strict=True):
        np.testing.assert_array_equal(a, b)  # accumulating: no update yet
    state, _ = step(state, tstate, b2, jax.random.key(1))
    accumulated = _drafter_params(graphdef, state)
    graphdef1, state1, tstate1, step1, _ = _tiny_step_setup(jnp.float32, 15)
    state1, _ = step1(state1, tstate1, joined, jax.random.key(7))
    single = _drafter_params(graphdef1, state1)
    assert any(not np.array_equal(a, b) for a, b in zip(start, single, strict=True))
    # Adam's first step moves each weight by ~lr * sign(g): coordinates whose gradient is ~1e-8
    # (near eps) turn float rounding of mean(g1, g2) vs grad(mean) into ~1e-6 differences, so
    # compare the two updates to 0.1% of the step size (lr = 1e-2), not to float32 epsilon.
    for a, b, s0 in zip(accumulated, single, start, strict=True):
        np.testing.assert_allclose(a - s0, b - s0, rtol=0, atol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights_and_trains():
    batch = _batch(3)
    losses = {}
    for name, compute in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        graphdef, state, tstate, step, eval_step = _tiny_step_setup(compute)
        first = float(eval_step(state, tstate, batch, jax.random.key(0))["loss"])  # fp32 eval
        step_losses = []
        for i in range(6):
            state, m = step(state, tstate, batch, jax.random.key(i))
            step_losses.append(float(m["loss"]))  # the train step's own forward, in `compute`
        last = float(eval_step(state, tstate, batch, jax.random.key(0))["loss"])
        assert all(x.dtype == np.float32 for x in _drafter_params(graphdef, state))  # master weights
        losses[name] = step_losses[0]
        assert last < first
    # The first train step's forward (same weights, same anchors): bf16 matches fp32 to bf16
    # precision (8 bits of mantissa), and differs from it (the step really ran in bf16).
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=2e-2)
    assert losses["bf16"] != losses["fp32"]


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("drafter.block_size=1", "block_size must be an integer >= 2"),
    ("drafter.target_layer_ids=[1, 99]", "layer 99 is out of range"),
    ("drafter.mask_token_id=100000", "mask_token_id=100000 is outside the vocabulary"),
    ("target.dtype=float16", "target.dtype: 'float16' is not one of"),
    ("optim.b2=1.5", r"optim.b2 must be in \[0, 1\)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("train.gamma=-1", "train.gamma must be > 0"),
    ("train.num_devices=2", "train.num_devices=2: the device count is now set by the mesh: section"),
    ("mesh.fsdp=0", "mesh.fsdp must be a positive int or -1"),
    ("mesh.fsdp=-1", "at most one mesh axis may be -1"),
    ("drafter.mask_token_id=-5", "drafter.mask_token_id must be an integer >= 0, got -5"),
])
def test_config_errors_name_the_key(override, match, tmp_path):
    from dflash.io import load_target
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.setup import build_drafter_config

    with pytest.raises(ConfigError, match=match):
        cfg = load_yaml(ExperimentConfig, ROOT / "configs/tiny_code.yaml", [override])
        build_drafter_config(cfg, load_target(cfg.target.name).cfg, load_tokenizer(cfg.target.name))


def test_exponent_numbers_without_a_dot_are_numbers():
    # YAML 1.1 reads "1e-4" as a string; users type it that way on the command line.
    cfg = load_yaml(ExperimentConfig, ROOT / "configs/tiny_code.yaml", ["optim.lr=1e-4", "optim.clip_norm=2"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.clip_norm == 2.0


PRESETS = {"qwen3_8b_dflash.yaml": ("qwen3_8b", 5, (1, 9, 17, 25, 33)),
           "qwen3_4b_dflash.yaml": ("qwen3_4b", 5, (1, 9, 17, 25, 33)),
           "llama3_1_8b_dflash.yaml": ("llama3_1_8b", 5, (1, 8, 15, 22, 29)),
           "llama3_3_70b_dflash.yaml": ("llama3_3_70b", 5, (1, 20, 39, 58, 77)),
           "qwen3_30b_a3b_dflash.yaml": ("qwen3_30b_a3b", 5, (1, 12, 23, 34, 45)),
           "gpt_oss_20b_dflash.yaml": ("gpt_oss_20b", 5, (1, 6, 11, 16, 21)),
           "gpt_oss_120b_dflash.yaml": ("gpt_oss_120b", 5, (1, 9, 17, 25, 33))}
BLOCK_SIZE = {"gpt_oss_20b_dflash.yaml": 8, "gpt_oss_120b_dflash.yaml": 8}  # the published drafters' (or 16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_real_presets_validate_and_build_abstractly(name):
    from dflash.config import preset_for_hub_id
    from dflash.models import abstract

    cfg = load_yaml(ExperimentConfig, ROOT / "configs" / name)
    preset, layers, ids = PRESETS[name]
    model_cfg = preset_for_hub_id(cfg.target.name)
    assert abstract(model_cfg).cfg.num_params() > 4e9  # the full-size target builds abstractly
    published = (6e-4, 1.0, 0.04, 6)
    assert (cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.warmup_ratio, cfg.train.epochs) == published
    assert cfg.data.seq_len == 3072 and cfg.train.num_anchors == 512
    assert cfg.drafter.block_size == BLOCK_SIZE.get(name, 16)
    dcfg = DFlashConfig.for_target(model_cfg, mask_token_id=cfg.drafter.mask_token_id,
                                   num_layers=cfg.drafter.num_layers, block_size=cfg.drafter.block_size,
                                   target_layer_ids=cfg.drafter.target_layer_ids or None)
    assert dcfg.num_layers == layers and dcfg.target_layer_ids == ids
    shapes = nnx.eval_shape(lambda: build_drafter(dcfg))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    h = model_cfg.hidden_size
    assert n > 5 * h * h and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_smoke_preset_is_the_real_pipeline_small():
    """configs/qwen3_0_6b_smoke.yaml: the real presets' drafter shape and row length on Qwen3-0.6B,
    20 steps with checkpoints and an evaluation on the way."""
    from dflash.config import preset_for_hub_id

    cfg = load_yaml(ExperimentConfig, ROOT / "configs/qwen3_0_6b_smoke.yaml")
    model_cfg = preset_for_hub_id(cfg.target.name)
    assert cfg.train.steps == 20 and cfg.train.save_every <= 20 and cfg.train.eval_every <= 20
    assert cfg.data.seq_len == 3072 and cfg.drafter.block_size == 16 and cfg.train.num_anchors == 512
    dcfg = DFlashConfig.for_target(model_cfg, mask_token_id=cfg.drafter.mask_token_id,
                                   num_layers=cfg.drafter.num_layers, block_size=cfg.drafter.block_size,
                                   num_target_features=cfg.drafter.num_target_features)
    assert dcfg.target_layer_ids == (1, 7, 13, 19, 25)
    cfg.check_context(model_cfg.max_position_embeddings)


def test_one_and_eight_devices_give_the_same_loss(tiny_target):
    """Same batch, same step on a 1-device and an 8-device (simulated) data mesh."""
    script = f"""
import jax, numpy as np
from dflash.configio import load_yaml
from dflash.training.config import ExperimentConfig
from dflash.training.trainer import run_training
assert len(jax.devices()) == 8
out = {{}}
for n in (1, 8):
    cfg = load_yaml(ExperimentConfig, {str(ROOT / 'configs/tiny_code.yaml')!r}, [
        "target.name={tiny_target}", "run_dir={{run}}/" + str(n), "data.max_examples=40", "data.seq_len=64",
        "train.batch_size=8", "train.num_anchors=8", "train.steps=2", "train.eval_every=2",
        "drafter.block_size=4", "eval.heldout_rows=8", "regen.num_sequences=0"])
    r = run_training(cfg, progress=False, final_eval=False, devices=jax.devices()[:n])
    out[n] = r["final_eval"]["loss"]
print(out[1], out[8])
np.testing.assert_allclose(out[1], out[8], rtol=1e-5)
"""
    import tempfile

    with tempfile.TemporaryDirectory() as run:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-c", script.replace("{run}", run)], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_regenerated_documents_are_the_targets_greedy_continuations(run_config, tiny_target, tmp_path):
    from dflash.decoding import generate
    from dflash.io import load_target
    from dflash.training.data import Document
    from dflash.training.selfdistill import (
        RegenSection,
        load_documents_npz,
        regenerate_documents,
        save_documents,
    )

    target = load_target(tiny_target)
    rng = np.random.default_rng(0)
    docs = [Document(ids=rng.integers(5, 4000, n).astype(np.int32), loss_mask=np.ones(n, bool))
            for n in (40, 80, 10)]
    regen = regenerate_documents(target, docs, RegenSection(num_sequences=5, prompt_tokens=16, new_tokens=12,
                                                            batch_size=2), seed=0, eos_ids=(), progress=False)
    assert len(regen) == 5
    for d in regen:
        assert not d.loss_mask[:16].any() and d.loss_mask[16:].all() and len(d) == 28
        want = generate(target, [d.ids[:16].tolist()], max_new_tokens=12, eos_ids=()).tokens[0]
        assert d.ids[16:].tolist() == want
    save_documents(regen, tmp_path / "r.npz")
    back = load_documents_npz(tmp_path / "r.npz")
    assert all(np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_mask, b.loss_mask)
               for a, b in zip(regen, back, strict=True))
    # In a run, the regenerated data is made once and reused on resume.
    cfg = run_config(tiny_target, tmp_path / "run", "regen.num_sequences=8", "regen.prompt_tokens=16",
               "regen.new_tokens=24", "train.labels=target")
    run_training(cfg, progress=False, stop_after=2)
    stamp = (tmp_path / "run" / "regenerated.npz").stat().st_mtime_ns
    run_training(cfg, progress=False, final_eval=False)
    assert (tmp_path / "run" / "regenerated.npz").stat().st_mtime_ns == stamp
    # Data stored by other regen settings (e.g. a crashed run restarted with a new config) is
    # never reused: it is made again for the new settings, and again identically for the old.
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.rundata import prepare_data

    tok, stored = load_tokenizer(tiny_target), tmp_path / "run" / "regenerated.npz"
    first = load_documents_npz(stored)
    other = run_config(tiny_target, tmp_path / "run", "regen.num_sequences=8", "regen.prompt_tokens=16",
                       "regen.new_tokens=10")
    prepare_data(other, tok, target, tmp_path / "run", progress=False)
    assert all(len(d) <= 26 and d.loss_mask.sum() <= 10 for d in load_documents_npz(stored))
    assert max(len(d) for d in first) > 26
    prepare_data(cfg, tok, target, tmp_path / "run", progress=False)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(first, load_documents_npz(stored), strict=True))


def test_logged_metrics_are_means_over_the_accumulated_micro_batches():
    """Under grad_accum the logged loss, tau, grad norm and accuracy are the step's means, not the
    last micro-batch's (the loop logs ``mean_metrics`` of all of them)."""
    from dflash.training.step import mean_metrics
    from dflash.training.trainer import LOGGED_METRICS

    micro = [{"loss": jnp.float32(1.0), "ce": jnp.float32(2.0), "tau_sim": jnp.float32(1.5),
              "grad_norm": jnp.float32(4.0), "accuracy": jnp.asarray([0.5, 0.25]), "tokens": jnp.int32(7)},
             {"loss": jnp.float32(3.0), "ce": jnp.float32(0.0), "tau_sim": jnp.float32(2.5),
              "grad_norm": jnp.float32(2.0), "accuracy": jnp.asarray([1.0, 0.75]), "tokens": jnp.int32(9)}]
    got = mean_metrics(micro, LOGGED_METRICS)
    assert set(got) == {"loss", "ce", "tau_sim", "grad_norm", "accuracy"}
    assert (float(got["loss"]), float(got["ce"]), float(got["tau_sim"]), float(got["grad_norm"])) == (
        2.0, 1.0, 2.0, 3.0)
    np.testing.assert_array_equal(np.asarray(got["accuracy"]), [0.75, 0.5])
    assert float(mean_metrics(micro[:1], ("loss",))["loss"]) == 1.0  # grad_accum = 1: the step itself


# The published drafters for hybrid targets, as their config.json states them (sgl-project/SpecForge
# configs/qwen3.5-35b-a3b-dflash.json and qwen3.6-27b-dflash.json; z-lab/Qwen3.5-9B-DFlash config.json).
_FULL5 = ["full_attention"] * 5
HYBRID_PRESETS = {
    "qwen3_5_9b_dflash.yaml": ("qwen3_5_9b", 3072, 6, dict(
        num_hidden_layers=5, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, num_target_layers=32, layer_types=_FULL5, sliding_window=None,
        dflash_config={"mask_token_id": 248070, "target_layer_ids": [1, 8, 15, 22, 29]})),
    "qwen3_6_27b_dflash.yaml": ("qwen3_6_27b", 4096, 6, dict(
        num_hidden_layers=5, hidden_size=5120, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=17408, num_target_layers=64, sliding_window=2048, use_sliding_window=True,
        layer_types=["sliding_attention"] * 4 + ["full_attention"],
        dflash_config={"mask_token_id": 248070, "target_layer_ids": [1, 16, 31, 46, 61]})),
    "qwen3_5_35b_a3b_dflash.yaml": ("qwen3_5_35b_a3b", 4096, 10, dict(
        num_hidden_layers=8, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, num_target_layers=40, layer_types=["full_attention"] * 8, sliding_window=None,
        dflash_config={"mask_token_id": 248070, "target_layer_ids": [1, 10, 19, 28, 37]})),
}


@pytest.mark.parametrize("name", sorted(HYBRID_PRESETS))
def test_hybrid_presets_build_the_published_drafters(name):
    """Their drafters' config.json as published (shapes, layer types, window, taps, mask token) and the
    reference trainer's recipe (B = 16, 512 anchors, lr 6e-4, clip 1, 4% warmup, its length and epochs)."""
    from dflash.config import PRESETS as TARGETS
    from dflash.config import preset_for_hub_id
    from dflash.drafters.dflash import DFLASH
    from dflash.drafters.dflash.hf import drafter_hf_config

    cfg = load_yaml(ExperimentConfig, ROOT / "configs" / name)
    preset, seq_len, epochs, published = HYBRID_PRESETS[name]
    model_cfg = preset_for_hub_id(cfg.target.name)
    assert model_cfg == TARGETS[preset]
    assert (cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.warmup_ratio) == (6e-4, 1.0, 0.04)
    assert (cfg.data.seq_len, cfg.train.epochs, cfg.train.num_anchors) == (seq_len, epochs, 512)
    cfg.check_context(model_cfg.max_position_embeddings)
    dcfg = DFLASH.config(cfg.drafter, model_cfg, mask_token_id=cfg.drafter.mask_token_id,
                         block_size=cfg.drafter.block_size)
    hf = drafter_hf_config(dcfg)
    assert {key: hf[key] for key in published} == published and hf["block_size"] == 16
    # All three publish plain RoPE at theta 1e7 over 262144 positions (the target's, which the drafter takes).
    assert (hf["rope_theta"], hf.get("rope_scaling"), hf["max_position_embeddings"]) == (1e7, None, 262144)
    shapes = nnx.eval_shape(lambda: build_drafter(dcfg))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
