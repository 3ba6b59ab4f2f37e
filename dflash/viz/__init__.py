"""Pictures of speculative decoding and training: figures, a token view, run reports.

``figures`` (matplotlib PNGs from bench results, SpecResults and run scalars), ``tokens`` (each
verify step's accepted drafts and bonus, for a terminal or a notebook), ``report``
(``dflash-report RUN_DIR``) and ``notebook`` (what the notebooks in ``notebooks/`` call).
``python -m dflash.viz readme docs/img`` regenerates the README's pictures.
"""

from dflash.viz.errors import VizError

__all__ = ["VizError"]
