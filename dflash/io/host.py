"""Arrays to the host: whole, also when other processes of a multi-host job hold some shards."""

from __future__ import annotations

import jax
import numpy as np


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on the host, also when other processes hold some of its shards."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
