"""The speculative engine: one jitted ``lax.while_loop`` of draft -> verify -> accept -> commit.

Verification is lossless: greedy output equals the target's own greedy decode token for token,
and the token-wise and block rules preserve the target's sampling distribution (verify.py).
The target verifies ``[anchor, d_1 .. d_{Q-1}]`` (or a tree of candidates, tree.py) in one
pass; the accepted prefix plus one more token (bonus or correction) are emitted; the cache
rolls back by setting lengths; the bonus becomes the next anchor. No host round trip per
step; caches are created on device inside the compiled program and shapes are static (bucketed).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dflash.decoding import mesh as md
from dflash.decoding.autoregressive import GenerationResult, check_context, is_eos, prefill, prepare_batch
from dflash.decoding.compiled import compiled
from dflash.decoding.method import DraftMethod, StepInputs
from dflash.decoding.methods import NoDraft
from dflash.decoding.sampling import SamplingParams, sample
from dflash.decoding.tree import ancestor_mask, gather_path, verify_tree
from dflash.decoding.verify import RULES, verify
from dflash.errors import ConfigError
from dflash.models.cache import Cache
from dflash.models.kinds import check_tree
from dflash.models.transformer import Transformer


@dataclasses.dataclass
class SpecResult(GenerationResult):
    acceptance_lengths: list[list[int]]  # accepted drafts + 1, one entry per verify step, per row
    target_forwards: list[int]  # per row: prefill + verify passes while the row was active
    block_size: int
    device_batches: list[int] = dataclasses.field(default_factory=list)  # rows per loop segment
    max_len: int = 0  # cache slots per row (the bucket this request compiled for)

    @property
    def tau(self) -> float:
        """Headline τ: tokens emitted by verify steps / verify steps, over all rows (docs/design.md §7).

        The first token of each row comes from the prefill, not a verify step, so it is not counted.
        """
        steps = sum(len(row) for row in self.acceptance_lengths)
        rows = zip(self.tokens, self.acceptance_lengths, strict=True)
        emitted = sum(len(toks) - 1 for toks, row in rows if row)
        return emitted / steps if steps else float("nan")

    @property
    def mean_acceptance_length(self) -> float:
        """Mean of ``acceptance_lengths`` (accepted drafts + 1 per step), the PyTorch reference's
        number. It exceeds ``tau`` only where EOS or the token budget cut a row's last step."""
        steps = [a for row in self.acceptance_lengths for a in row]
        return float(np.mean(steps)) if steps else float("nan")

    def histogram(self) -> list[int]:
        """Counts of accepted drafts 0..Q-1 over all verify steps."""
        hist = [0] * self.block_size
        for row in self.acceptance_lengths:
            for a in row:
                hist[a - 1] += 1
        return hist


COMPACT_MIN_ROWS = 8


class Carry(NamedTuple):
    """The loop state; every array's leading axis is the row (caches and method states too)."""

    cache: Cache
    dstate: Any  # the method's own state (DFlash: its context cache)
    tokens_BL: jax.Array  # prompt + emitted tokens per row
    n_gen: jax.Array  # [B] emitted so far
    done: jax.Array  # [B]
    acc_log: jax.Array  # [B, max_new] accepted + 1 per verify step
    steps: jax.Array  # [B] verify steps taken
    prompt_lens: jax.Array  # [B]
    max_new: jax.Array  # [B] token budgets


@partial(jax.jit, static_argnames=("tgraph", "dgraph", "method", "max_new", "max_len", "eos_ids", "sampling"))
def _spec_start(tparams, dparams, tokens_BP, prompt_lens_B, max_new_B, key, *, tgraph, dgraph, method,
                max_new: int, max_len: int, eos_ids: tuple[int, ...], sampling: SamplingParams):
    """Prefill of target and drafter, and the first token (sampled from the prompt's last logits)."""
    target: Transformer = nnx.merge(tgraph, tparams)
    drafter = nnx.merge(dgraph, dparams) if dgraph is not None else None
    batch, prompt_pad = tokens_BP.shape
    rows = jnp.arange(batch)
    cache = target.init_cache(batch, max_len)
    logits, hidden, cache = prefill(target, tokens_BP, prompt_lens_B, cache, method.hidden_layers)
    dstate = method.init(drafter, batch, max_len, target.dtype)
    dstate = method.prefill(drafter, dstate, hidden, prompt_lens_B,
                            **({"tokens_BP": tokens_BP} if method.commit_tokens else {}))
    key, sub = jax.random.split(key)
    first = sample(logits, sampling, sub)
    # All committed + emitted tokens per row (prompt, then generation): the n-gram drafter reads it.
    tokens_BL = jnp.zeros((batch, max_len + method.block_size), jnp.int32).at[:, :prompt_pad].set(tokens_BP)
    tokens_BL = tokens_BL.at[rows, prompt_lens_B].set(first)
    n_gen = jnp.ones((batch,), jnp.int32)
    done = is_eos(first, eos_ids) | (n_gen >= max_new_B)
    carry = Carry(cache, dstate, tokens_BL, n_gen, done, jnp.zeros((batch, max_new), jnp.int32),
                  jnp.zeros((batch,), jnp.int32), prompt_lens_B, max_new_B)
    return carry, key


