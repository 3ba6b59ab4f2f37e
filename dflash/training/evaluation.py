"""How a run is judged: simulated τ on held-out rows during training, real τ by decoding at the end.

The simulated τ comes from the eval step over fixed held-out chunks (fixed anchors, so
evaluations are comparable across steps); the real τ decodes held-out prompts with the
trained drafter, n-gram lookup and (DFlash) both in one tree, all lossless.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dflash.decoding.methods import NgramDraft
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import kind_of
from dflash.drafters import objective as obj
from dflash.errors import TrainingError
from dflash.models.kinds import tree_blocker
from dflash.models.transformer import Transformer

EVAL_SEED = 12345  # fixed anchors: evaluations are comparable across steps


def heldout_chunks(arrays: dict[str, np.ndarray], heldout_rows: int, batch_size: int,
                   num_devices: int) -> list[dict[str, np.ndarray]]:
    """Held-out rows in chunks of at most a training batch, each a multiple of the device count.

    The target's logits of 64 rows of a real preset would not fit in memory at once; the
    chunks' metrics combine exactly (``objective.combine_chunk_metrics``). Every row of the
    first ``heldout_rows`` (rounded down to the devices) is used; the last chunk may be smaller.
    """
    available = len(next(iter(arrays.values())))
    chunk = min(batch_size, heldout_rows, available)
    chunk -= chunk % num_devices
    if chunk == 0:
        raise TrainingError(f"{min(heldout_rows, available)} held-out rows (eval.heldout_rows="
                            f"{heldout_rows}, {available} packed, train.batch_size={batch_size}) for "
                            f"{num_devices} devices: "
                            "the simulated tau needs at least one row per device (more held-out data, or a "
                            "larger eval.heldout_rows)")
    n_eval = min(heldout_rows, available)
    n_eval -= n_eval % num_devices
    return [{k: v[i:min(i + chunk, n_eval)] for k, v in arrays.items()} for i in range(0, n_eval, chunk)]


def make_evaluate(eval_step: Callable, tstate: Any, batches: list[Any]) -> Callable[[Any], dict[str, Any]]:
    """``evaluate(state)``: the eval step over every held-out chunk, combined."""
    eval_key = jax.random.key(EVAL_SEED)

    def evaluate(state: Any) -> dict[str, Any]:
        return obj.combine_chunk_metrics([eval_step(state, tstate, b, jax.random.fold_in(eval_key, i))
                                          for i, b in enumerate(batches)])

    return evaluate


def measure_tau(target: Transformer, drafter: Any, prompts: list[list[int]],
                max_new_tokens: int, mesh: Mesh | None = None) -> dict[str, Any]:
    """Real greedy speculative decoding on held-out prompts: the drafter's tau next to n-gram's,
    and the extra methods its kind names (DFlash: both in one tree, ``tau_with_ngram``: the lookup
    chain as a branch).

    All are lossless, so their outputs must agree; ``outputs_differ`` lists the pairs that don't.
    ``mesh``: decode there (models already on it; every process of a multi-host run calls this)."""
    eos = tuple(target.cfg.eos_token_id)
    kind = kind_of(drafter)
    # The n-gram run never emits the drafter's mask token either, so all runs verify alike.
    common = dict(max_new_tokens=max_new_tokens, eos_ids=eos, mask_token_id=drafter.cfg.mask_token_id,
                  mesh=mesh)
    dres = speculative_generate(target, prompts, method=kind.method(drafter), drafter=drafter, **common)
    ngram = NgramDraft(block_size=drafter.cfg.block_size)
    nres = speculative_generate(target, prompts, method=ngram, **common)
    differ = ["drafter vs n-gram"] if dres.tokens != nres.tokens else []
    out = {"tau": dres.tau, "mean_acceptance_length": dres.mean_acceptance_length, "tau_ngram": nres.tau,
           "acceptance_histogram": dres.histogram(), "acceptance_histogram_ngram": nres.histogram(),
           "eval_prompts": len(prompts), "eval_new_tokens": dres.num_generated}
    trees = tree_blocker(target.cfg) is None  # a hybrid (recurrent) target decodes chains only
    for name, method in kind.eval_methods(drafter).items():
        if method.tree and not trees:
            continue
        res = speculative_generate(target, prompts, method=method, drafter=drafter, **common)
        differ += [f"drafter vs {name.replace('_', ' ')}"] if res.tokens != dres.tokens else []
        out[f"tau_{name}"] = res.tau
        out[f"acceptance_histogram_{name}"] = res.histogram()
    if differ:
        out["outputs_differ"] = differ
    return out
