"""What a new user meets in the first hour: paths resolved as they mean them, clear errors
where a silent wrong answer or a dead end used to be."""

from __future__ import annotations

import shutil

import pytest

from dflash.models import CheckpointError, load_target
from dflash.models.loading import SHIPPED
from dflash.models.tokenizer import load_tokenizer


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
