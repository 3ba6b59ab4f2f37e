"""One ``--help`` style for every command: docstring descriptions kept as written, and each
option's default shown beside it, so a user sees what a bare command will do."""

from __future__ import annotations

import argparse
import copy
from typing import NoReturn

import jax
from jax.sharding import Mesh

from dflash.errors import ConfigError
from dflash.sharding import AXES, MeshConfig, make_mesh


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


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag, like every other error of a dflash command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for a dflash command, with defaults shown in ``--help``."""
    return Parser(prog=prog, description=description, formatter_class=HelpFormatter)


MESH_HELP = ("decode on a device mesh: data=D,fsdp=F,expert=E,tensor=T, any subset (the rest 1, data the "
             "rest of the devices unless another axis is -1); -1 for 'the rest of the devices'. The batch "
             "goes over data x fsdp x expert, a MoE target's experts over expert, heads / MLP / vocabulary "
             "over tensor (docs/multihost.md)")


def parse_mesh(text: str) -> MeshConfig:
    """``data=D,fsdp=F,expert=E,tensor=T`` as a ``MeshConfig``: any subset of the axes in any order, one of
    them -1 at most; ``data`` defaults to -1 (the rest of the devices) unless another axis is -1."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in AXES or name in sizes:
            raise ConfigError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of "
                              f"{', '.join(AXES)} (each at most once), e.g. data=2,tensor=4")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: {name}={value!r} is not an integer (a size or -1)") from None
    defaults = {"data": 1 if -1 in sizes.values() else -1, "fsdp": 1, "expert": 1, "tensor": 1}
    return MeshConfig(**{**defaults, **sizes})


def _mesh_type(text: str) -> MeshConfig:
    try:
        return parse_mesh(text)
    except ConfigError as err:  # ShardingError too: argparse prints it as a usage error
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--mesh {text!r}: ")) from None


def add_mesh_arg(parser: argparse.ArgumentParser, help: str = MESH_HELP) -> None:
    """``--mesh data=D,fsdp=F,expert=E,tensor=T`` (parsed to a ``MeshConfig``; default: no mesh)."""
    parser.add_argument("--mesh", type=_mesh_type, default=None, metavar="data=D,fsdp=F,expert=E,tensor=T",
                        help=help)


def add_compile_only_args(parser: argparse.ArgumentParser, what: str, *, target_config: bool = True,
                          json: bool = True) -> None:
    """``--compile-only`` (``what`` it compiles) for ``--topology``, with the architecture to plan
    (``--target-config``; a train config names its own) and ``--json`` for the plan."""
    parser.add_argument("--compile-only", action="store_true", help=what)
    parser.add_argument("--topology", default=None,
                        help="TPU slice for --compile-only (dflash.plan.TOPOLOGIES)")
    if target_config:
        parser.add_argument("--target-config", default=None,
                            help="--compile-only: architecture preset, known hub id or checkpoint directory")
    if json:
        parser.add_argument("--json", default=None, metavar="OUT",
                            help="--compile-only: also write the plan here")


def mesh_from_args(config: MeshConfig | None, *, local: bool = False) -> Mesh | None:
    """The mesh of ``--mesh`` over all devices of the job (``local``: this process's own), or None."""
    if config is None:
        return None
    return make_mesh(config, jax.local_devices() if local else jax.devices())


DYNAMIC_TREE_DEFAULTS = (7, 10, 60)  # EAGLE's depth, top-k and verified tokens


def _dynamic_tree_type(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be DEPTH,TOPK,TOKENS (three integers >= 1), got {text}")
    return values  # type: ignore[return-value]


def add_dynamic_tree_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dynamic-tree [DEPTH,TOPK,TOKENS]`` (a bare flag: EAGLE's 7,10,60; default: off)."""
    parser.add_argument("--dynamic-tree", type=_dynamic_tree_type, nargs="?", default=None,
                        const=DYNAMIC_TREE_DEFAULTS, metavar="DEPTH,TOPK,TOKENS",
                        help=f"{help}; a bare flag means {','.join(map(str, DYNAMIC_TREE_DEFAULTS))}")
