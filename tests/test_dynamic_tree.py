"""EAGLE-2 dynamic trees: the tree built == a brute-force reference; in the engine, lossless
(greedy == AR, sampling by chi-square) and the same on a mesh; clear refusals."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import on_cpu_devices
from test_verify import exact  # noqa: F401  (a fixture)

from dflash.decoding.dynamic_tree import DynamicTreeDraft, dynamic_tree, pool_size
from dflash.decoding.method import StepInputs, StepwiseDraft
from dflash.errors import ConfigError

SEED = 12345
GOLDEN = 0x9E3779B1


def mix(h: jax.Array, tok: jax.Array) -> jax.Array:
    """A node's path hash from its parent's and its token (uint32, wrapping)."""
    h = (h ^ (tok.astype(jnp.uint32) + jnp.uint32(1))) * jnp.uint32(GOLDEN)
    return h ^ (h >> 15)


def mix_py(h: int, tok: int) -> int:
    h = ((h ^ (tok + 1)) * GOLDEN) & 0xFFFFFFFF
    return h ^ (h >> 15)


@dataclasses.dataclass(frozen=True)
class HashStepDraft(StepwiseDraft):
    """Test-only stepwise drafter: the draft distribution after a node is a random function of its
    path (a hash of the anchor's position, the anchor and the path's tokens seeds a random vector).
    Every 7th path's is one-hot (a child scored exactly like its parent: ties); ``reduced``: only
    every 4th token can be proposed (a reduced draft vocabulary: fewer than k proposable children);
    ``repeat``: that much more logit for repeating the node's own token on two paths in three (what
    the tiny random targets' greedy text mostly does: drafts often accepted, sometimes not); the mask
    token gets extra mass (it must still never be proposed)."""

    block_size: int = 4
    vocab: int = 37
    mask_token_id: int | None = None
    reduced: bool = False
    repeat: float = 0.0
    noise: float = 2.0  # scale of the path's random vector

    def logp(self, h_N: jax.Array, tok_N: jax.Array) -> jax.Array:
        x_NV = jax.vmap(lambda h: self.noise * jax.random.normal(jax.random.fold_in(jax.random.key(0), h),
                                                          (self.vocab,)))(h_N)
        iota_V = jnp.arange(self.vocab)
        if self.mask_token_id is not None:
            x_NV = x_NV.at[:, self.mask_token_id].add(4.0)
        x_NV = x_NV + self.repeat * ((iota_V == tok_N[:, None]) & (h_N % 3 != 0)[:, None])  # 2 paths in 3
        if self.reduced:
            x_NV = jnp.where(iota_V % 4 == 0, x_NV, -jnp.inf)
        hot_N = ((h_N >> 8) % self.vocab).astype(jnp.int32)
        one_hot_NV = jnp.where(iota_V == hot_N[:, None], 0.0, -jnp.inf)
        x_NV = jnp.where((h_N % 7 == 0)[:, None], one_hot_NV, x_NV)
        return jax.nn.log_softmax(x_NV, axis=-1)

    def tree_start(self, drafter, target, state, step: StepInputs):
        h_B = mix(mix(jnp.full(step.anchor_B.shape, SEED, jnp.uint32), step.lengths_B), step.anchor_B)
        return self.logp(h_B, step.anchor_B), h_B[:, None]

    def tree_expand(self, drafter, target, carry, tokens_BK, parents_BK, depth: int):
        b, k = tokens_BK.shape
        h_BK = mix(jnp.take_along_axis(carry, parents_BK, axis=1), tokens_BK)
        return self.logp(h_BK.reshape(-1), tokens_BK.reshape(-1)).reshape(b, k, self.vocab), h_BK

    def propose(self, drafter, target, state, step, key, sampling):
        raise NotImplementedError("these tests draft trees only")


# ----------------------------------------------------------------------------- the reference
def reference_tree(draft: HashStepDraft, anchor: int, depth: int, k: int, total: int):
    """EAGLE-2's tree from its description, over explicit nodes (numpy, float32 sums as the engine).

    Returns ``(tokens, parents, depths)`` lists (root first) and the pool's scores of each child
    and its parent, to check that ties occurred."""
    logp_of = jax.jit(lambda h: draft.logp(h, jnp.zeros_like(h, jnp.int32)))

    def children(h: int) -> list[tuple[int, np.float32]]:
        lp = np.asarray(logp_of(jnp.asarray([h], jnp.uint32)))[0].astype(np.float32)
        if draft.mask_token_id is not None:
            lp[draft.mask_token_id] = -np.inf  # never proposed
        best = sorted(range(draft.vocab), key=lambda t: (-lp[t], t))[:k]  # the k likeliest, distinct
        return [(t, lp[t]) for t in best]

    def ranked(nodes: list[dict]) -> list[int]:  # best score first; ties: the earlier node
        return sorted(range(len(nodes)), key=lambda i: (-nodes[i]["score"], i))

    root_h = mix_py(mix_py(SEED, 0), anchor)  # at position 0
    pool = [dict(tok=t, score=lp, depth=1, parent=None, h=mix_py(root_h, t)) for t, lp in children(root_h)]
    frontier = list(range(len(pool)))  # pool indices
    for level in range(2, depth + 1):
        cands = []
        for f in frontier:
            node = pool[f]
            for t, lp in children(node["h"]):
                cands.append(dict(tok=t, score=np.float32(node["score"] + lp), depth=level, parent=f,
                                  h=mix_py(node["h"], t)))
        base = len(pool)
        pool += cands
        frontier = [base + i for i in ranked(cands)[:k]]
    chosen = sorted(ranked(pool)[:total])
    slot = {p: s + 1 for s, p in enumerate(chosen)}
    tokens = [anchor] + [pool[i]["tok"] if pool[i]["score"] > -np.inf else -1 for i in chosen]
    # A KeyError here: the selection was not prefix-closed.
    parents = [0] + [0 if pool[i]["parent"] is None else slot[pool[i]["parent"]] for i in chosen]
    depths = [0] + [pool[i]["depth"] for i in chosen]
    ties = sum(pool[i]["parent"] is not None  # a child scored exactly like its parent
               and pool[i]["score"] == pool[pool[i]["parent"]]["score"] > -np.inf for i in chosen)
    return tokens, parents, depths, ties


@partial(jax.jit, static_argnames=("draft", "depth", "k", "total"))
def _build(anchor_B, *, draft, depth, k, total):
    step = StepInputs(anchor_B, jnp.zeros_like(anchor_B), None, None, None)
    logp, carry = draft.tree_start(None, None, (), step)

    def expand(tokens_BK, parents_BK, level):
        nonlocal carry
        out, carry = draft.tree_expand(None, None, carry, tokens_BK, parents_BK, level)
        return out

    return dynamic_tree(anchor_B, logp, expand, depth, k, total, draft.mask_token_id)


CASES = [(1, 3, 2, False), (3, 4, 11, False), (5, 10, 60, False), (3, 10, 60, True),
         (2, 5, 30, True)]  # (depth, top-k, total, reduced vocabulary); (2, 5, 30) takes the whole pool


@pytest.mark.parametrize("depth,k,total,reduced", CASES)
def test_tree_equals_the_brute_force_reference(depth, k, total, reduced):
    draft = HashStepDraft(block_size=depth + 1, vocab=37, mask_token_id=4 if reduced else 5, reduced=reduced)
    anchors = [3, 17, 36]
    tree = _build(jnp.asarray(anchors, jnp.int32), draft=draft, depth=depth, k=k, total=total)
    tokens, parents, depths = (np.asarray(x) for x in tree)
    assert tokens.shape == (3, 1 + total)
    all_ties = 0
    for row, anchor in enumerate(anchors):
        want_tokens, want_parents, want_depths, ties = reference_tree(draft, anchor, depth, k, total)
        all_ties += ties
        assert tokens[row].tolist() == want_tokens, row
        assert parents[row].tolist() == want_parents, row
        assert depths[row].tolist() == want_depths, row
        # Parents first, depth one more than the parent's, siblings distinct, the mask never proposed.
        assert (parents[row, 1:] < np.arange(1, total + 1)).all()
        assert (depths[row, 1:] == depths[row, parents[row, 1:]] + 1).all()
        real = [(int(p), int(t)) for p, t in zip(parents[row, 1:], tokens[row, 1:], strict=True) if t >= 0]
        assert len(set(real)) == len(real) and draft.mask_token_id not in tokens[row, 1:]
    if (depth, reduced) == (5, False) or reduced:
        assert all_ties > 0  # a child scored like its parent was selected: the tie rule mattered
    if reduced and total == pool_size(depth, k):
        assert (tokens[:, 1:] == -1).any()  # fewer than k proposable children: blanks, kept in the tree


@pytest.mark.parametrize("total", [1, 2, 3])
def test_a_certain_chain_ties_with_its_descendants_and_stays_prefix_closed(total):
    """Every draft is one-hot (probability 1): the chain 1, 2, 3 all score 0, tied at every cutoff.
    Ties go to the earlier (shallower) node, so the first ``total`` chain nodes are taken, never a
    child without its parent."""
    k, v = 2, 5

    def one_hot(tok_N):  # the token after ``t`` is surely ``t + 1``
        return jnp.where(jnp.arange(v) == (tok_N[:, None] + 1) % v, 0.0, -jnp.inf)

    def expand(tokens_BK, parents_BK, level):
        return one_hot(tokens_BK.reshape(-1)).reshape(*tokens_BK.shape, v)

    tree = dynamic_tree(jnp.zeros((1,), jnp.int32), one_hot(jnp.zeros((1,), jnp.int32)), expand, 3, k, total)
    assert np.asarray(tree.tokens)[0].tolist() == [0, 1, 2, 3][: total + 1]
    assert np.asarray(tree.parents)[0].tolist() == [0, 0, 1, 2][: total + 1]


def test_bad_shapes_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"total tokens must be in 1..21 \(the candidate pool of depth 3"):
        DynamicTreeDraft.around(HashStepDraft(block_size=4), top_k=3, total_tokens=24)
    with pytest.raises(ConfigError, match="top-k must be >= 1"):
        DynamicTreeDraft.around(HashStepDraft(block_size=4), top_k=0, total_tokens=1)
    with pytest.raises(ConfigError, match="top-k 40 exceeds the vocabulary"):
        _build(jnp.zeros((1,), jnp.int32), draft=HashStepDraft(block_size=2), depth=1, k=40, total=5)
    eagle_defaults = DynamicTreeDraft.around(HashStepDraft(block_size=8))  # depth 7, top-k 10, 60 tokens
    assert pool_size(7, 10) == 610 and eagle_defaults.verify_tokens == 61


# ----------------------------------------------------------------------------- in the engine
# On the tiny test target (conftest.make_tiny_target), whose greedy text mostly repeats a token:
# drafts it often accepts, and sometimes rejects.
TINY_DRAFT = HashStepDraft(block_size=4, vocab=4096, mask_token_id=7, repeat=8.0, noise=1.0)

def test_dynamic_tree_sampling_preserves_the_target_distribution(exact):  # noqa: F811
    """test_verify's chi-square on the joint of the first three sampled tokens (one tree step)."""
    from test_verify import VOCAB, assert_first_three_follow

    from dflash.decoding.sampling import SamplingParams
    from dflash.decoding.speculative import speculative_generate

    target, prompt, joint = exact
    chain = HashStepDraft(block_size=3, vocab=VOCAB, mask_token_id=VOCAB - 1, repeat=1.0)
    n = 6000
    method = DynamicTreeDraft.around(chain, top_k=2, total_tokens=4)
    out = speculative_generate(target, [prompt] * n, method=method,
                               max_new_tokens=3, eos_ids=(), sampling=SamplingParams(temperature=1.0),
                               key=jax.random.key(13))
    assert all(len(t) == 3 for t in out.tokens)
    assert sum(a > 2 for row in out.acceptance_lengths for a in row) > n // 20  # two drafts accepted
    assert_first_three_follow(out.tokens, joint)