@partial(jax.jit, static_argnames=("tgraph", "dgraph", "method", "max_new", "eos_ids", "mask_id", "sampling",
                                   "rule", "keep_above"), donate_argnums=(2,))
def _spec_loop(tparams, dparams, carry: Carry, key, *, tgraph, dgraph, method, max_new: int,
               eos_ids: tuple[int, ...], mask_id: int, sampling: SamplingParams, rule: str, keep_above: int):
    """Draft -> verify -> accept -> commit while more than ``keep_above`` rows are active (0: until
    all are done; otherwise the host then drops the finished rows and calls again on fewer rows).

    The carry is donated: its caches are updated in place.
    """
    target: Transformer = nnx.merge(tgraph, tparams)
    drafter = nnx.merge(dgraph, dparams) if dgraph is not None else None
    batch = carry.n_gen.shape[0]
    buf_len = carry.tokens_BL.shape[1]
    k = method.block_size
    rows = jnp.arange(batch)
    prompt_lens_B, max_new_B = carry.prompt_lens, carry.max_new

    def cond(state):
        return jnp.sum(~state[0].done) > keep_above

    def body(state):
        (cache, dstate, tokens_BL, n_gen, done, acc_log, steps, _, _), key = state
        key, k_draft, k_verify = jax.random.split(key, 3)
        lengths = cache.lengths  # committed tokens; the anchor sits at this position
        total = prompt_lens_B + n_gen  # prompt + emitted (the anchor is the last of them)
        anchor = jnp.take_along_axis(tokens_BL, (total - 1)[:, None], axis=1)[:, 0]
        step = StepInputs(anchor, lengths, tokens_BL, total, cache)
        drafts, accepted, extra, cache_v, hidden = draft_and_verify(
            method, drafter, target, dstate, step, mask_id, sampling, rule, k_draft, k_verify)
        idx_Q = jnp.arange(k)[None]
        emitted = jnp.where(idx_Q < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), extra[:, None])
        count = accepted + 1
        # Stop at the first EOS among the emitted tokens and at the row's token budget.
        eos_hit = is_eos(emitted, eos_ids) & (idx_Q < count[:, None])
        first_eos = jnp.where(eos_hit.any(axis=1), jnp.argmax(eos_hit, axis=1) + 1, count)
        count = jnp.minimum(jnp.minimum(count, first_eos), max_new_B - n_gen)
        count = jnp.where(done, 0, count)
        write_at = jnp.where(idx_Q < count[:, None], total[:, None] + idx_Q, buf_len)
        tokens_BL = tokens_BL.at[rows[:, None], write_at].set(emitted, mode="drop")
        new_done = done | eos_hit.any(axis=1) & (first_eos <= count) | (n_gen + count >= max_new_B)
        acc_log = acc_log.at[rows, jnp.where(done, max_new, steps)].set(accepted + 1, mode="drop")
        steps = steps + (~done).astype(jnp.int32)
        # Commit anchor + accepted drafts; finished rows keep their state.
        cache = cache_v.keep(jnp.where(done, 0, accepted + 1), method.verify_tokens)
        # A finished row's drafter state may drift: it never emits again, and writes past the
        # cache are dropped, so no per-row select over the drafter's pytree is needed.
        dstate = method.commit(drafter, dstate, hidden, lengths, accepted,
                               **commit_tokens(method, anchor, drafts))
        n_gen = n_gen + count
        return Carry(cache, dstate, tokens_BL, n_gen, new_done, acc_log, steps, prompt_lens_B, max_new_B), key

    return jax.lax.while_loop(cond, body, (carry, key))


