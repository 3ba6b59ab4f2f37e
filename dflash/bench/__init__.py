"""Benchmarks: the top layer (it imports decoding, drafters and training), never asserted in tests.

One module per concern: ``methods`` (decoding methods side by side: τ, speed, speedup,
ceiling), ``timing`` (timed engine steps and passes), ``anchors`` (per-anchor acceptance
profile), ``memory`` (decoding memory), ``loss_head`` (fused loss vs reference),
``transformers_ar`` (our AR loop vs ``transformers.generate``), ``kernels`` (Pallas kernels
vs references, ``dflash-bench-kernels``) and ``prompts`` (prompt sources, JSON output).
The functions notebooks and docs call are importable from here.
"""

from dflash.bench.anchors import anchor_profile
from dflash.bench.loss_head import loss_head_costs
from dflash.bench.memory import drafter_memory
from dflash.bench.methods import bench_methods
from dflash.bench.prompts import load_prompts, write_json
from dflash.bench.timing import median_in_turns, pass_costs, step_costs
from dflash.bench.transformers_ar import ar_vs_transformers

__all__ = ["anchor_profile", "ar_vs_transformers", "bench_methods", "drafter_memory", "load_prompts",
           "loss_head_costs", "median_in_turns", "pass_costs", "step_costs", "write_json"]
