"""What a run starts from: the mesh, the drafter (fresh, warm-started or ``init_from``) and its
optimizer state, all created in their shards (``dflash.sharding``), and the drafter's config.

Everything kind-specific is asked of the run's drafter kind (``cfg.kind``, ``dflash.drafters``).
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
from dflash.config import ModelConfig
from dflash.drafters import find_export
from dflash.errors import TrainingError
from dflash.models.transformer import Transformer
from dflash.training.config import ExperimentConfig


def mask_token(cfg: ExperimentConfig, tokenizer: Any) -> int:
    """``drafter.mask_token_id``, or the tokenizer's mask token when it is unset."""
    if cfg.drafter.mask_token_id is not None:
        return cfg.drafter.mask_token_id
    if tokenizer.mask_token_id is None:
        raise TrainingError("the tokenizer has no mask token: set drafter.mask_token_id")
    return tokenizer.mask_token_id


def build_drafter_config(cfg: ExperimentConfig, target: ModelConfig, tokenizer: Any) -> Any:
    """The drafter architecture the config asks for, for ``target`` (its kind's ``config``)."""
    return cfg.kind.config(cfg.drafter, target, mask_token_id=mask_token(cfg, tokenizer),
                           block_size=cfg.block_size)


def build_method_drafter(cfg: ExperimentConfig, dcfg: Any, target: Transformer,
                         mesh: Mesh | None = None) -> Any:
    """The drafter a run starts from: ``drafter.init_from``, else a fresh one (its kind's ``build``:
    Orthrus warm-starts from the target's attentions). ``init_from`` must agree with ``dcfg``
    (``check_init_from``). With a ``mesh`` every parameter is created or read in its shards.
    """
    place = dict(mesh=mesh, replicate_indivisible=cfg.mesh.replicate_indivisible)
    if cfg.drafter.init_from:
        kind, directory = find_export(cfg.drafter.init_from)
        if kind is not cfg.kind:
            raise TrainingError(f"drafter.init_from={cfg.drafter.init_from!r} is a {kind.label} drafter, but "
                                f"method is {cfg.method!r}")
        drafter = kind.load(directory, target, dtype=jnp.float32, **place)
        check_init_from(cfg, dcfg, drafter.cfg)
    else:
        drafter = cfg.kind.build(dcfg, target, seed=cfg.train.seed, **place)
    drafter.remat = cfg.train.remat  # static: part of the graphdef the train step is traced with
    return drafter


def check_init_from(cfg: ExperimentConfig, wanted: Any, loaded: Any) -> None:
    """``drafter.init_from`` must agree with the config's drafter section, rather than silently
    replace it (a 1-layer config continuing a 2-layer drafter would train and export 2 layers)."""
    diffs = cfg.kind.init_from_diffs(wanted, loaded)
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
