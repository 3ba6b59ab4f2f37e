"""The error figures, reports and token views raise on bad input."""

from __future__ import annotations

from dflash.errors import DflashError


class VizError(DflashError, ValueError):
    """Input a figure, report or token view cannot show (named in the message)."""
