"""Reading the files a user hands us (weights, JSON data) so that a damaged one is one line naming
the file, and the line in it, instead of a library's traceback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dflash.errors import CheckpointError


def open_safetensors(path: Path) -> Any:
    """``safe_open(path)`` (numpy); a truncated or garbled file is a ``CheckpointError`` naming it.

    safetensors checks the header and that the data covers every tensor when it opens a file, so a
    file cut short (an interrupted download or copy) fails here, not later inside a read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        raise CheckpointError(f"{path} is damaged or truncated ({err}); download or export it again") from err


def first_bad_json_line(files: Sequence[str | Path]) -> tuple[Path, int, str] | None:
    """``(file, line, reason)`` of the first malformed line of JSON data files (line: 1-based), or
    None when every file parses. A file whose first line is a JSON value on its own is JSON Lines and
    is read line by line; any other is one JSON document."""
    for name in files:
        path = Path(name)
        if path.suffix not in (".json", ".jsonl"):
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        first = next((line for line in lines if line.strip()), "")
        if _json_error(first) is None:
            for number, line in enumerate(lines, 1):
                if line.strip() and (why := _json_error(line)) is not None:
                    return path, number, why
            continue
        try:
            json.loads("\n".join(lines))
        except json.JSONDecodeError as err:
            return path, err.lineno, err.msg
    return None


def _json_error(text: str) -> str | None:
    """Why ``text`` is not one JSON value, or None."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"{err.msg} at column {err.colno}"
    return None
