"""dflash: JAX-first diffusion-style speculative decoding."""

__version__ = "0.1.0"