def draft_and_verify(method, drafter, target: Transformer, dstate, step: StepInputs, mask_id: int,
                     sampling: SamplingParams, rule: str, k_draft: jax.Array, k_verify: jax.Array):
    """One step's passes: the method drafts, the target scores the block (or tree), the rule accepts.

    Returns drafts ``[B, Q-1]`` (a tree: along the accepted path), accepted ``[B]``, the bonus or
    correction ``[B]``, the target cache holding the block (lengths advanced by the verified
    tokens; the caller keeps the accepted part with ``Cache.keep``) and the hidden states the
    method asked for. The engine adds only bookkeeping around it; ``bench.pass_costs`` times it
    alone to measure what that bookkeeping costs.
    """
    if method.tree:  # a tree of candidates, one accepted path
        return _tree_step(method, drafter, target, dstate, step, mask_id, sampling, k_verify)
    # The method sees the committed prefix of the target's cache (Orthrus drafts from it).
    drafts, q = method.propose(drafter, target, dstate, step, k_draft, sampling)
    block = jnp.concatenate([step.anchor_B[:, None], drafts], axis=1)  # [B, Q]
    positions = step.lengths_B[:, None] + jnp.arange(method.block_size)[None]
    out = target(jnp.maximum(block, 0), positions, step.target_cache, hidden_layers=method.hidden_layers)
    # out.logits[:, i] is the target's distribution for the token after block[:, :i+1].
    accepted, extra = verify(rule, out.logits, drafts, q, k_verify, sampling, mask_id)  # [B], [B]
    return drafts, accepted, extra, out.cache, out.hidden


def commit_tokens(method: DraftMethod, anchor_B: jax.Array, drafts_BD: jax.Array) -> dict[str, jax.Array]:
    """``commit``'s ``tokens_BQ`` (the verified block, or the accepted path) when the method reads it."""
    if not method.commit_tokens:
        return {}
    return {"tokens_BQ": jnp.concatenate([anchor_B[:, None], drafts_BD], axis=1)}


def mask_id_for(method: DraftMethod, given: int | None = None) -> int:
    """The mask token the engine never emits: the method's; a caller's must agree with it. Inside
    the engine "none" is -1 (never a token: also what prompt lookup proposes where it has nothing)."""
    own = method.mask_token_id
    if given is None or given == own:
        return -1 if own is None else own
    if own is not None:
        raise ConfigError(f"mask_token_id={given} conflicts with the drafter's mask token {own}; "
                          "leave mask_token_id unset (it comes from the method)")
    return given  # the method has none (AR, n-gram): the caller's is honoured


def _take_rows(carry: Carry, keep: np.ndarray) -> Carry:
    """The carry restricted to rows ``keep`` (every array, caches included, has its rows on axis 0)."""
    idx = jnp.asarray(keep)
    return jax.tree.map(lambda x: x[idx], carry)


def _tree_step(method, drafter, target: Transformer, dstate, step: StepInputs, mask_id: int,
               sampling: SamplingParams, key: jax.Array):
    """Drafts a tree, verifies all its nodes in one target pass, keeps the longest accepted path.

    Returns the path's drafts ``[B, D]``, accepted ``[B]``, the bonus ``[B]``, the cache with the
    path's entries where a verified chain would have put them, and the hidden states along the
    path ``[n, B, D+1, H]`` (what a verified chain of the same tokens would have given).
    """
    tree = method.propose_tree(drafter, target, dstate, step)
    positions = step.lengths_B[:, None] + tree.depth  # a node sits at its depth
    # Blank nodes (-1: a grafted chain's shared or unknown candidates) are scored as token 0, never accepted.
    out = target(jnp.maximum(tree.tokens, 0), positions, step.target_cache,
                 block_mask=ancestor_mask(tree.parents),
                 hidden_layers=method.hidden_layers)
    verdict = verify_tree(sample(out.logits, sampling, key), tree, method.depth, mask_id)  # a choice per node
    drafts = jnp.take_along_axis(tree.tokens, verdict.path[:, 1:], axis=1)
    cache = out.cache.commit_path(step.lengths_B, verdict.path)
    hidden = None if out.hidden is None else gather_path(out.hidden, verdict.path)  # None: no features asked
    return drafts, verdict.accepted, verdict.extra, cache, hidden


