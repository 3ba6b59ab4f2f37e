"""The draft-method interface (the ``DraftMethod`` ABCs), the mask token taken from the method, and τ."""

from __future__ import annotations

import pytest

from dflash.decoding.method import DraftMethod
from dflash.decoding.methods import NgramDraft, NoDraft
from dflash.decoding.speculative import SpecResult, mask_id_for, speculative_generate
from dflash.decoding.tree import BeamTreeDraft
from dflash.drafters.dflash import DFlashDraft
from dflash.drafters.orthrus import OrthrusDraft
from dflash.errors import ConfigError

CHAIN = DFlashDraft(block_size=5, hidden_layers=(0, 2), mask_token_id=7)
METHODS = [NoDraft(), NgramDraft(block_size=4), CHAIN, OrthrusDraft(block_size=6, mask_token_id=9),
           BeamTreeDraft(CHAIN, width=2, lookup=NgramDraft(block_size=5))]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_every_method_declares_the_interface(method):
    assert isinstance(method, DraftMethod)
    hash(method)  # a static argument of the jitted engine
    for name in ("block_size", "hidden_layers", "mask_token_id", "tree", "verify_tokens"):
        getattr(method, name)
    assert method.verify_tokens >= method.block_size
    assert callable(method.propose_tree if method.tree else method.propose)


def test_members_say_what_each_method_needs():
    assert [m.tree for m in METHODS] == [False, False, False, False, True]
    assert [m.mask_token_id for m in METHODS] == [None, None, 7, 9, 7]
    assert METHODS[4].verify_tokens == 1 + (2 + 1) * 4 and METHODS[4].hidden_layers == (0, 2)
    assert NoDraft().hidden_layers == () and NoDraft().init(None, 2, 8, None) == ()


def test_a_method_missing_its_propose_fails_at_construction():
    """The interface is abstract: forgetting ``propose`` (or a tree's ``propose_tree``) is a
    TypeError when the method is made, not a None drafted inside the engine's trace."""
    import dataclasses

    from dflash.decoding.method import ChainDraft, TreeDraft

    @dataclasses.dataclass(frozen=True)
    class Forgetful(ChainDraft):
        block_size: int = 4

    @dataclasses.dataclass(frozen=True)
    class ForgetfulTree(TreeDraft):
        block_size: int = 4

        @property
        def depth(self) -> int:
            return 3

    for cls, missing in ((Forgetful, "propose"), (ForgetfulTree, "propose_tree")):
        with pytest.raises(TypeError, match=f"abstract method.*{missing}"):
            cls()

    @dataclasses.dataclass(frozen=True)
    class Complete(Forgetful):
        def propose(self, drafter, target, state, step, key, sampling):
            return step.anchor_B[:, None], None

    assert Complete().block_size == 4 and Complete().mask_token_id is None


def test_mask_token_comes_from_the_method_and_a_conflict_is_refused():
    assert mask_id_for(CHAIN) == 7 and mask_id_for(CHAIN, 7) == 7
    assert mask_id_for(NgramDraft(), 5) == 5  # a method without one honours the caller's
    assert mask_id_for(NoDraft()) == -1
    with pytest.raises(ConfigError, match="mask_token_id=8 conflicts with the drafter's mask token 7"):
        speculative_generate(None, [[1, 2]], method=CHAIN, mask_token_id=8)
    with pytest.raises(ConfigError, match="conflicts"):  # the tree's is its chain's
        speculative_generate(None, [[1, 2]], method=METHODS[4], mask_token_id=-1)


def test_tau_counts_emitted_tokens_and_the_per_step_list_is_kept():
    # Row 0: prefill token + steps emitting 3 and then 1 (a step that accepted 2 drafts, cut by EOS
    # after its first token); row 1: one full step; row 2: done at the prefill (no step).
    res = SpecResult(tokens=[[5, 6, 7, 8, 9], [1, 2, 3], [4]], prompt_lengths=[3, 3, 3], elapsed_s=1.0,
                     compile_s=0.0, acceptance_lengths=[[3, 3], [2], []], target_forwards=[3, 2, 1],
                     block_size=4)
    assert res.acceptance_lengths == [[3, 3], [2], []]  # accepted + 1 per step, as the reference reports
    assert res.tau == pytest.approx((4 + 2) / 3)  # tokens the 3 verify steps emitted / 3
    assert res.mean_acceptance_length == pytest.approx((3 + 3 + 2) / 3)
    assert res.tau < res.mean_acceptance_length
