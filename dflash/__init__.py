"""dflash: JAX-first diffusion-style speculative decoding."""

from dflash.distributed import skip_absent_tpu

__version__ = "0.1.0"

skip_absent_tpu()  # a CPU-only host with libtpu installed: no TPU probe, no libtpu error page