def speculative_generate(
    target: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    method: DraftMethod = NoDraft(),
    drafter: nnx.Module | None = None,
    max_new_tokens: int | Sequence[int] = 128,
    eos_ids: Sequence[int] | None = None,
    mask_token_id: int | None = None,
    max_len: int | None = None,
    pad_id: int = 0,
    sampling: SamplingParams = SamplingParams(),
    rule: str | None = None,
    key: jax.Array | None = None,
    compact: bool = True,
    allow_longer_than_context: bool = False,
    mesh: Mesh | None = None,
) -> SpecResult:
    """Speculative decoding of a batch of prompts with ``method`` (and its ``drafter``).

    ``rule``: ``greedy`` (default at temperature 0), ``token`` (default when sampling) or
    ``block`` verification. ``compact``: once fewer than half of the rows are still active,
    finished rows are dropped from the device batch so they stop costing work (each smaller
    batch compiles once; compile time is reported apart, in ``compile_s``). Only batches of at
    least ``COMPACT_MIN_ROWS`` rows are compacted: below that a recompile costs more than it saves.
    ``mask_token_id`` (never emitted) comes from the method; passing a different one is an error.
    A prompt plus its budget past the target's context is a ``ContextLengthError`` unless
    ``allow_longer_than_context``. ``mesh``: decode on it (batch over ``data × fsdp × expert``, the models'
    own split over ``tensor``); target and drafter must already be on it (``load_target(...,
    mesh=)``, ``sharding.shard_model``). The batch is padded to a multiple of the batch split with
    dummy rows (dropped), and compaction keeps finished rows as padding to stay a multiple of it.
    """
    mask_id = mask_id_for(method, mask_token_id)
    rule = rule or ("greedy" if sampling.greedy else "token")
    if rule not in RULES:
        raise ConfigError(f"unknown verification rule {rule!r}; choose from {RULES}")
    if rule == "greedy" and not sampling.greedy:
        raise ConfigError("greedy verification needs temperature 0; use rule 'token' or 'block'")
    if method.tree and rule == "block":
        raise ConfigError("tree drafting verifies greedily or token-wise (sibling rejection), not 'block'")
    if method.tree:
        check_tree(target.cfg)  # a recurrent state cannot commit a path: say so before compiling
    batch, k, split = len(prompts), method.block_size, md.batch_split(mesh)
    # A verify pass may write up to Q (a tree: all its nodes) slots past the last committed token.
    rows, budgets = md.pad_request(prompts, max_new_tokens, mesh)  # dummy rows: budget 1, dropped
    slack = method.verify_tokens
    budgets, prompt_lens, max_len, padded = prepare_batch(rows, budgets, slack, max_len, pad_id)
    check_context(prompt_lens, budgets, target.cfg.max_position_embeddings, allow_longer_than_context)
    eos = tuple(target.cfg.eos_token_id if eos_ids is None else eos_ids)
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(drafter) if drafter is not None else (None, None)
    md.check_on_mesh(tparams, mesh, "target")
    md.check_on_mesh(dparams, mesh, "drafter")
    common = dict(tgraph=tgraph, dgraph=dgraph, method=method, max_new=max(budgets))
    loop_static = dict(common, eos_ids=eos, mask_id=mask_id, sampling=sampling, rule=rule)
    # Results per original row; rows leave the device batch as they finish (when compacting).
    tokens_out: list[list[int]] = [[] for _ in range(batch)]
    accs: list[list[int]] = [[] for _ in range(batch)]
    forwards = [0] * batch
    sizes: list[int] = []
    elapsed = 0.0
    with md.on_mesh(mesh):
        inputs = (padded, np.asarray(prompt_lens, np.int32), np.asarray(budgets, np.int32),
                  jax.random.key(0) if key is None else key)
        start_args = (tparams, dparams, *(md.place(x, mesh) for x in inputs))
        start, compile_s = compiled(_spec_start, start_args, dict(common, max_len=max_len, eos_ids=eos,
                                                                   sampling=sampling))
        t0 = time.perf_counter()
        carry, key = jax.block_until_ready(start(*start_args))
        elapsed += time.perf_counter() - t0
        row_ids = np.where(np.arange(len(budgets)) < batch, np.arange(len(budgets)), -1)  # -1: no result
        while True:
            # Run until all rows are done or, on a large batch, until at most half remain active.
            shrinks = compact and len(row_ids) >= COMPACT_MIN_ROWS and md.can_compact(len(row_ids), split)
            keep_above = len(row_ids) // 2 if shrinks else 0
            sizes.append(len(row_ids))
            loop, seconds = compiled(_spec_loop, (tparams, dparams, carry, key), dict(loop_static,
                                                                                      keep_above=keep_above))
            compile_s += seconds
            t0 = time.perf_counter()
            carry, key = jax.block_until_ready(loop(tparams, dparams, carry, key))
            done = md.to_host(carry.done)
            elapsed += time.perf_counter() - t0
            finished = np.flatnonzero(done & (row_ids >= 0))
            if finished.size:
                tokens_BL, n_gen, acc_log, steps = (md.to_host(x) for x in (
                    carry.tokens_BL, carry.n_gen, carry.acc_log, carry.steps))
                for r in finished:
                    i = row_ids[r]
                    p = prompt_lens[i]
                    tokens_out[i] = tokens_BL[r, p: p + n_gen[r]].tolist()
                    accs[i] = acc_log[r, : steps[r]].tolist()
                    forwards[i] = int(steps[r]) + 1  # + the prefill pass
                row_ids[finished] = -1  # collected: may stay on as padding
            if done.all():
                break
            t0 = time.perf_counter()
            keep = md.compact_rows(done, split)  # the active rows (and, on a mesh, finished ones as padding)
            taken = _take_rows(carry, keep)
            carry = jax.block_until_ready(taken if mesh is None else md.reshard_like(taken, carry))
            row_ids = row_ids[keep]
            elapsed += time.perf_counter() - t0
    return SpecResult(tokens_out, prompt_lens[:batch], elapsed, compile_s, accs, forwards, k, sizes, max_len)
