"""Pallas kernels, each with a pure-jnp ``reference_<op>`` of the same signature (docs/design.md §10.6).

* ``verify_attention``: the target's attention for a block of new tokens over its KV cache.
* ``anchor_block_attention``: the DFlash drafter's KV-injection attention (training and drafting).
* ``dispatch``: ``attention_impl`` = auto | pallas | reference, and the models' entry points.

Acceptance (greedy prefix, tree path, rejection sampling) has no kernel: it stays the jnp ops
of ``dflash.decoding.verify`` and ``dflash.decoding.tree``; docs/kernels.md says why.

docs/kernels.md has the signatures, the GPU path choice, tests and the benchmark.
"""

from dflash.kernels.anchor_attention import anchor_block_attention, reference_anchor_block_attention
from dflash.kernels.dispatch import ATTENTION_IMPLS, resolve_impl
from dflash.kernels.verify_attention import reference_verify_attention, verify_attention

__all__ = [
    "ATTENTION_IMPLS",
    "anchor_block_attention",
    "reference_anchor_block_attention",
    "reference_verify_attention",
    "resolve_impl",
    "verify_attention",
]
