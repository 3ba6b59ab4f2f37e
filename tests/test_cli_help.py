"""Every command's ``--help`` shows what a bare run will do: each option's default."""

from __future__ import annotations

import re

import pytest

from dflash.cli import (
    bench,
    bench_ar,
    compare,
    export,
    generate,
    prepare_data,
    pretrain_target,
    regenerate,
    train,
)
from dflash.cli import bench_kernels as kernels_bench

# (command, a few "option ... (default: value)" pairs its help must show)
EXPECTED = [
    (generate.main, {"--target": "tiny-code", "--max-new-tokens": "128", "--temperature": "0.0",
                     "--dtype": "float32"}),
    (bench.main, {"--drafter": "tiny-code-dflash", "--num-prompts": "16", "--max-new-tokens": "256"}),
    (bench_ar.main, {"--target": "tiny-code", "--repeats": "3"}),
    (export.main, {"--dtype": "fp32", "--form": "delta"}),
    (regenerate.main, {"--target": "tiny-code", "--batch-size": "16", "--dtype": "bfloat16",
                       "--chat-template-kwargs": "{}"}),
    (prepare_data.main, {"--seed": "0"}),
    (train.main, {"--config": "the shipped tiny_code"}),
    (pretrain_target.main, {"--steps": "2000", "--seq-len": "256"}),
    (kernels_bench.main, {"--batch": "1"}),
    (compare.main, {"--seeds": "[0, 1, 2]", "--out": "runs/compare", "--num-prompts": "32"}),
]


@pytest.mark.parametrize("main, defaults", EXPECTED, ids=[m.__module__ for m, _ in EXPECTED])
def test_help_shows_defaults(main, defaults, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside "tiny-code"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, value in defaults.items():
        entry = re.search(re.escape(option) + r" [A-Z_{},a-z0-9]+ (.*?)(?= --[a-z]|$)", text)
        assert entry, option
        assert re.search(r"default: [^)]*" + re.escape(value), entry.group(1)), (option, entry.group(1))


def test_speculative_only_flag_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--prompt", "x", "--verify", "greedy"])
    assert exit_info.value.code == 2
    assert "--verify applies only to speculative decoding: add --drafter" in capsys.readouterr().err
