"""Shared fixtures: tiny random ``transformers`` checkpoints built in-process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch (the reference side of parity tests) oversubscribes small CPUs next to XLA's own
# thread pool: one intra-op thread made the PyTorch reference loop 8x faster on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Most of the suite's time is XLA compiling small programs, not running them: LLVM's cheap
# codegen (no fast-math either way, so results are the same) cut a tree/speculative subset from
# 9.2 to 6.5 min on 2 cores. Benchmarks and the CLI keep XLA's defaults.
# XLA:CPU's classic elemental emitters instead of its MLIR fusion emitters: each fusion no
# longer builds an MLIR context and pipeline, 31% less CPU for a compile-bound train + decode
# script (27.7 -> 19.1 s). Same programs; transcendentals (exp, tanh, ...) differ by a few ULP.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# One persistent XLA compilation cache for the run, fresh each run (no entry outlives it): the
# xdist workers and every process a test starts (CLIs, multi-process runs, notebooks) compile
# the same tiny programs over and over; now each is compiled once. The first process that reads
# this file (xdist's controller) makes the directory; the rest inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="dflash-test-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402
import skip_policy  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    skip_policy.register(config)  # under CI=true, an unexpected skip fails the run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """A test (its fixtures' setup and teardown included) leaves the process's SIGINT handler as it
    found it: Ctrl-C handling (dflash-train's StopRequest) takes over only a default handler, and
    whether test_accidents' Ctrl-C test saw its Ctrl-Cs depended on what earlier tests in its worker
    had left (CI at 7412f98 and ac21f82; that test now sets the default handler itself). One left
    behind is put back, and said, naming the test."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    try:
        return (yield)
    finally:
        after = signal.getsignal(signal.SIGINT)
        if after is not before:
            signal.signal(signal.SIGINT, before)
            item.warn(pytest.PytestWarning(f"left SIGINT handled by {after!r}; put back {before!r}"))


# The longest tests (`pytest --durations`, CI at 2b87087: 675, 266, 185, 139, 132, 128, 121 s) start
# first, dealt in turn to the head of each worker's share of the collection (xdist's work stealing
# hands worker w the w-th contiguous share and steals from the end of a queue): the 11-minute vLLM
# test, collected last, used to start late while the other worker sat idle.
LONGEST_FIRST = (
    "test_vllm.py::test_vllm_runs_our_exports_token_for_token",
    "test_plan.py::test_real_qwen3_8b_preset_fits_v5p_8",
    "test_sharded_training.py::test_loss_gradients_and_train_steps_agree_on_every_mesh",
    "test_multiprocess.py::test_training_across_two_processes_equals_one_and_resumes_on_another_process_count",
    "test_sharded_decoding.py::test_greedy_decoding_on_every_mesh_equals_unsharded",
    "test_sharded_training.py::test_checkpoints_move_between_meshes_and_resume_exactly_on_one",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))  # (xdist's workers collect)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    name = lambda item: item.nodeid.rsplit("/", 1)[-1]  # noqa: E731
    long = sorted((i for i in items if name(i) in rank), key=lambda i: rank[name(i)])
    rest = [i for i in items if name(i) not in rank]
    ordered: list[pytest.Item] = []
    for w in range(workers):  # worker w's share: its long tests, then its part of the rest
        share = long[w::workers]
        size = len(items) * (w + 1) // workers - len(ordered) - len(share)
        ordered += share + rest[:max(size, 0)]
        rest = rest[max(size, 0):]
    items[:] = ordered + rest


FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}
# A tiny Qwen3-MoE: 6 experts, top 2, layer 1 dense (mlp_only_layers).
MOE = {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "mlp_only_layers": [1],
       "norm_topk_prob": True}
