"""The error figures, reports and token views raise on bad input."""

from __future__ import annotations


class VizError(ValueError):
    """Input a figure, report or token view cannot show (named in the message)."""
