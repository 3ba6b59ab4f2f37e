"""Decoding: sampling, the AR baseline loop (and the speculative engine)."""

from dflash.decoding.autoregressive import GenerationResult, generate
from dflash.decoding.sampling import SamplingParams

__all__ = ["GenerationResult", "SamplingParams", "generate"]
