"""A user's mistakes are one line (docs/design.md §10, "Errors"): every number a command or a config
takes is checked (finite, in range) before any work, and a malformed file a user hands us names
itself and the line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import tomllib
import typing
from pathlib import Path

import pytest

from dflash.checks import Range
from dflash.cli import generate, pretrain_target
from dflash.cli.parser import Parser
from dflash.configio import load_yaml
from dflash.errors import ConfigError
from dflash.training.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
# Every console script of the package: a new command is covered without being listed here.
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = {name: getattr(importlib.import_module(target.split(":")[0]), target.split(":")[1])
            for name, target in SCRIPTS.items()}


class _Parsed(Exception):
    pass


def parser_of(main) -> argparse.ArgumentParser:
    """The parser ``main`` builds (it stops at parse_args)."""
    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Parser, "parse_args", stop)
        with pytest.raises(_Parsed) as parsed:
            main([])
    return parsed.value.args[0]


def outside(kind: Range) -> list[str]:
    """Values a flag of ``kind`` must refuse: below or above its range, and not finite."""
    special = {v for v, _ in kind.special}
    bad = []
    if kind.low is not None:
        below = kind.low if kind.low_open else kind.low - (1 if kind.integer else 0.5)
        while below in special:
            below -= 1
        bad.append(below)
    if kind.high is not None:
        bad.append(kind.high if kind.high_open else kind.high + 1)
    text = [str(int(v)) if kind.integer else str(v) for v in bad]
    return text + (["1.5"] if kind.integer else ["nan", "inf"])


NUMERIC_FLAGS = [(name, action.option_strings[-1], value)
                 for name, main in COMMANDS.items()
                 for action in parser_of(main)._actions if hasattr(action.type, "kind")
                 for value in outside(action.type.kind)]


def test_no_numeric_flag_goes_unchecked():
    plain = [(name, action.option_strings) for name, main in COMMANDS.items()
             for action in parser_of(main)._actions if action.type in (int, float)]
    assert not plain  # each takes its range from dflash.checks
    assert {name for name, _, _ in NUMERIC_FLAGS} == set(COMMANDS) - {"dflash-export", "dflash-report"}


@pytest.mark.parametrize("command, option, value", NUMERIC_FLAGS,
                         ids=[f"{c} {o} {v}" for c, o, v in NUMERIC_FLAGS])
def test_a_numeric_flag_out_of_range_is_one_line(command, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command]([f"{option}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{command}: error: argument {option}: must be "), err
    assert err[0].endswith(f", got {value} (see --help)"), err


@pytest.mark.parametrize("command, argv, line", [  # the cases reported as silently wrong
    ("dflash-regenerate", ["--data", "x.jsonl", "--out", "y.jsonl", "--batch-size", "-1"],
     "argument --batch-size: must be an integer >= 1, got -1"),
    ("dflash-generate", ["--drafter", "ngram", "--block-size", "0", "--prompt", "x"],
     "argument --block-size: must be an integer >= 2, got 0"),
    ("dflash-bench", ["--num-prompts", "0"], "argument --num-prompts: must be an integer >= 1, got 0"),
])
def test_reported_numbers_are_refused(command, argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command](argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{command}: error: {line} (see --help)"]


def _numeric_keys(cls: type, prefix: str = "") -> dict[str, type]:
    keys = {}
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(hint):
            keys |= _numeric_keys(hint, f"{prefix}{field.name}.")
        elif hint in (int, float, float | None) or typing.get_args(hint)[:1] == (int,):
            keys[prefix + field.name] = float if float in (hint, *typing.get_args(hint)) else int
    return keys


BAD_CONFIG = {  # one out-of-range value per numeric key
    "drafter.num_layers": "0", "drafter.block_size": "1", "drafter.target_layer_ids": "[-1]",
    "drafter.num_target_features": "0", "drafter.mask_token_id": "-2", "drafter.sliding_window": "-1",
    "drafter.num_heads": "-1", "drafter.num_kv_heads": "1.5", "drafter.head_dim": "-8",
    "drafter.intermediate_size": "-1", "drafter.draft_vocab_size": "-1", "drafter.ttt_steps": "0",
    "drafter.rope_theta": "-1.0",
    "data.seq_len": "4", "data.max_examples": "-1", "data.heldout_fraction": "1.0", "data.seed": "1.5",
    "data.lanes": "0",
    "regen.num_sequences": "-1", "regen.prompt_tokens": "0", "regen.new_tokens": "0",
    "regen.batch_size": "-1",
    "optim.lr": "0", "optim.warmup_ratio": "1.0", "optim.final_lr_ratio": "-0.1",
    "optim.weight_decay": "-0.1",
    "optim.b1": "1.0", "optim.b2": "-0.5", "optim.clip_norm": "0", "optim.grad_accum": "0",
    "train.batch_size": "0", "train.num_anchors": "0", "train.epochs": "-1", "train.steps": "-1",
    "train.gamma": "-1", "train.ce_weight": "-1", "train.kl_weight": "-1", "train.loss_chunk": "0",
    "train.seed": "1.5", "train.log_every": "0", "train.eval_every": "0", "train.save_every": "0",
    "train.keep_last": "0", "train.num_devices": "2",
    "eval.heldout_rows": "0", "eval.num_prompts": "0", "eval.max_new_tokens": "0", "eval.prompt_tokens": "0",
    "mesh.data": "0", "mesh.fsdp": "-2", "mesh.tensor": "0", "mesh.expert": "0",
}
NUMERIC_KEYS = _numeric_keys(ExperimentConfig)
CONFIG_CASES = [(key, value) for key, value in BAD_CONFIG.items()] + [
    (key, value) for key, kind in NUMERIC_KEYS.items() if kind is float
    for value in (".nan", ".inf", "-.inf")]


def test_the_table_covers_every_numeric_config_key():
    assert set(BAD_CONFIG) == set(NUMERIC_KEYS)


@pytest.mark.parametrize("key, value", CONFIG_CASES, ids=[f"{k}={v}" for k, v in CONFIG_CASES])
def test_a_config_value_out_of_range_names_the_key(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"\b{name}\b"):
        load_yaml(ExperimentConfig, ROOT / "configs/tiny_code.yaml", [f"{key}={value}"])


# ---------------------------------------------------------------------------- malformed files
def _bad_jsonl(path: Path, key: str) -> Path:
    path.write_text(f'{{"{key}": "def f(x):"}}\n{{"{key}": "import os"\n{{"{key}": "x = 1"}}\n')
    return path


@pytest.mark.parametrize("command", ["dflash-bench", "dflash-regenerate", "dflash-train"])
def test_a_malformed_jsonl_line_names_the_file_and_line(command, tmp_path, capsys, tiny_target):
    data = _bad_jsonl(tmp_path / "data.jsonl", "text" if command == "dflash-train" else "prompt")
    argv = {"dflash-bench": ["--target", str(tiny_target), "--prompts", str(data), "--drafter", "ngram"],
            "dflash-regenerate": ["--target", str(tiny_target), "--data", str(data), "--out",
                                  str(tmp_path / "out.jsonl")],
            "dflash-train": ["--set", f"target.name={tiny_target}", "--set", f"data.source={data}",
                             "--run-dir", str(tmp_path / "run")]}[command]
    assert COMMANDS[command](argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(command)]
    column = len(data.read_text().splitlines()[1]) + 1  # the line ends where its "," or "}" is missing
    assert err == [f"{command}: error: data source {str(data)!r}: {data}, line 2: not valid JSON (Expecting "
                   f"',' delimiter at column {column}); fix or remove that line"]


def _truncated(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dest


@pytest.mark.parametrize("where", ["generate --drafter", "generate --target", "bench --drafter",
                                   "train --init-from"])
def test_a_truncated_safetensors_file_names_itself(where, tmp_path, capsys, tiny_target):
    from dflash.io.loading import ASSETS

    command, flag = where.split()
    damaged = _truncated(tiny_target if flag == "--target" else ASSETS / "tiny-code-dflash", tmp_path / "bad")
    argv = {"generate": ["--prompt", "def f(x):", "--max-new-tokens", "2", flag, str(damaged)],
            "bench": ["--num-prompts", "1", "--max-new-tokens", "2", flag, str(damaged)],
            "train": [flag, str(damaged), "--run-dir", str(tmp_path / "run")]}[command]
    assert COMMANDS[f"dflash-{command}"](argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1:] == [f"dflash-{command}: error: {damaged / 'model.safetensors'} is damaged or truncated "
                        "(Error while deserializing header: incomplete metadata, file not fully covered); "
                        "download or export it again"]


# ---------------------------------------------------------------------------- every command's exits
def test_pretrain_target_reports_errors_and_returns_its_status(monkeypatch, capsys):
    def refuse(cfg, out):
        raise ConfigError(f"cannot write {out}")

    monkeypatch.setattr(pretrain_target, "pretrain", refuse)
    assert pretrain_target.main(["--out", "somewhere", "--steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["dflash-pretrain-target: error: cannot write somewhere"]


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_tokenizer", interrupted)
    assert generate.main(["--prompt", "x"]) == 130
    assert capsys.readouterr().err.splitlines() == ["dflash-generate: interrupted"]
