"""What a new user meets in the first hour: paths resolved as they mean them, clear errors
where a silent wrong answer or a dead end used to be."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dflash.decoding.autoregressive import ContextLengthError, check_context
from dflash.errors import CheckpointError
from dflash.io import load_target
from dflash.io.loading import SHIPPED
from dflash.io.tokenizer import load_tokenizer


def test_relative_local_directory_wins_and_a_missing_one_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_target("models/qwen3")  # looks like a hub id 'owner/name', and is meant as a path
    message = str(err.value)
    assert str(tmp_path / "models" / "qwen3") in message and "hub id" in message
    shutil.copytree(SHIPPED["tiny-code"], tmp_path / "models" / "qwen3")
    assert load_target("models/qwen3").cfg == load_target("tiny-code").cfg
    assert load_tokenizer("models/qwen3")("def f():").input_ids


def test_a_run_directory_as_drafter_uses_its_export_or_says_how(tmp_path, capsys):
    from dflash.cli.generate import main as generate_main
    from dflash.drafters import find_export
    from dflash.drafters.dflash.hf import SHIPPED_DRAFTERS
    from dflash.drafters.orthrus.hf import SHIPPED_ORTHRUS

    run = tmp_path / "try"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: dflash\n")
    args = ["--prompt", "def fib(n):", "--max-new-tokens", "8", "--json"]
    assert generate_main([*args, "--drafter", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a dflash-train run directory" in err and f"dflash-export --run {run}" in err
    assert len(err.splitlines()) == 1
    shutil.copytree(SHIPPED_DRAFTERS["tiny-code-dflash"], run / "export")
    assert generate_main([*args, "--drafter", str(run)]) == 0
    from_run = capsys.readouterr().out
    assert generate_main([*args, "--drafter", "tiny-code-dflash"]) == 0
    shipped = capsys.readouterr().out
    assert from_run.split('"tokens_per_s"')[0] == shipped.split('"tokens_per_s"')[0]
    orthrus_run = tmp_path / "orthrus"
    shutil.copytree(SHIPPED_ORTHRUS["tiny-code-orthrus"], orthrus_run / "export")
    (orthrus_run / "config.yaml").write_text("method: orthrus\n")
    assert find_export(orthrus_run)[1] == orthrus_run / "export"


def test_train_default_config_is_shipped_and_works_from_any_directory(tmp_path, monkeypatch, capsys):
    import filecmp
    from pathlib import Path

    import dflash.cli.train as train_cli
    from dflash.configio import load_yaml
    from dflash.io import resolve
    from dflash.training.config import ExperimentConfig

    root = Path(__file__).resolve().parents[1]
    for name, shipped in train_cli.SHIPPED_CONFIGS.items():  # configs/ is the same file, to edit
        assert filecmp.cmp(shipped, root / "configs" / f"{name}.yaml", shallow=False), name
        assert resolve(load_yaml(ExperimentConfig, shipped).target.name).is_dir(), name  # target ships
    seen = []
    monkeypatch.setattr(train_cli, "run_training", lambda cfg, **kw: seen.append(cfg) or {})
    monkeypatch.setattr(train_cli, "write_report", lambda run_dir: Path(run_dir) / "report")  # no run made
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--set", "train.steps=3"]) == 0
    assert train_cli.main(["--config", "tiny_code_orthrus"]) == 0
    assert seen == [load_yaml(ExperimentConfig, root / "configs" / "tiny_code.yaml", ["train.steps=3"]),
                    load_yaml(ExperimentConfig, root / "configs" / "tiny_code_orthrus.yaml")]
    capsys.readouterr()
    assert train_cli.main(["--config", "configs/tiny_code.yaml"]) == 2  # a path that is not there
    err = capsys.readouterr().err
    assert "configs/tiny_code.yaml does not exist" in err and "tiny_code_orthrus" in err


def test_a_prompt_longer_than_the_context_is_refused_unless_allowed(tmp_path, capsys):
    """tiny-code's context is 2048 positions; a longer prompt used to run and return garbage."""
    from dflash.cli.generate import main as generate_main

    assert load_target("tiny-code").cfg.max_position_embeddings == 2048
    long = tmp_path / "long.py"
    long.write_text("x = 1\n" * 520)  # 2,080 tokens
    for drafter in ([], ["--drafter", "ngram"]):
        assert generate_main(["--prompt-file", str(long), "--max-new-tokens", "4", *drafter]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Token indices" not in err
        assert "2084 positions, past the target's context of 2048" in err
        assert "--allow-longer-than-context" in err
    check_context([2044, 7], [4, 2041], 2048)  # the whole context, no more
    with pytest.raises(ContextLengthError, match="prompt 1 .* 2049 positions"):
        check_context([2044, 7], [4, 2042], 2048)
    assert generate_main(["--prompt-file", str(long), "--max-new-tokens", "2", "--json",
                          "--allow-longer-than-context"]) == 0
    assert '"num_tokens": 2' in capsys.readouterr().out


def test_regenerate_settings_past_the_context_are_refused_before_any_work(tmp_path, capsys):
    import datasets

    from dflash.cli.regenerate import main as regenerate_main

    src, out = tmp_path / "chats.jsonl", tmp_path / "out.jsonl"
    convs = [[{"role": "user", "content": "def f():"}, {"role": "assistant", "content": "ORIGINAL"}]]
    datasets.Dataset.from_dict({"messages": convs}).to_json(str(src), lines=True)
    args = ["--data", str(src), "--out", str(out), "--max-new-tokens", "100"]
    assert regenerate_main([*args, "--max-prompt-tokens", "2000"]) == 2
    err = capsys.readouterr().err
    assert "max_prompt_tokens 2000 + max_new_tokens 100 does not fit the target's context of 2048" in err
    assert "--allow-longer-than-context" in err and not out.exists()


def test_training_settings_past_the_context_are_named():
    from dflash.config import ConfigError
    from dflash.configio import from_dict
    from dflash.training.config import ExperimentConfig

    fine = from_dict(ExperimentConfig, {"data": {"seq_len": 2048}, "regen": {"num_sequences": 4}})
    fine.check_context(2048)
    over = from_dict(ExperimentConfig, {"data": {"seq_len": 4096}, "regen": {"num_sequences": 4,
                     "prompt_tokens": 2000, "new_tokens": 64}, "eval": {"prompt_tokens": 100}})
    with pytest.raises(ConfigError) as err:
        over.check_context(2048)
    assert str(err.value).startswith("data.seq_len = 4096; regen.prompt_tokens + regen.new_tokens = 2064: "
                                     "past the target's context of 2048")


def test_a_short_run_regenerates_only_what_it_will_consume(run_config, tiny_target, tmp_path):
    import numpy as np

    from dflash.training.data import load_documents
    from dflash.training.rundata import prepare_data, regen_count
    from dflash.training.selfdistill import load_documents_npz, regenerate_documents

    regen = ["regen.num_sequences=64", "regen.prompt_tokens=16", "regen.new_tokens=16", "regen.batch_size=64"]
    cfg = run_config(tiny_target, tmp_path / "r", *regen, "train.steps=2")  # 2 steps x 4 rows x 2 per row
    assert regen_count(cfg) == 16
    assert regen_count(run_config(tiny_target, tmp_path / "x", *regen, "train.steps=50")) == 64
    assert regen_count(run_config(tiny_target, tmp_path / "x", *regen, "train.steps=0",
                                  "train.epochs=1")) == 64
    target, tok = load_target(tiny_target), load_tokenizer(tiny_target)
    (tmp_path / "r").mkdir()
    prepare_data(cfg, tok, target, tmp_path / "r", progress=False)
    made = load_documents_npz(tmp_path / "r" / "regenerated.npz")
    assert len(made) == 16
    full = regenerate_documents(target, load_documents(cfg.data, tok)[0], cfg.regen, seed=cfg.data.seed,
                                eos_ids=tuple(target.cfg.eos_token_id), progress=False)
    assert len(full) == 64  # the short run's data is the start of the full set
    for a, b in zip(made, full[:16], strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.slow
def test_log_lines_a_finished_run_and_an_extended_run_that_continues_exactly(
        run_config, tiny_target, tmp_path, capsys):
    import re

    import numpy as np
    from safetensors.numpy import load_file

    from dflash.cli.train import main as train_main
    from dflash.training.trainer import run_training

    constant_lr = ("optim.warmup_ratio=0", "optim.final_lr_ratio=1")  # the total steps do not matter
    a = run_config(tiny_target, tmp_path / "a", *constant_lr)
    run_training(a, progress=False, final_eval=False)
    capsys_out_a = capsys.readouterr().out
    lines = [line for line in capsys_out_a.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # log_every=1, no bar
    assert "tau_sim —" in lines[0] and re.search(r"tau_sim \d\.\d\d", lines[2])  # eval at step 2
    assert not any("nan" in line for line in lines)
    out_lines = capsys_out_a.splitlines()
    assert [line for line in out_lines if line.startswith("eval at step")] == [
        line for line in out_lines if re.match(r"eval at step [24]: tau_sim \d\.\d\d per verify step", line)]
    assert sum(line.startswith("eval at step") for line in out_lines) == 2
    events = sorted((tmp_path / "a" / "tb").iterdir())

    # Re-running the finished run says so and stops: no training, no evaluation, no new events.
    config = str(tmp_path / "a" / "config.yaml")
    assert train_main(["--config", config, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is already complete (4 of 4 steps); nothing was run" in out and "--extend" in out
    assert sorted((tmp_path / "a" / "tb").iterdir()) == events
    # A larger step count needs --extend (the message says so) ...
    assert train_main(["--config", config, "--set", "train.steps=6", "--no-progress"]) == 2
    assert "raise train.steps and pass --extend" in capsys.readouterr().err
    # ... and with it the run continues from its checkpoint, optimizer state included: with a
    # constant LR, 4 steps extended to 6 equal 6 steps from scratch, bit for bit.
    run_training(run_config(tiny_target, tmp_path / "a", *constant_lr, "train.steps=6"), progress=False,
                 final_eval=False, extend=True)
    run_training(run_config(tiny_target, tmp_path / "b", *constant_lr, "train.steps=6"), progress=False,
                 final_eval=False)
    extended, scratch = load_file(tmp_path / "a" / "export" / "model.safetensors"), load_file(
        tmp_path / "b" / "export" / "model.safetensors")
    for name in scratch:
        np.testing.assert_array_equal(extended[name], scratch[name], err_msg=name)
    out = capsys.readouterr().out
    assert "step 5/6" in out


def test_quick_is_a_short_try_in_its_own_run_dir_and_explicit_settings_win(tmp_path, monkeypatch):
    import dflash.cli.train as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "run_training", lambda cfg, **kw: seen.append((cfg, kw)) or {})
    monkeypatch.setattr(train_cli, "write_report", lambda run_dir: Path(run_dir) / "report")  # no run made
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--quick"]) == 0
    assert train_cli.main(["--quick", "--set", "train.steps=7", "--run-dir", "runs/mine"]) == 0
    (quick, kw), (mine, _) = seen
    assert quick.run_dir == "runs/tiny_code-quick" and quick.train.steps == 20
    assert quick.eval.num_prompts == 2 and quick.eval.max_new_tokens == 32 and kw["extend"] is False
    assert mine.run_dir == "runs/mine" and mine.train.steps == 7 and mine.eval.num_prompts == 2


def test_generate_json_tau_counts_only_tokens_within_the_budget(capsys):
    """With --max-new-tokens 48 the last steps accept full blocks past the budget: tau used to
    read 6.56 (the mean of acceptance_lengths, 59 / 9) against 47 emitted tokens in 9 steps."""
    import json

    from dflash.cli.generate import main as generate_main

    assert generate_main(["--drafter", "tiny-code-dflash", "--prompt", "def fib(n):",
                          "--max-new-tokens", "48", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    steps = out["acceptance_lengths"]
    assert out["num_tokens"] == 48 and sum(steps) > out["num_tokens"] - 1  # the budget cut a step
    assert out["tau"] == pytest.approx((out["num_tokens"] - 1) / len(steps))
    assert out["mean_acceptance_length"] == pytest.approx(sum(steps) / len(steps))
    assert out["target_forwards"] == len(steps) + 1


def test_bench_refuses_a_prompt_past_the_context_before_running_anything(tmp_path, capsys):
    import json

    from dflash.cli.bench import main as bench_main

    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "def f():\n    return 1\n"}, {"prompt": "x = 1\n" * 520}]  # 2,080 tokens
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_main(["--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 (2080 tokens) + 8 new tokens = 2088 positions, past the target's context of 2048" in err
    assert "--allow-longer-than-context" in err and "Token indices" not in err


def test_train_refuses_rows_longer_than_the_context_before_touching_the_run_dir(tmp_path, capsys):
    from dflash.cli.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--set", "data.seq_len=4096", "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len = 4096: past the target's context of 2048 positions" in err
    assert not run.exists()
