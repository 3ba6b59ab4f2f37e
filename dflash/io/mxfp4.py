"""MXFP4 (the OCP microscaling FP4 format gpt-oss checkpoints store their experts in), dequantised
on load.

A tensor ``W [..., R, C]`` (transformers' ``[..., in, out]`` expert layout transposed: rows are the
outputs) is stored as ``W_blocks [..., R, C/32, 16]`` uint8, two FP4 (e2m1) codes per byte, the low
nibble first, and ``W_scales [..., R, C/32]`` uint8, one E8M0 exponent (bias 127) per 32 values:
``w = FP4[code] * 2 ** (scale - 127)``. ``Mxfp4View`` reads any slice of the float tensor from the
two files' slices, so each shard dequantises only its own part, one tensor at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The 16 e2m1 values by code: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[..., R, G, B]`` uint8 blocks and ``[..., R, G]`` exponents -> ``[..., R, G * 2B]`` float32 (exact:
    every FP4 value times a power of two is a float32, barring overflow past 2**128)."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    values = np.ldexp(FP4_VALUES[codes], scales.astype(np.int32)[..., None] - SCALE_BIAS)
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


class Mxfp4View:
    """One MXFP4 tensor seen as its float32 ``[..., C, R]`` (``[..., in, out]``) value: ``get_shape``
    and indexing by a tuple of unit-step slices, as a safetensors slice is used."""

    def __init__(self, blocks: Any, scales: Any):
        self.blocks, self.scales = blocks, scales  # lazy safetensors slices (or arrays)
        *self.prefix, self.rows, self.groups, self.bytes = tuple(_shape(blocks))

    def get_shape(self) -> tuple[int, ...]:
        return (*self.prefix, self.groups * 2 * self.bytes, self.rows)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        shape = self.get_shape()
        bounds = [s.indices(d)[:2] for s, d in zip(index, shape, strict=True)]
        *prefix, (c0, c1), (r0, r1) = bounds
        per_group = 2 * self.bytes
        g0, g1 = c0 // per_group, -(-c1 // per_group)  # the groups covering columns c0..c1
        at = (*(slice(a, b) for a, b in prefix), slice(r0, r1), slice(g0, g1))
        values = dequantize(np.asarray(self.blocks[(*at, slice(None))]), np.asarray(self.scales[at]))
        return np.swapaxes(values, -1, -2)[..., c0 - g0 * per_group:c1 - g0 * per_group, :]


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
