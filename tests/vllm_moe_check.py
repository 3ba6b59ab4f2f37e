"""By hand, not collected (docs/serving.md): vLLM's CPU build runs a tiny Qwen3-MoE target with a
DFlash drafter trained on it and exported by us: ``python tests/vllm_moe_check.py [WORKDIR]``."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_run_config  # noqa: E402

from dflash.config import LayerSpec, ModelConfig  # noqa: E402
from dflash.export.vllm_check import Case, check_with_vllm, format_table  # noqa: E402
from dflash.io import save_target  # noqa: E402
from dflash.io.loading import SHIPPED  # noqa: E402
from dflash.models import build  # noqa: E402
from dflash.training.trainer import run_training  # noqa: E402

work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vllm_moe")
work.mkdir(exist_ok=True)
target_dir = work / "target"
cfg = ModelConfig(model_type="qwen3_moe", vocab_size=4096, hidden_size=128, intermediate_size=256,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                  eos_token_id=(0,))  # head_dim 64: vLLM's CPU attention refuses 8
experts = LayerSpec(mixer_options={"qk_norm": True}, mlp="moe",
                    mlp_options={"experts": 8, "top_k": 2, "norm_topk_prob": True, "intermediate_size": 64})
cfg = dataclasses.replace(cfg, layers=tuple(experts if i % 2 == 0 else s for i, s in enumerate(cfg.layers)))
save_target(build(cfg, seed=0), target_dir)
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(SHIPPED["tiny-code"] / name, target_dir / name)
run = tiny_run_config(target_dir, work / "run", "train.steps=20", "eval.num_prompts=1", "eval.heldout_rows=2",
                      "drafter.num_layers=1")
result = run_training(run, progress=False)
prompts = [[5, 9, 14, 3, 22, 17, 8], [7, 7, 7, 7, 7, 7], [100, 200, 300, 400, 500, 600, 700, 800]]
report = check_with_vllm(str(target_dir), [Case("tiny-moe 1-layer", Path(result["export_dir"]), 4)], prompts,
                         32, workdir=work / "vllm")
print(format_table(report["rows"]))
print(json.dumps(report["timing"]))
(work / "report.json").write_text(json.dumps(report, default=str))
