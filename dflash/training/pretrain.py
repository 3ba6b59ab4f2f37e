"""Pretraining the shipped tiny code target on the stdlib corpus (causal LM, Optax AdamW): the
Qwen3-architecture tiny-code, or a Gemma-4-architecture one of the same sizes (issue 34's comparison)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from dflash.checks import COUNT, COUNT_OR_ZERO, INTEGER, NON_NEGATIVE, POSITIVE, check
from dflash.config import HF_DEFAULTS, ModelConfig, RopeConfig
from dflash.errors import ConfigError
from dflash.io.loading import save_target
from dflash.models.transformer import Transformer, build
from dflash.training import tiny_corpus as corpus
from dflash.training.checkpoints import Checkpoints
from dflash.training.recovery import restore_latest

# Each field's range (dflash.checks): the config and dflash-pretrain-target's flags check the same.
RANGES = {name: COUNT for name in (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "seq_len", "batch_size", "steps", "eval_every", "eval_windows", "sliding_window")} | {
    "lr": POSITIVE, "warmup": COUNT_OR_ZERO, "weight_decay": NON_NEGATIVE, "seed": INTEGER,
    "minutes": NON_NEGATIVE, "num_kv_shared_layers": COUNT_OR_ZERO}
# The text fields' choices (the first is the default).
CHOICES = {"architecture": ("qwen3", "gemma4")}
GEMMA4_SOFTCAP = 30.0  # final_logit_softcapping of the published Gemma 4 models


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The tiny target's shape and its pretraining run; every field in its range (``RANGES``)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 200
    eval_windows: int = 64
    minutes: float = 0.0  # > 0: stop (and save) when this wall-clock budget is spent
    architecture: str = "qwen3"  # gemma4: the fields below shape its attention
    sliding_window: int = 128  # gemma4: the sliding layers' window
    num_kv_shared_layers: int = 0  # gemma4: the last layers reuse earlier layers' KV (0: as 31B and 26B-A4B)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name in CHOICES:
                if getattr(self, field.name) not in CHOICES[field.name]:
                    raise ConfigError(f"{field.name} must be one of {', '.join(CHOICES[field.name])}, "
                                      f"got {getattr(self, field.name)!r}")
            else:
                check(field.name, getattr(self, field.name), RANGES[field.name])
        if self.architecture == "gemma4" and self.num_kv_shared_layers > self.num_layers - 2:
            raise ConfigError(f"num_kv_shared_layers must be <= num_layers - 2 = {self.num_layers - 2} (each "
                              f"shared layer reuses an earlier sliding or full layer), got "
                              f"{self.num_kv_shared_layers}")

    def model_config(self, eos_id: int) -> ModelConfig:
        if self.architecture == "gemma4":
            return ModelConfig.from_hf(self.gemma4_hf_config(eos_id))
        return ModelConfig(
            model_type="qwen3", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=1e-6, rope=RopeConfig(theta=10000.0), max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=(eos_id,),
        )

    def gemma4_hf_config(self, eos_id: int) -> dict:
        """The ``gemma4_text`` config.json of the Gemma-4-architecture target, read as a real
        checkpoint's is: sliding and full layers alternating (the last full) with the published
        per-type RoPE, one head shape throughout, the last ``num_kv_shared_layers`` sharing KV,
        soft-capped logits, tied embeddings, no per-layer inputs or experts."""
        n = self.num_layers
        return {
            "model_type": "gemma4_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": n,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "global_head_dim": self.head_dim, "attention_k_eq_v": False,
            "layer_types": ["full_attention" if (n - 1 - i) % 2 == 0 else "sliding_attention"
                            for i in range(n)],
            "sliding_window": self.sliding_window, "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": False, "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": self.vocab_size, "enable_moe_block": False,
            "final_logit_softcapping": GEMMA4_SOFTCAP, "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "rope_parameters": HF_DEFAULTS["gemma4"]["rope_parameters"],
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
        }


def encode_stream(tok, texts: list[str], eos_id: int) -> np.ndarray:
    """All documents joined into one int32 stream, each followed by end-of-text."""
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


def lm_loss(model: Transformer, tokens_BT: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    logits = model(tokens_BT[:, :-1], positions[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean()


STATE_DIR = "pretrain_checkpoints"  # under the output directory: what a stopped run resumes from
RESUME_FREE = ("minutes", "eval_every")  # a resumed run may change these: the training is the same


def pretrain(cfg: PretrainConfig, out_dir: Path) -> dict:
    """Trains tokenizer + model, saves an HF directory at ``out_dir`` after every eval, with an Orbax
    checkpoint of the training state (model, optimizer, batch sampler) beside it: run again with the
    same config, a stopped or killed run continues from the last eval step and ends with the bits of
    an uninterrupted one."""
    out_dir = Path(out_dir)
    train_files = corpus.stdlib_files("train")
    held_files = corpus.stdlib_files("heldout")
    tok = corpus.train_tokenizer([t for _, t in train_files], cfg.vocab_size)
    eos_id = tok.token_to_id(corpus.EOT)
    train_ids = encode_stream(tok, [t for _, t in train_files], eos_id)
    held_ids = encode_stream(tok, [t for _, t in held_files], eos_id)
    print(f"corpus: {len(train_files)} train files ({train_ids.size} tokens), "
          f"{len(held_files)} held-out files ({held_ids.size} tokens)")

    model_cfg = cfg.model_config(eos_id)
    model = build(model_cfg, seed=cfg.seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.95, weight_decay=cfg.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    rng = np.random.default_rng(cfg.seed)
    ckpts = Checkpoints(out_dir / STATE_DIR, keep_last=2, owner=True)
    history: list[dict] = []
    first = 1
    if ckpts.steps():
        _check_resumable(cfg, ckpts.latest_meta().get("config", {}), out_dir)
        state, meta, done = restore_latest(ckpts, state)
        rng.bit_generator.state = meta["rng"]
        history, first = list(meta["history"]), done + 1
        print(f"resuming from step {done} of {cfg.steps} ({out_dir / STATE_DIR})")

    # Donate the (model, optimizer) state: it is overwritten every step.
    @jax.jit(donate_argnums=0)
    def train_step(state, tokens_BT):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lm_loss)(model, tokens_BT)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    @jax.jit
    def eval_loss(state, tokens_BT):
        model, _ = nnx.merge(graphdef, state)
        return lm_loss(model, tokens_BT)

    window = cfg.seq_len + 1
    held_starts = np.linspace(0, held_ids.size - window - 1, cfg.eval_windows).astype(np.int64)
    held_batch = np.stack([held_ids[s:s + window] for s in held_starts])

    def evaluate(state) -> float:
        losses = [float(eval_loss(state, held_batch[i:i + cfg.batch_size]))
                  for i in range(0, len(held_batch), cfg.batch_size)]
        return float(np.mean(losses))

    def save(state, step: int, held_loss: float) -> None:
        model, _ = nnx.merge(graphdef, state)
        save_target(model, out_dir, dtype=jnp.bfloat16)  # bf16 keeps the shipped copy small
        corpus.save_tokenizer(tok, out_dir, model_cfg.max_position_embeddings)
        with open(out_dir / "generation_config.json", "w") as f:
            json.dump({"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}, f)
        with open(out_dir / "training_info.json", "w") as f:
            json.dump({"step": step, "heldout_loss": held_loss, "heldout_ppl": math.exp(held_loss),
                       "train_tokens_seen": step * cfg.batch_size * cfg.seq_len,
                       "config": dataclasses.asdict(cfg)}, f, indent=2)
        ckpts.save(step, state, {"step": step, "rng": rng.bit_generator.state, "history": history,
                                 "config": dataclasses.asdict(cfg)})

    start = time.time()
    held = history[-1]["heldout_loss"] if history else float("nan")
    bar = tqdm(range(first, cfg.steps + 1), desc="pretrain", dynamic_ncols=True, initial=first - 1,
               total=cfg.steps)
    for step in bar:
        starts = rng.integers(0, train_ids.size - window, cfg.batch_size)
        batch = np.stack([train_ids[s:s + window] for s in starts])
        state, loss = train_step(state, batch)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", held=f"{held:.3f}")
        out_of_time = cfg.minutes > 0 and time.time() - start > cfg.minutes * 60
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            held = evaluate(state)
            history.append({"step": step, "train_loss": float(loss), "heldout_loss": held,
                            "elapsed_s": time.time() - start})
            tqdm.write(json.dumps(history[-1]))
            save(state, step, held)
        if out_of_time:
            break
    return {"history": history, "heldout_loss": held}


def _check_resumable(cfg: PretrainConfig, saved: dict, out_dir: Path) -> None:
    """A stopped run continues only under the config it started with (its schedule and batches
    depend on every field but the time budget)."""
    now = dataclasses.asdict(cfg)
    differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
              if k not in RESUME_FREE and saved.get(k) != v]
    if differ:
        raise ConfigError(f"{out_dir} holds a pretraining with another config ({'; '.join(differ)}): "
                          f"rerun with its settings to continue it, or give another --out")