# A tiny gpt-oss: 5 experts of width 40, top 3, every other layer slid over a window of 5 positions
# (shorter than the prompts), YaRN with the published beta / truncate settings.
GPT_OSS = {"num_local_experts": 5, "num_experts_per_tok": 3, "intermediate_size": 40, "sliding_window": 5,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
           "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 32,
                               "rope_theta": 15000.0}}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def make_hf_model(family: str, *, seed: int = 0, **overrides):
    """A tiny random HF causal LM of ``family`` (fp32, eval mode)."""
    import torch
    import transformers

    cfg_name, model_name = FAMILIES[family]
    kwargs = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=101, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    # HF initialises norms to ones and biases to zero: randomise them so parity covers them.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        # Routers start near-uniform (tiny weights): spread their logits so each token's top-k
        # is decisive and float rounding between implementations cannot change the routing.
        # gpt-oss: its expert biases ([E, 2F], [E, D]) random too, its sinks of either sign, and
        # gate_up large enough that its clamps (gate <= 7, |up| <= 7) cut 10-30% of the values.
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.experts.gate_up_proj")):
                p.mul_(40.0)
            elif name.endswith("_proj_bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("self_attn.sinks"):
                p.copy_(torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: saves a tiny HF model and returns ``(hf_model, directory)``."""

    def _make(family: str, **overrides):
        model = make_hf_model(family, **overrides)
        directory = tmp_path / f"{family}-ckpt"
        model.save_pretrained(directory)
        return model, directory

    return _make


def make_tiny_target(directory, *, moe: bool = False, hybrid: bool = False):
    """Writes a small random Qwen3 target sharing the shipped tokenizer (so data and masks work);
    ``moe``: a Qwen3-MoE one (layers 0 and 2 mixtures of 4 experts, top 2); ``hybrid``: a Qwen3.5
    one (layers 0, 1, 3 Gated DeltaNet, 4 key / 8 value heads; layer 2 gated attention, partial RoPE)."""
    import dataclasses
    import shutil

    from dflash.config import LayerSpec, ModelConfig
    from dflash.io import save_target
    from dflash.io.loading import SHIPPED
    from dflash.models import build

    cfg = ModelConfig(model_type="qwen3_moe" if moe else "qwen3", vocab_size=4096, hidden_size=32,
                      intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                      tie_word_embeddings=True, eos_token_id=(0,))
    if moe:
        experts = LayerSpec(mixer_options={"qk_norm": True}, mlp="moe", mlp_options={
            "experts": 4, "top_k": 2, "norm_topk_prob": True, "intermediate_size": 16})
        cfg = dataclasses.replace(cfg, layers=tuple(experts if i % 2 == 0 else spec
                                                    for i, spec in enumerate(cfg.layers)))
    if hybrid:
        linear, full = "linear_attention", "full_attention"
        cfg = ModelConfig.from_hf({**cfg.to_hf(), "model_type": "qwen3_5_text", "partial_rotary_factor": 0.5,
                                   "layer_types": [linear, linear, full, linear], "linear_num_key_heads": 4,
                                   "linear_num_value_heads": 8, "linear_key_head_dim": 8,
                                   "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4})
    save_target(build(cfg, seed=0), directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED["tiny-code"] / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("target"))


def tiny_run_config(target, run_dir, *extra: str):
    """The tiny_code experiment shrunk to seconds (4 steps, checkpoints at 2 and 4)."""
    from pathlib import Path

    from dflash.configio import load_yaml
    from dflash.training.config import ExperimentConfig

    root = Path(__file__).resolve().parents[1]
    return load_yaml(ExperimentConfig, root / "configs/tiny_code.yaml", [
        f"target.name={target}", f"run_dir={run_dir}", "data.max_examples=40", "data.seq_len=64",
        "train.batch_size=4", "train.num_anchors=8", "train.steps=4", "train.save_every=2",
        "train.eval_every=2", "train.log_every=1", "train.keep_last=2", "drafter.block_size=4",
        "eval.num_prompts=2", "eval.max_new_tokens=8", "eval.heldout_rows=4", "regen.num_sequences=0",
        *extra])


@pytest.fixture(scope="session")
def run_config():
    """Factory: ``tiny_run_config``."""
    return tiny_run_config
