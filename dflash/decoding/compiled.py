"""Ahead-of-time compiled decoding programs, cached by static arguments and argument shapes.

The decoding loops are compiled before they are run so that compile time is reported apart
from decoding time. ``jit(f).lower(...).compile()`` does not go through jit's own cache, so
without this cache every call would compile again; with it, a loop compiles once per shape
bucket and ``COMPILES`` (a process-wide counter) lets tests check exactly that.

The key holds each argument leaf's sharding and the mesh set with ``jax.set_mesh``: an
executable takes its inputs in the layout it was compiled for, so the same shapes on another
mesh (or unsharded) are another program.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

COMPILES = [0]  # programs compiled in this process
_CACHE: OrderedDict[Any, Any] = OrderedDict()
_MAX_ENTRIES = 32


def _signature(args: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def compiled(fn: Any, args: tuple[Any, ...], static: dict[str, Any]) -> tuple[Callable[..., Any], float]:
    """``(executable, seconds spent compiling now)`` for ``fn(*args, **static)``; 0 s when cached."""
    key = (fn, tuple(sorted(static.items())), _signature(args), jax.sharding.get_abstract_mesh())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], 0.0
    t0 = time.perf_counter()
    executable = fn.lower(*args, **static).compile()
    seconds = time.perf_counter() - t0
    COMPILES[0] += 1
    _CACHE[key] = executable
    if len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return executable, seconds
