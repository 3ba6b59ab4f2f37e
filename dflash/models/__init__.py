"""Target models: one decoder for Qwen3 / Qwen2 / Llama-3.x, and HF-format loading."""

from dflash.models.loading import CheckpointError, load_target, resolve, save_target
from dflash.models.transformer import ForwardOutput, Transformer, abstract, build, count_params

__all__ = [
    "CheckpointError", "ForwardOutput", "Transformer", "abstract", "build", "count_params",
    "load_target", "resolve", "save_target",
]
