"""``dflash-generate`` end to end on the shipped target, and its errors."""

from __future__ import annotations

import json

import pytest

from dflash.cli.generate import main
from dflash.io.tokenizer import load_tokenizer


def test_generate_json_on_tiny_code(capsys):
    assert main(["--target", "tiny-code", "--prompt", "def add(a, b):\n", "--max-new-tokens", "24",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "prompt_tokens", "tokens", "tokens_per_s"} <= set(out)
    tok = load_tokenizer("tiny-code")
    assert out["prompt_tokens"] == tok("def add(a, b):\n").input_ids
    assert 1 <= len(out["tokens"]) <= 24 and out["tokens_per_s"] > 0
    assert out["text"] == tok.decode(out["tokens"], skip_special_tokens=True)


def test_generate_prints_prompt_and_completion(capsys, tmp_path):
    prompt_file = tmp_path / "p.py"
    prompt_file.write_text("import os\n\n\ndef main():\n")
    assert main(["--prompt-file", str(prompt_file), "--max-new-tokens", "8", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("import os\n\n\ndef main():\n")


def test_generate_errors_are_clear(capsys, tmp_path):
    assert main(["--target", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["--prompt", "x" * 50, "--max-len", "16", "--max-new-tokens", "8"]) == 2
    assert "max_len=16" in capsys.readouterr().err
    assert main(["--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    # Speculative-only options without a drafter are refused (argparse: exit status 2), not dropped.
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "x", "--ngram-branch", "--verify", "block"])
    assert exit_info.value.code == 2
    assert "--verify, --ngram-branch apply only to speculative decoding" in capsys.readouterr().err
