"""Reading and writing: checkpoints in the Hugging Face layout, tokenizers, arrays to the host.

Below decoding, drafters and training, which all load through it; above ``dflash.models``, whose
layer kinds say which tensors a checkpoint holds (docs/architecture.md, "Package layers").
"""

from dflash.io.loading import load_target, resolve, save_target
from dflash.io.tokenizer import load_tokenizer

__all__ = ["load_target", "load_tokenizer", "resolve", "save_target"]
