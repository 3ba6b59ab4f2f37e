"""What a run starts from: the drafter (fresh, warm-started or ``init_from``), its config, the devices.

``build_drafter_config`` is also what the exporter uses to know a run's drafter architecture
without loading any weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dflash.drafters.dflash import DFlashConfig, DFlashDrafter, build_drafter
from dflash.drafters.orthrus import OrthrusConfig, OrthrusDrafter
from dflash.errors import TrainingError
from dflash.export.dflash_hf import load_drafter
from dflash.export.orthrus_hf import load_orthrus
from dflash.models.transformer import Transformer
from dflash.training.config import ExperimentConfig


def build_drafter_config(cfg: ExperimentConfig, target: Transformer,
                         tokenizer: Any) -> DFlashConfig | OrthrusConfig:
    mask = cfg.drafter.mask_token_id
    if mask < 0:
        mask = tokenizer.mask_token_id
        if mask is None:
            raise TrainingError("the tokenizer has no mask token: set drafter.mask_token_id")
    if cfg.method == "orthrus":
        return OrthrusConfig.for_target(target.cfg, mask_token_id=mask, block_size=cfg.block_size)
    return DFlashConfig.for_target(
        target.cfg, mask_token_id=mask, num_layers=cfg.drafter.num_layers, block_size=cfg.block_size,
        target_layer_ids=cfg.drafter.target_layer_ids or None,
        num_target_features=cfg.drafter.num_target_features)


def build_method_drafter(cfg: ExperimentConfig, dcfg: DFlashConfig | OrthrusConfig,
                         target: Transformer) -> DFlashDrafter | OrthrusDrafter:
    """The drafter a run starts from: ``drafter.init_from``, else a fresh one (Orthrus: warm start).

    An Orthrus drafter starts as copies of the target's AR attentions; it holds only those
    (the target itself is never copied). ``init_from`` must agree with ``dcfg``
    (``check_init_from``).
    """
    if cfg.method == "orthrus":
        if cfg.drafter.init_from:
            drafter = load_orthrus(cfg.drafter.init_from, target, dtype=jnp.float32)
        else:
            drafter = OrthrusDrafter.from_target(target, dcfg)
    elif cfg.drafter.init_from:
        drafter = load_drafter(cfg.drafter.init_from, target.cfg)
    else:
        drafter = build_drafter(dcfg, seed=cfg.train.seed)
    if cfg.drafter.init_from:
        check_init_from(cfg, dcfg, drafter.cfg)
    drafter.remat = cfg.train.remat  # static: part of the graphdef the train step is traced with
    return drafter


def check_init_from(cfg: ExperimentConfig, wanted: DFlashConfig | OrthrusConfig,
                    loaded: DFlashConfig | OrthrusConfig) -> None:
    """``drafter.init_from`` must agree with the config's drafter section, rather than silently
    replace it (a 1-layer config continuing a 2-layer drafter would train and export 2 layers)."""
    names = ("block_size", "mask_token_id") if cfg.method == "orthrus" else (
        "num_layers", "block_size", "target_layer_ids", "mask_token_id")
    diffs = [f"drafter.{n}: config {getattr(wanted, n)!r}, drafter {getattr(loaded, n)!r}" for n in names
             if getattr(wanted, n) != getattr(loaded, n)]
    if diffs:
        raise TrainingError(f"drafter.init_from={cfg.drafter.init_from!r} does not match the config "
                            f"({'; '.join(diffs)}); set these keys to the drafter's values")


def data_devices(cfg: ExperimentConfig) -> list[jax.Device]:
    """The devices of the ``data`` axis (``train.num_devices``, 0 = all); the batch must divide."""
    devices = jax.devices()[: cfg.train.num_devices or None]
    if cfg.train.num_devices > len(devices):
        raise TrainingError(f"train.num_devices={cfg.train.num_devices}, but only {len(devices)} "
                            f"{jax.default_backend()} devices are present")
    if cfg.train.batch_size % len(devices):
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                            f"{len(devices)} devices of the data axis")
    return devices
