"""τ recounted from what the verify steps emitted, independently of ``SpecResult.tau``.

A test that asserts ``tau >= 1`` cannot fail (every verify step emits a token); these recounts
let a test assert the reported τ is the one definition of docs/design.md §7 instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dflash.viz.tokens import split_steps


def tau_from_steps(tokens: Sequence[Sequence[int]], acceptance_lengths: Sequence[Sequence[int]]) -> float:
    """Tokens emitted by verify steps / verify steps, over all rows, with every row's steps rebuilt
    (and checked against its tokens) by ``split_steps``: the prefill's first token is no step's."""
    steps = [s for toks, lengths in zip(tokens, acceptance_lengths, strict=True)
             for s in split_steps(toks, lengths)[1:]]
    return sum(len(s.tokens) for s in steps) / len(steps)


def tau_from_metrics(metrics: Mapping[str, Any], histogram: str = "acceptance_histogram") -> float:
    """A run's decoding τ from its ``metrics.json``: the tokens after each prompt's first (all
    methods emit the same tokens: greedy is lossless) over the verify steps of ``histogram``."""
    steps = sum(metrics[histogram])
    return (metrics["eval_new_tokens"] - metrics["eval_prompts"]) / steps