@on_cpu_devices(4)
def test_greedy_dynamic_tree_equals_ar_and_on_a_mesh_equals_unsharded():
    import tempfile
    from pathlib import Path

    from conftest import make_tiny_target

    from dflash import sharding as sh
    from dflash.decoding.autoregressive import generate
    from dflash.decoding.speculative import speculative_generate
    from dflash.io import load_target

    with tempfile.TemporaryDirectory() as tmp:
        target = load_target(make_tiny_target(Path(tmp)))
    method = DynamicTreeDraft.around(TINY_DRAFT, top_k=2, total_tokens=6)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 4096, size=n).tolist() for n in (5, 11, 3, 8)]
    common = dict(max_new_tokens=[24, 17, 30, 9], eos_ids=())
    ref = speculative_generate(target, prompts, method=method, **common)
    assert ref.tokens == generate(target, prompts, **common).tokens
    assert ref.tau > 1.5  # drafts were really accepted
    mesh = sh.make_mesh(sh.MeshConfig(2, 1, 2))  # data 2 x tensor 2
    got = speculative_generate(sh.shard_model(target, mesh), prompts, method=method, mesh=mesh, **common)
    assert got.tokens == ref.tokens and got.acceptance_lengths == ref.acceptance_lengths


def test_a_hybrid_target_and_a_block_drafter_are_refused_up_front():
    from test_verify import CFG_HYBRID

    from dflash.decoding.speculative import speculative_generate
    from dflash.drafters import dynamic_tree_method_for, load_drafter
    from dflash.models import build

    method = DynamicTreeDraft.around(HashStepDraft(block_size=3, vocab=CFG_HYBRID.vocab_size), top_k=2,
                                     total_tokens=4)
    with pytest.raises(ConfigError, match="tree verification .* is not available for this target"):
        speculative_generate(build(CFG_HYBRID, seed=0), [[1, 2]], method=method, max_new_tokens=3)
    drafter = load_drafter("tiny-code-dflash")
    with pytest.raises(ConfigError, match=r"one token per step \(EAGLE-3, MTP\); DFlash drafts a block: use "
                                          r"--tree-width"):
        dynamic_tree_method_for(drafter, 3, 2, 4)


def test_the_commands_refuse_a_block_drafter_and_bad_flags_in_one_line(capsys):
    from dflash.cli import bench, generate

    dflash = ["--prompt", "def f", "--drafter", "tiny-code-dflash"]
    assert generate.main([*dflash, "--dynamic-tree", "3,2,4"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dflash-generate: error: dynamic tree needs a drafter that drafts one token per step (EAGLE-3, MTP); "
        "DFlash drafts a block: use --tree-width"]
    assert bench.main(["--num-prompts", "1", "--dynamic-tree"]) == 2  # the default drafter is DFlash's
    assert capsys.readouterr().err.splitlines()[-1].endswith("DFlash drafts a block: use --tree-width")
    for args, says in ((["--dynamic-tree", "3,2"], "must be DEPTH,TOPK,TOKENS (three integers >= 1)"),
                       (["--dynamic-tree", "--tree-width", "2"], "--dynamic-tree sets its own tree")):
        with pytest.raises(SystemExit):
            generate.main([*dflash, *args])
        assert says in capsys.readouterr().err
