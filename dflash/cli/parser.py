"""One ``--help`` style for every command: docstring descriptions kept as written, and each
option's default shown beside it, so a user sees what a bare command will do."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option with a real default, even one without help text.

    Options whose help already says what the default is (``default: the drafter's``), flags,
    and options without a default (``None``, an empty list) are left as they are.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if self._shows_default(action):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return (bool(action.option_strings) and action.nargs != 0  # not a flag
                and default is not None and default != [] and default is not argparse.SUPPRESS
                and "default" not in (action.help or "") and action.help is not argparse.SUPPRESS)


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for a dflash command, with defaults shown in ``--help``."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
