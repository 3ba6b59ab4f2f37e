"""Drafters: one registry of drafter kinds (``registry``) and the built-in kinds, DFlash (block
diffusion conditioned on target features), Orthrus (diffusion attention inside the target),
MTP (a target's own multi-token-prediction head, or one trained here), EAGLE-3 (one
autoregressive layer over target features, the baseline) and Gemma 4's MTP assistants (published
ones, or one trained here), with what their training shares (``blocks``, ``objective``, ``loss_head``)."""

from dflash.drafters import dflash, eagle3, gemma4_assistant, mtp, orthrus  # noqa: F401  (the built-in kinds register themselves)
from dflash.drafters.registry import (
    KINDS,
    DrafterKind,
    drafter_kind,
    dynamic_tree_method_for,
    find_export,
    kind_of,
    load_drafter,
    method_for,
    register,
    resolve_method,
    tree_method_for,
)

__all__ = ["KINDS", "DrafterKind", "drafter_kind", "dynamic_tree_method_for", "find_export", "kind_of",
           "load_drafter", "method_for", "register", "resolve_method", "tree_method_for"]
