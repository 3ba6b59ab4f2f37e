"""Commands written in scripts and docs, checked against the real CLIs: every ``dflash-*`` command
exists (pyproject's console scripts) and every ``--flag`` it is given is one its ``--help`` lists."""

from __future__ import annotations

import importlib
import re
import tomllib
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def help_text(command: str) -> str:
    module, func = SCRIPTS[command].split(":")
    out = StringIO()
    with redirect_stdout(out):
        try:
            getattr(importlib.import_module(module), func)(["--help"])
        except SystemExit:
            pass
    return out.getvalue()


def unknown_flags(words: list[str]) -> list[str]:
    """The flags of one ``dflash-*`` command line (its words) that the command does not take."""
    command, *args = words
    if command not in SCRIPTS:
        return [f"{command}: no such command"]
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(command)))
    return [f"{command} {a}" for a in args if re.fullmatch(r"--[a-z][a-z0-9-]*", a.split("=")[0])
            and a.split("=")[0] not in listed]
