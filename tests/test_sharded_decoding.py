"""Decoding on a mesh: AR and speculative decoding (DFlash, tree, Orthrus) sharded over data × fsdp ×
tensor give the unsharded tokens and acceptance lengths; sampling on a mesh stays lossless.

Bodies run in a subprocess with 8 simulated CPU devices (``tests/devices.py``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from devices import on_cpu_devices
from test_verify import VOCAB, assert_first_three_follow, exact_joint

from dflash import sharding as sh
from dflash.config import ModelConfig
from dflash.decoding import SamplingParams, generate
from dflash.decoding.compiled import COMPILES
from dflash.decoding.mesh import can_compact, compact_rows, pad_request
from dflash.decoding.speculative import speculative_generate
from dflash.drafters import tree_method_for
from dflash.drafters.dflash import DFlashConfig, DFlashDraft, build_drafter
from dflash.drafters.orthrus import OrthrusConfig, OrthrusDraft, OrthrusDrafter
from dflash.errors import ConfigError
from dflash.models import build

MESHES = ((2, 1, 4), (4, 1, 2), (2, 2, 2))  # (data, fsdp, tensor)
# Vocabulary and widths divide every mesh axis; 2 kv heads are too few for tensor=4 (the cache
# keeps its heads whole there).
CFG = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=())
MASK = 63
BUDGETS = [4, 30, 8, 26, 12, 22, 16, 18, 6]  # 9 rows: padded to 10 or 12, compacted as rows finish


def _models():
    target = build(CFG, seed=1)
    target.embed_tokens[...] = target.embed_tokens[...] * 8.0  # sharpened: real acceptances
    dflash = build_drafter(DFlashConfig.for_target(CFG, mask_token_id=MASK, num_layers=1, block_size=4,
                                                   target_layer_ids=(0, 1)), seed=2)
    orthrus = OrthrusDrafter.from_target(target, OrthrusConfig.for_target(CFG, mask_token_id=MASK,
                                                                          block_size=4))
    methods = {"dflash": (DFlashDraft.of(dflash), dflash), "tree": (tree_method_for(dflash, 2), dflash),
               "orthrus": (OrthrusDraft.of(orthrus), orthrus)}
    return target, methods


def _prompts(batch: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60, size=int(n)).tolist() for n in rng.integers(1, 30, size=batch)]


def test_padding_and_compaction_keep_the_batch_split():
    prompts, budgets = pad_request([[1, 2], [3], [4, 5, 6]], [5, 7, 9], _FakeMesh(2))
    assert prompts == [[1, 2], [3], [4, 5, 6], [1, 2]] and budgets == [5, 7, 9, 1]
    assert pad_request([[1], [2]], 4, _FakeMesh(2)) == ([[1], [2]], 4)
    done = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    keep = compact_rows(done, 4)
    assert len(keep) == 4 and set(np.flatnonzero(~done)) <= set(keep) and list(keep) == sorted(keep)
    assert list(compact_rows(done, 1)) == [1, 4, 7]
    assert can_compact(8, 4) and not can_compact(4, 4) and not can_compact(6, 4)


class _FakeMesh:
    """Just enough of a mesh for ``batch_shards``."""

    def __init__(self, data: int):
        self.shape = {"data": data, "fsdp": 1, "tensor": 1}


@on_cpu_devices(8)
def test_greedy_decoding_on_every_mesh_equals_unsharded():
    target, methods = _models()
    prompts, ar_prompts = _prompts(9, seed=0), _prompts(5, seed=1)
    ar_ref = generate(target, ar_prompts, max_new_tokens=[9, 3, 14, 1, 7], eos_ids=())
    refs = {name: speculative_generate(target, prompts, method=m, drafter=d, max_new_tokens=BUDGETS,
                                       eos_ids=()) for name, (m, d) in methods.items()}
    assert all(len(r.device_batches) > 1 for r in refs.values())  # compaction ran unsharded too
    assert any(a > 1 for r in refs.values() for row in r.acceptance_lengths for a in row)
    with pytest.raises(ConfigError, match="not on the mesh's 8"):  # an unsharded model on a mesh
        generate(target, ar_prompts, max_new_tokens=2, mesh=sh.make_mesh(sh.MeshConfig(*MESHES[0])))
    batches = {}
    for shape in MESHES:
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        split = sh.batch_shards(mesh)
        on_mesh = sh.shard_model(target, mesh)
        out = generate(on_mesh, ar_prompts, max_new_tokens=[9, 3, 14, 1, 7], eos_ids=(), mesh=mesh)
        assert out.tokens == ar_ref.tokens and out.prompt_lengths == ar_ref.prompt_lengths, shape
        for name, (method, drafter) in methods.items():
            before = COMPILES[0]
            got = speculative_generate(on_mesh, prompts, method=method, drafter=sh.shard_model(drafter, mesh),
                                       max_new_tokens=BUDGETS, eos_ids=(), mesh=mesh)
            assert got.tokens == refs[name].tokens, (shape, name)
            assert got.acceptance_lengths == refs[name].acceptance_lengths, (shape, name)
            assert got.target_forwards == refs[name].target_forwards, (shape, name)
            assert len(got.device_batches) > 1 and all(b % split == 0 for b in got.device_batches), got
            assert COMPILES[0] - before == len(got.device_batches) + 1  # start + a loop per segment
            batches[shape, name] = got.device_batches
    # (4,1,2) and (2,2,2) pad to the same shapes: the second mesh still compiled its own programs
    # (counted above); the same call again on the last mesh compiles nothing.
    assert batches[(4, 1, 2), "dflash"] == batches[(2, 2, 2), "dflash"]
    before = COMPILES[0]
    again = speculative_generate(on_mesh, prompts, method=method, drafter=sh.shard_model(drafter, mesh),
                                 max_new_tokens=BUDGETS, eos_ids=(), mesh=mesh)
    assert COMPILES[0] == before and again.tokens == refs[name].tokens


@on_cpu_devices(8)
def test_speculative_sampling_on_a_mesh_preserves_the_target_distribution():
    """test_verify's chi-square on the joint of the first three tokens, decoded on data=4 × tensor=2
    with a stochastic DFlash drafter and the token rule."""
    target, prompt, joint = exact_joint()
    mesh = sh.make_mesh(sh.MeshConfig(4, 1, 2))
    drafter = build_drafter(DFlashConfig.for_target(target.cfg, mask_token_id=VOCAB - 1, block_size=4,
                                                    target_layer_ids=(0,)), seed=9)
    n = 6002  # not a multiple of the batch split: two dummy rows
    out = speculative_generate(sh.shard_model(target, mesh), [prompt] * n,
                               method=DFlashDraft.of(drafter, stochastic=True),
                               drafter=sh.shard_model(drafter, mesh), max_new_tokens=3, eos_ids=(),
                               mask_token_id=VOCAB - 1, sampling=SamplingParams(temperature=1.0),
                               rule="token", key=jax.random.key(5), mesh=mesh)
    assert len(out.tokens) == n and all(len(t) == 3 for t in out.tokens)
    assert sum(a > 1 for row in out.acceptance_lengths for a in row) > n // 20  # drafts were accepted
    assert_first_three_follow(out.tokens, joint)


def test_mesh_flag_parses_any_subset_and_refuses_bad_text():
    from dflash.cli.generate import build_parser
    from dflash.cli.parser import parse_mesh

    assert parse_mesh("data=2,tensor=4") == sh.MeshConfig(2, 1, 4)
    assert parse_mesh("tensor=2") == sh.MeshConfig(-1, 1, 2)  # data: the rest of the devices
    assert parse_mesh(" fsdp=2, tensor=-1") == sh.MeshConfig(1, 2, -1)
    assert parse_mesh("expert=4,tensor=2") == sh.MeshConfig(-1, 1, 2, expert=4)
    args = build_parser().parse_args(["--prompt", "x", "--mesh", "data=-1,fsdp=2"])
    assert args.mesh == sh.MeshConfig(-1, 2, 1)
    for bad, says in (("data=2,data=2", "each at most once"),
                      ("model=2", "AXIS one of data, fsdp, expert, tensor"), ("tensor", "AXIS=SIZE"),
                      ("tensor=two", "'two' is not an integer"), ("tensor=0", "positive int or -1"),
                      ("data=-1,tensor=-1", "at most one mesh axis")):
        with pytest.raises(ConfigError, match=says):
            parse_mesh(bad)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--prompt", "x", "--mesh", bad])


@on_cpu_devices(4)
def test_generate_and_regenerate_clis_on_a_mesh_equal_unsharded():
    import contextlib
    import io
    import json
    import tempfile
    from pathlib import Path

    import datasets

    from dflash.cli.generate import main as generate_main
    from dflash.cli.regenerate import main as regenerate_main
    from dflash.io.loading import load_target
    from dflash.io.tokenizer import load_tokenizer
    from dflash.training.regenerate import regenerate_dataset

    def gen(*args: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert generate_main(["--prompt", "def area(r):\n", "--max-new-tokens", "24", "--json",
                                  *args]) == 0
        return json.loads(out.getvalue())

    for extra in ([], ["--drafter", "tiny-code-dflash", "--block-size", "8"]):
        ref, got = gen(*extra), gen(*extra, "--mesh", "data=2,tensor=2")
        assert got["tokens"] == ref["tokens"]
        assert got.get("acceptance_lengths") == ref.get("acceptance_lengths")
    with tempfile.TemporaryDirectory() as tmp:
        convs = [[{"role": "user", "content": f"def f{i}(x):"}, {"role": "assistant", "content": "OLD"}]
                 for i in range(5)]
        src = Path(tmp) / "chats.jsonl"
        datasets.Dataset.from_dict({"messages": convs}).to_json(str(src), lines=True)
        plain = Path(tmp) / "plain.jsonl"  # unsharded: the library call without a mesh
        regenerate_dataset(load_target("tiny-code"), load_tokenizer("tiny-code"), str(src), plain,
                           max_new_tokens=10, batch_size=3, progress=False)
        outs = [plain.read_text()]
        for name, extra in (("picked", []), ("mesh", ["--mesh", "data=2,tensor=2"])):
            out, said = Path(tmp) / f"{name}.jsonl", io.StringIO()
            with contextlib.redirect_stdout(said):
                assert regenerate_main(["--data", str(src), "--out", str(out), "--max-new-tokens", "10",
                                        "--batch-size", "3", "--dtype", "float32", "--no-progress",
                                        *extra]) == 0
            outs.append(out.read_text())
            picked = "dflash-regenerate: mesh data=4,tensor=1 over 4 devices: per device: weights"
            assert (picked in said.getvalue()) == (name == "picked"), said.getvalue()
        assert outs[0] == outs[1] == outs[2] and "OLD" not in outs[0]
        bad = ["--data", str(src), "--out", str(Path(tmp) / "x.jsonl"), "--mesh", "data=3"]
        assert regenerate_main(bad) == 2  # 3 devices of 4: a clear error


def _shipped_request():
    prompts = [[int(t) for t in np.random.default_rng(i).integers(5, 4000, size=3 + 2 * i)] for i in range(9)]
    return prompts, [6, 24, 10, 20, 4, 16, 8, 12, 2]


def two_process_worker(out: str) -> None:
    """One of two processes (4 CPU devices each): tiny-code + tiny-code-dflash on a mesh that spans
    both (``data`` across the processes), 9 rows; then the tiny hybrid target (Gated DeltaNet heads
    over tensor=4, recurrent states rolled back per row) with prompt lookup; process 0 writes what
    it decoded."""
    import json
    from pathlib import Path

    from conftest import make_tiny_target

    from dflash.decoding.methods import NgramDraft
    from dflash.distributed import initialize
    from dflash.drafters import resolve_method
    from dflash.io import load_target

    initialize()
    mesh = sh.make_mesh(sh.MeshConfig(2, 1, 4))
    target = load_target("tiny-code", mesh=mesh)
    method, drafter = resolve_method("tiny-code-dflash", target, block_size=8, mesh=mesh)
    prompts, budgets = _shipped_request()
    got = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=budgets,
                               eos_ids=(), mesh=mesh)
    hybrid_dir = make_tiny_target(Path(f"{out}.hybrid{jax.process_index()}"), hybrid=True)  # one seed
    rep, rep_budgets = _repetitive(prompts)
    hybrid = speculative_generate(load_target(hybrid_dir, mesh=mesh), rep, max_new_tokens=rep_budgets,
                                  method=NgramDraft(block_size=4), eos_ids=(), mesh=mesh)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"tokens": got.tokens, "acc": got.acceptance_lengths, "batches": got.device_batches,
                       "hybrid": hybrid.tokens, "hybrid_acc": hybrid.acceptance_lengths,
                       "hybrid_dir": str(hybrid_dir)}, f)


def _repetitive(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Prompts that repeat themselves (prompt lookup finds drafts) and their budgets."""
    return [(p * 3)[:3 * len(p) - 1] for p in prompts], [12, 3, 9, 14, 5, 10, 2, 7, 11]


