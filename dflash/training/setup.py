"""What a run starts from: the mesh, the drafter (fresh, warm-started or ``init_from``) and its
optimizer state, all created in their shards (``dflash.sharding``), and the drafter's config.

``build_drafter_config`` is also what the exporter uses to know a run's drafter architecture
without loading any weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dflash import sharding
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
                         target: Transformer, mesh: Mesh | None = None) -> DFlashDrafter | OrthrusDrafter:
    """The drafter a run starts from: ``drafter.init_from``, else a fresh one (Orthrus: warm start).

    An Orthrus drafter starts as copies of the target's AR attentions; it holds only those
    (the target itself is never copied). ``init_from`` must agree with ``dcfg``
    (``check_init_from``). With a ``mesh`` every parameter is created or read in its shards.
    """
    place = dict(mesh=mesh, replicate_indivisible=cfg.mesh.replicate_indivisible)
    if cfg.method == "orthrus":
        if cfg.drafter.init_from:
            drafter = load_orthrus(cfg.drafter.init_from, target, dtype=jnp.float32, **place)
        else:
            drafter = OrthrusDrafter.from_target(target, dcfg)  # copies keep the target's (same-rule) shards
    elif cfg.drafter.init_from:
        drafter = load_drafter(cfg.drafter.init_from, target.cfg, **place)
    elif mesh is not None:
        drafter = sharding.init_sharded(lambda: DFlashDrafter(dcfg, rngs=nnx.Rngs(cfg.train.seed)), mesh,
                                       replicate_indivisible=cfg.mesh.replicate_indivisible)
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


def build_mesh(cfg: ExperimentConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """The run's ``(data, fsdp, tensor)`` mesh over ``devices`` (all by default); the batch must divide."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    ways = sharding.batch_shards(mesh)
    if cfg.train.batch_size % ways:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {ways} batch "
                            f"shards of the mesh (mesh.data x mesh.fsdp = {dict(mesh.shape)})")
    return mesh


def train_state(drafter: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                replicate_indivisible: bool = False) -> tuple[Any, Any, Any]:
    """``(graphdef, state, shardings)`` of (drafter, optimizer), the optimizer state made under
    ``jit`` in the shards of its parameters (ZeRO-3 over fsdp)."""
    dgraph, dstate = nnx.split(drafter)

    def with_optimizer(dstate: Any) -> tuple[nnx.Module, nnx.Optimizer]:
        d = nnx.merge(dgraph, dstate)
        return d, nnx.Optimizer(d, tx, wrt=nnx.Param)

    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: with_optimizer(dstate)))
    shardings = sharding.tree_shardings(shapes, mesh, replicate_indivisible=replicate_indivisible)
    state = jax.jit(lambda s: nnx.state(with_optimizer(s)), out_shardings=shardings)(dstate)
    return graphdef, state, shardings
