"""dflash-export from run checkpoints; import from directories, hub-cache ids and the published
layout; round trips; continued training; clear errors for foreign or broken drafters."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from recount import tau_from_steps
from safetensors.numpy import load_file, save_file

from dflash.cli.export import main as export_main
from dflash.config import PRESETS
from dflash.drafters import load_drafter
from dflash.drafters.dflash import DFlashConfig, DFlashDrafter, build_drafter
from dflash.drafters.dflash.hf import SHIPPED_DRAFTERS, config_from_hf, drafter_rows, save_drafter
from dflash.errors import CheckpointError, TrainingError
from dflash.io import load_target
from dflash.io.tokenizer import load_tokenizer
from dflash.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_target, run_config, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (and its own final export)."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    run_training(run_config(tiny_target, run_dir), progress=False, final_eval=False)
    return run_dir


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    return load_file(str(directory / "model.safetensors"))


def _export(*args: str) -> int:
    return export_main([str(a) for a in args])


def test_latest_checkpoint_export_equals_the_runs_final_export(run, tmp_path, capsys):
    assert _export("--run", run, "--out", tmp_path / "latest") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 4 and info["target_bundled"] is False  # a local random target: not bundled
    ours, final = _tensors(tmp_path / "latest"), _tensors(run / "export")
    assert set(ours) == set(final)
    for name in final:
        np.testing.assert_array_equal(ours[name], final[name], err_msg=name)
    assert (json.loads((tmp_path / "latest" / "config.json").read_text())
            == json.loads((run / "export" / "config.json").read_text()))
    assert not (tmp_path / "latest" / "target").exists()


def test_any_checkpoint_exports_and_loads(run, tiny_target, tmp_path):
    assert _export("--checkpoint", run / "checkpoints" / "2", "--out", tmp_path / "s2") == 0
    step2, step4 = _tensors(tmp_path / "s2"), _tensors(run / "export")
    assert {k: v.shape for k, v in step2.items()} == {k: v.shape for k, v in step4.items()}
    assert any(not np.array_equal(step2[k], step4[k]) for k in step2)  # two steps of training apart
    best = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())["best_step"]
    assert _export("--run", run, "--step", "best", "--out", tmp_path / "best") == 0
    assert _export("--checkpoint", run / "checkpoints" / str(best), "--out", tmp_path / "direct") == 0
    for name, value in _tensors(tmp_path / "direct").items():
        np.testing.assert_array_equal(_tensors(tmp_path / "best")[name], value, err_msg=name)
    load_drafter(tmp_path / "s2", load_target(tiny_target).cfg)


def test_bf16_export_and_bundled_target(run, tiny_target, tmp_path):
    assert _export("--run", run, "--out", tmp_path / "b", "--dtype", "bf16", "--with-target") == 0
    b16, f32 = _tensors(tmp_path / "b"), _tensors(run / "export")
    for name, value in b16.items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(value, f32[name].astype(jnp.bfloat16))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bundled, original = load_target(tmp_path / "b" / "target"), load_target(tiny_target)
    for a, b in zip(jax.tree.leaves(nnx.state(bundled)), jax.tree.leaves(nnx.state(original)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    drafter = load_drafter(tmp_path / "b", bundled.cfg)
    assert drafter.fc.kernel[...].dtype == jnp.float32  # loads into the requested compute dtype


def test_round_trip_is_bit_identical_and_drafts_identically(tmp_path):
    target = load_target("tiny-code")
    mask = load_tokenizer("tiny-code").mask_token_id
    cfg = DFlashConfig.for_target(target.cfg, mask_token_id=mask, num_layers=2, block_size=5)
    original = build_drafter(cfg, seed=3)
    a = save_drafter(original, tmp_path / "a", target_name="tiny-code", target_cfg=target.cfg)
    imported = load_drafter(a, target.cfg)
    b = save_drafter(imported, tmp_path / "b", target_name="tiny-code", target_cfg=target.cfg)
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    # Same drafts from the same context: the imported drafter is the trained one.
    key = jax.random.key(0)
    feats = jax.random.normal(key, (2, 11, len(cfg.target_layer_ids) * cfg.hidden_size))  # [B, T, n*D]
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    logits = []
    for drafter in (original, imported):
        cache = drafter.init_context_cache(2, 32)
        cache = drafter.extend_context(cache, feats, positions, jnp.array([11, 7]))
        logits.append(drafter.draft_logits(target, cache, jnp.array([5, 9])))
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))


def _hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/files), as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return root


def test_hub_id_from_the_local_cache_runs_in_generate(tmp_path):
    cache = _hub_cache(tmp_path / "hub", "z-lab/tiny-code-DFlash-b16", SHIPPED_DRAFTERS["tiny-code-dflash"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}

    def generate(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "dflash.cli.generate", "--prompt", "def mean(xs):",
                              "--max-new-tokens", "24", "--json", *extra],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    ar, spec = generate(), generate("--drafter", "z-lab/tiny-code-DFlash-b16")
    assert spec["tokens"] == ar["tokens"] and spec["block_size"] == 16
    assert spec["tau"] == tau_from_steps([spec["tokens"]], [spec["acceptance_lengths"]]) > 1  # trained
    missing = subprocess.run([sys.executable, "-m", "dflash.cli.generate", "--prompt", "x", "--drafter",
                              "z-lab/not-cached"], env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "not in the local Hugging Face cache" in missing.stderr


def test_published_qwen3_8b_layout_maps_onto_the_preset():
    """The config.json layout of the published z-lab/Qwen3-8B-DFlash-b16 drafter (fields as
    released, including ones we ignore) and its transformers-5 spelling with ``rope_parameters``."""
    published = {
        "architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 16, "bos_token_id": 151643,
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 12288, "layer_types": ["full_attention"] * 5, "max_position_embeddings": 40960,
        "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8,
        "num_target_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
    }
    cfg = config_from_hf(published)
    cfg.check_target(PRESETS["qwen3_8b"])
    assert (cfg.block_size, cfg.mask_token_id, cfg.target_layer_ids) == (16, 151669, (1, 9, 17, 25, 33))
    assert cfg.rope.theta == 1e6 and cfg.num_layers == 5
    v5 = {k: v for k, v in published.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    assert config_from_hf(v5) == cfg
    # Every tensor name the exporter writes for this drafter is one of docs/design.md §8.
    model = nnx.eval_shape(lambda: DFlashDrafter(cfg, rngs=nnx.Rngs(0)))
    present = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    rows = drafter_rows(cfg)
    assert {row.ours for row in rows} == present  # the rows fill every parameter
    names = {row.hf for row in rows}
    per_layer = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert names == {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{n}" for i in range(5) for n in per_layer}


def test_init_from_continues_from_the_exported_weights(run, run_config, tiny_target, tmp_path):
    # A config that disagrees with the drafter is refused (it would silently train another shape).
    bad = run_config(tiny_target, tmp_path / "bad", f"drafter.init_from={run / 'export'}",
                     "drafter.num_layers=3")
    with pytest.raises(TrainingError, match=r"drafter.num_layers: config 3, drafter 1"):
        run_training(bad, progress=False, final_eval=False)
    cfg = run_config(tiny_target, tmp_path / "cont", f"drafter.init_from={run / 'export'}",
                     "optim.lr=1e-12", "train.steps=2")
    run_training(cfg, progress=False, final_eval=False)
    before, after = _tensors(run / "export"), _tensors(tmp_path / "cont" / "export")
    assert set(before) == set(after)
    for name in before:  # two AdamW steps at lr 1e-12 move nothing visible
        np.testing.assert_allclose(after[name], before[name], atol=1e-9, err_msg=name)


def _broken(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = _tensors(dst)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_bad_drafter_directories_are_named(tmp_path):
    target = load_target("tiny-code")
    good = SHIPPED_DRAFTERS["tiny-code-dflash"]
    with pytest.raises(CheckpointError, match=r"not a drafter of a known kind: .*\['Qwen3ForCausalLM'\]"):
        load_drafter(ROOT / "dflash" / "assets" / "tiny-code", target.cfg)
    with pytest.raises(CheckpointError, match="missing file"):
        load_drafter(tmp_path, target.cfg)
    cases = {
        "missing tensor 'fc.weight'": lambda t: t.pop("fc.weight"),
        r"'norm.weight' has shape \(7,\)": lambda t: t.__setitem__("norm.weight", np.ones(7, np.float32)),
        "dtype int8, which is not supported": lambda t: t.__setitem__(
            "hidden_norm.weight", t["hidden_norm.weight"].astype(np.int8)),
        r"tensors this model does not have: \['layers.9.mlp.up_proj.weight'\]": lambda t: t.__setitem__(
            "layers.9.mlp.up_proj.weight", np.zeros((2, 2), np.float32)),
    }
    for i, (message, edit) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message):
            load_drafter(_broken(good, tmp_path / f"case{i}", edit), target.cfg)
    # A copy of the target's embedding in the file is tolerated: the drafter uses the target's.
    extra = _broken(good, tmp_path / "embed", lambda t: t.__setitem__(
        "embed_tokens.weight", np.zeros((3, 3), np.float32)))
    load_drafter(extra, target.cfg)
    # A recorded target fingerprint that differs from this target's is reported.
    hf = json.loads((extra / "config.json").read_text())
    hf["dflash_target"]["fingerprint"] = "0" * 16
    (extra / "config.json").write_text(json.dumps(hf))
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        load_drafter(extra, target.cfg)
    # A sliding layer without a window is refused, not loaded as full attention; with one, it slides.
    hf["layer_types"] = ["full_attention"] * (hf["num_hidden_layers"] - 1) + ["sliding_attention"]
    (extra / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"sliding_window=0 with layer_types .*'sliding_attention'\]"):
        load_drafter(extra, target.cfg)
    (extra / "config.json").write_text(json.dumps({**hf, "sliding_window": 6}))
    with pytest.warns(UserWarning, match="fingerprint mismatch"):  # still the zeroed fingerprint
        assert load_drafter(extra, target.cfg).cfg.windows[-1] == 6


def test_export_errors_are_clear(run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    checks = [
        (["--run", run, "--out", tmp_path / "full"], "is not empty"),
        (["--run", run, "--out", tmp_path / "full" / "x"], "exists and is not a directory"),
        (["--run", run, "--step", "3", "--out", tmp_path / "o1"],
         "no checkpoint for step '3'; kept steps: [2, 4]"),
        (["--run", tmp_path, "--out", tmp_path / "o2"], "holds no checkpoints"),
        (["--checkpoint", run / "tb", "--out", tmp_path / "o3"], "is not a checkpoint directory"),
        (["--run", run, "--dtype", "int8", "--out", tmp_path / "o4"], None),  # argparse refuses it
    ]
    for args, message in checks:
        if message is None:
            with pytest.raises(SystemExit):
                _export(*args)
            continue
        assert _export(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("dflash-export: error:") and message in err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints", bare / "checkpoints")
    assert _export("--run", bare, "--out", tmp_path / "o5") == 2
    assert "config.yaml is missing" in capsys.readouterr().err


def test_exports_and_shipped_assets_are_world_readable(run, tmp_path, capsys):
    """A serving container running as another user must be able to read an export."""
    old = os.umask(0o022)
    try:
        assert _export("--run", run, "--out", tmp_path / "e", "--with-target") == 0
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "e").rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"model.safetensors", "config.json"} and len(files) > 2
    assert {f.relative_to(tmp_path): oct(f.stat().st_mode & 0o777) for f in files} == {
        f.relative_to(tmp_path): oct(0o644) for f in files}
    shipped = [f for f in (ROOT / "dflash" / "assets").rglob("*") if f.is_file()]
    assert shipped and all(f.stat().st_mode & 0o044 == 0o044 for f in shipped)
    listed = subprocess.run(["git", "ls-files", "-s", "dflash/assets"], cwd=ROOT, capture_output=True,
                            text=True).stdout.splitlines()
    assert listed and {line.split()[0] for line in listed} == {"100644"}  # what a clone checks out


def test_a_truncated_checkpoint_is_a_short_message_naming_what_to_use(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for f in (broken / "checkpoints" / "4" / "state").rglob("d/*"):  # every data file of step 4
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert _export("--run", broken, "--step", "4", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2 and "TensorStore(" not in err, err
    assert f"checkpoint step 4 in {broken / 'checkpoints'} is damaged" in err
    assert str(broken / "checkpoints" / "4" / "state") in err  # the damaged file's place
    assert f"previous good step is 2: export it with `dflash-export --run {broken} --step 2" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert _export("--run", broken, "--step", "4", "--out", tmp_path / "o", "--verbose") == 2
    assert len(capsys.readouterr().err.splitlines()) > 20  # the full detail, on request
    assert _export("--run", broken, "--out", tmp_path / "o2") == 0  # latest: the newest step that restores
    assert json.loads(capsys.readouterr().out)["step"] == 2


def test_export_reads_the_drafter_only_not_the_optimizer_moments(run, tmp_path, capsys):
    """A damaged optimizer moment must not stop an export: it only needs the drafter's weights."""
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    meta_file = damaged / "checkpoints" / "4" / "state" / "_METADATA"
    meta = json.loads(meta_file.read_text())
    moments = [k for k in meta["tree_metadata"] if k.startswith("('1', 'opt_state'") and "'nu'" in k]
    entry = meta["tree_metadata"].pop(moments[0])  # point one moment at an array that is not stored
    entry["key_metadata"][-2]["key"] += "_gone"
    meta["tree_metadata"][moments[0].replace("'value')", "'gone', 'value')")] = entry
    meta_file.write_text(json.dumps(meta))
    assert _export("--run", damaged, "--out", tmp_path / "e") == 0, capsys.readouterr().err
    ours, final = _tensors(tmp_path / "e"), _tensors(run / "export")
    assert set(ours) == set(final)
    for name in final:
        np.testing.assert_array_equal(ours[name], final[name], err_msg=name)