def test_decoding_on_a_mesh_across_two_processes_equals_one_unsharded_process(tmp_path):
    import json
    import os
    import sys

    from devices import ROOT, TESTS

    from dflash.cli.launch import run_local
    from dflash.drafters import resolve_method
    from dflash.io import load_target

    out = tmp_path / "decoded.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    code = f"import conftest, test_sharded_decoding as t; t.two_process_worker({str(out)!r})"
    results = run_local([sys.executable, "-c", code], 2, devices_per_process=4, timeout_s=300, env=env,
                        cwd=str(ROOT))
    for r in results:
        assert r.returncode == 0, f"process {r.process_id} exited {r.returncode}:\n{r.stderr[-3000:]}"
    got = json.loads(out.read_text())
    target = load_target("tiny-code")
    method, drafter = resolve_method("tiny-code-dflash", target, block_size=8)
    prompts, budgets = _shipped_request()
    ref = speculative_generate(target, prompts, method=method, drafter=drafter, max_new_tokens=budgets,
                               eos_ids=())
    assert got["tokens"] == ref.tokens and got["acc"] == ref.acceptance_lengths
    assert len(got["batches"]) > 1 and all(b % 2 == 0 for b in got["batches"])  # compacted across processes
    from dflash.decoding.methods import NgramDraft

    hybrid = load_target(got["hybrid_dir"])
    rep, rep_budgets = _repetitive(prompts)
    ref = speculative_generate(hybrid, rep, max_new_tokens=rep_budgets, method=NgramDraft(block_size=4),
                               eos_ids=())
    assert got["hybrid"] == ref.tokens and got["hybrid_acc"] == ref.acceptance_lengths
    assert max(a for row in ref.acceptance_lengths for a in row) > 1  # drafts were accepted
