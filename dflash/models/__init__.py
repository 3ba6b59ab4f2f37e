"""Target models: one decoder whose layers are registered kinds (attention, dense MLP, ...).

Loading and saving in the Hugging Face layout is ``dflash.io``.
"""

from dflash.models.cache import Cache, KVState
from dflash.models.kinds import init_cache
from dflash.models.transformer import ForwardOutput, Transformer, abstract, build, count_params

__all__ = ["Cache", "ForwardOutput", "KVState", "Transformer", "abstract", "build", "count_params",
           "init_cache"]
