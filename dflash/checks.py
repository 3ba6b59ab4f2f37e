"""Every number a user types, checked in one place: the CLI flags (``flag``) and the config values
(``check``, called by the configs' ``__post_init__``) go through the same ``Range``s.

A number is finite, an integer where one is meant, and inside its range; a few flags give one value
outside it a meaning (``0``: the default, ``-1``: the rest), named in ``special``. The error names
the flag or key, the value and what it may be.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from typing import Any

from dflash.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """``low <= x <= high`` (``<`` where open), finite, an integer if ``integer``; ``special`` maps
    values allowed outside the range to what they mean."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    special: tuple[tuple[float, str], ...] = ()

    def describe(self) -> str:
        """``an integer >= 1``, ``in [0, 1)``, ``> 0 (or 0: the default)``."""
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "" if self.integer else "a finite number"
        text = f"an integer {text}".strip() if self.integer else text
        return text + "".join(f" (or {_num(v)}: {meaning})" for v, meaning in self.special)

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
            return False
        if any(value == v for v, _ in self.special):
            return True
        if not math.isfinite(value) or (self.integer and not isinstance(value, numbers.Integral)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def with_special(self, value: float, meaning: str) -> Range:
        return dataclasses.replace(self, special=(*self.special, (value, meaning)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Range(low=1, integer=True)  # how many: rows, steps, prompts, tokens, repeats
COUNT_OR_ZERO = Range(low=0, integer=True)  # 0 has its own meaning (off, all), given by ``special``
INTEGER = Range(integer=True)  # seeds
POSITIVE = Range(low=0, low_open=True)  # rates, norms, seconds
NON_NEGATIVE = Range(low=0)  # temperatures, weights
FRACTION = Range(low=0, high=1, high_open=True)  # [0, 1)
PROBABILITY = Range(low=0, high=1, low_open=True)  # (0, 1]: top-p
BLOCK = Range(low=2, integer=True)  # an anchor and at least one draft


def check(name: str, value: Any, kind: Range) -> Any:
    """``value``, or a ``ConfigError`` naming ``name``, the value and ``kind``."""
    if not kind.contains(value):
        raise ConfigError(f"{name} must be {_what(kind, value)}, got {value!r}")
    return value


def _what(kind: Range, value: Any) -> str:
    finite = not isinstance(value, float) or math.isfinite(value)
    return kind.describe() if finite or kind.integer else f"a finite number {kind.describe()}".strip()


def flag(kind: Range) -> Any:
    """An argparse ``type`` reading a flag's value as ``kind`` (integer or float) and checking it."""

    def read(text: str) -> int | float:
        try:
            value: int | float = int(text) if kind.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.describe()}, got {text}") from None
        if not kind.contains(value):
            raise argparse.ArgumentTypeError(f"must be {_what(kind, value)}, got {text}")
        return value

    read.__name__ = "integer" if kind.integer else "number"  # argparse's "invalid <name> value"
    read.kind = kind  # type: ignore[attr-defined]  # tests check that every numeric flag has one
    return read


def flag_list(kind: Range) -> Any:
    """An argparse ``type`` reading ``A,B,C`` as a list of ``kind`` values, each checked."""
    one = flag(kind)

    def read(text: str) -> list[int | float]:
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of values {kind.describe()}")
        return [one(p.strip()) for p in parts]

    read.__name__ = "list"
    read.kind = kind  # type: ignore[attr-defined]
    return read

