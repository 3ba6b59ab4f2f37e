"""dflash's error classes, and the CLIs' rule: a DflashError is a one-line exit, anything else a traceback."""

from __future__ import annotations

import pytest

import dflash.cli.generate as generate_cli
from dflash import errors
from dflash.errors import CacheOverflowError, CheckpointError, ConfigError, DflashError, TrainingError


def test_every_error_is_a_dflash_error_and_keeps_its_builtin_base():
    for cls, base in ((ConfigError, ValueError), (CheckpointError, ValueError),
                      (CacheOverflowError, ValueError), (TrainingError, RuntimeError)):
        assert issubclass(cls, DflashError) and issubclass(cls, base), cls
    defined = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(cls, DflashError) for cls in defined)


def test_cli_reports_a_dflash_error_in_one_line_and_lets_a_bug_through(monkeypatch, capsys):
    def refuse(name):
        raise CheckpointError(f"no such target {name!r}")

    monkeypatch.setattr(generate_cli, "load_tokenizer", refuse)
    assert generate_cli.main(["--target", "nowhere", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == "dflash-generate: error: no such target 'nowhere'"

    def bug(name):
        raise KeyError("an internal bug")

    monkeypatch.setattr(generate_cli, "load_tokenizer", bug)
    with pytest.raises(KeyError, match="an internal bug"):  # not swallowed into "error:"
        generate_cli.main(["--target", "nowhere", "--prompt", "x"])
