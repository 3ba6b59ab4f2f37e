"""The drafter kinds: one registry entry per kind (DFlash, Orthrus, ...) owns everything about it.

A ``DrafterKind`` is the single place that knows a kind of drafter: the ``drafter:`` config keys
it reads and its defaults (block size, loss weights), how its drafter is built fresh, loaded from
an export (``init_from``, the engine) or made abstract (plans, ``dflash-export``), its training
loss, the engine's draft method for it (and any extra methods a run's evaluation decodes with),
its export format, and its FLOPs. Nothing outside the registry and the kinds dispatches on a
method name or a drafter's type: the trainer, the engine's front door (``resolve_method``), the
exporter, the plans and the benchmarks ask the kind (``drafter_kind(name)``, ``kind_of(drafter)``,
``find_export(spec)``).

Adding a kind: subclass ``DrafterKind``, implement its abstract members, ``register`` an instance
(docs/architecture.md, "How to add a drafter kind").
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dflash.config import ModelConfig
from dflash.decoding.dynamic_tree import DynamicTreeDraft
from dflash.decoding.method import DraftMethod, StepwiseDraft
from dflash.decoding.methods import NgramDraft, NoDraft
from dflash.decoding.tree import BeamTreeDraft
from dflash.errors import CheckpointError, ConfigError
from dflash.io.loading import read_config_json, resolve
from dflash.models.transformer import Transformer
from dflash.sharding import register_rules

COMMON_KEYS = frozenset({"block_size", "mask_token_id", "init_from"})
"""``drafter:`` keys every kind reads; a kind lists the others it reads in ``section_keys``."""


class DrafterKind(abc.ABC):
    """One kind of drafter. Subclasses set the class attributes and implement the abstract members."""

    name: ClassVar[str]  # the config's ``method:``
    label: ClassVar[str]  # how reports name it ("DFlash")
    module: ClassVar[type]  # its nnx module (what ``kind_of`` recognises)
    architectures: ClassVar[tuple[str, ...]]  # ``config.json`` architectures of its exports
    default_block_size: ClassVar[int]
    default_loss_weights: ClassVar[tuple[float, float]]  # (ce, kl) when the config leaves them unset
    section_keys: ClassVar[frozenset[str]] = frozenset()
    sharding: ClassVar[tuple[tuple[str, tuple[str | None, ...]], ...]] = ()
    """Rule-table rows of the drafter's own parameters (``dflash.sharding.RULES``)."""
    compared_on_init_from: ClassVar[tuple[str, ...]] = ("block_size", "mask_token_id")
    vllm_method: ClassVar[str | None] = None
    """vLLM's ``speculative_config`` method for this kind's export, which ``--check-with vllm`` runs
    (None: not that export; an MTP head reaches vLLM only inside its target, ``--form full``)."""

    # ------------------------------------------------------------------ config and build
    def check_section(self, section: Any) -> None:
        """A ``drafter:`` key this kind does not read, set away from its default, is an error."""
        for f in dataclasses.fields(section):
            if f.name not in COMMON_KEYS | self.section_keys and getattr(section, f.name) != f.default:
                raise ConfigError(f"drafter.{f.name} is not an option of method {self.name!r} (its keys: "
                                  f"{', '.join(sorted(COMMON_KEYS | self.section_keys))})")

    @abc.abstractmethod
    def config(self, section: Any, target: ModelConfig, *, mask_token_id: int, block_size: int) -> Any:
        """The drafter's architecture for ``target`` from the ``drafter:`` section."""

    @abc.abstractmethod
    def build(self, dcfg: Any, target: Transformer, *, seed: int, mesh: Mesh | None = None,
              replicate_indivisible: bool = False) -> nnx.Module:
        """A fresh drafter (on ``mesh``: every parameter born in its shards)."""

    @abc.abstractmethod
    def construct(self, dcfg: Any, *, dtype: Any = jnp.float32, seed: int = 0) -> nnx.Module:
        """A randomly initialised drafter of ``dcfg`` (under ``nnx.eval_shape``: its structure)."""

    def abstract(self, dcfg: Any, dtype: Any = jnp.float32) -> nnx.Module:
        """The drafter's structure with ``ShapeDtypeStruct`` leaves (nothing allocated)."""
        return nnx.eval_shape(lambda: self.construct(dcfg, dtype=dtype))

    def param_dtype(self, target_dtype: Any) -> Any:
        """The dtype a run holds the drafter's parameters in (its master weights)."""
        return jnp.float32

    def fit_data(self, drafter: nnx.Module, rows: list[dict[str, Any]]) -> None:
        """Fits what a fresh drafter takes from the run's training rows (``PackedRows.arrays()`` of
        this process's lanes) before training; nothing by default (EAGLE-3: its draft vocabulary)."""
        return None

    # ------------------------------------------------------------------ exports
    @abc.abstractmethod
    def claims(self, hf: dict[str, Any]) -> bool:
        """Whether an export's ``config.json`` is of this kind."""

    @abc.abstractmethod
    def read_config(self, directory: Path) -> Any:
        """The drafter config of an export, without its weights."""

    # Its export reader, given the target's config (``hf.load_*``, as a staticmethod): what ``load`` calls.
    loader: ClassVar[Callable[..., nnx.Module]]

    def load(self, directory: Path, target: Transformer | None = None, *,
             target_cfg: ModelConfig | None = None,
             dtype: Any = jnp.float32, attention_impl: str = "auto", mesh: Mesh | None = None,
             replicate_indivisible: bool = False) -> nnx.Module:
        """An export loaded (into its shards on ``mesh``), checked against the target (``target`` or
        ``target_cfg``) by the kind's ``loader``; a kind that reads more of the target overrides this."""
        return self.loader(directory, target.cfg if target is not None else target_cfg, dtype=dtype,
                           attention_impl=attention_impl, mesh=mesh,
                           replicate_indivisible=replicate_indivisible)

    @abc.abstractmethod
    def save(self, drafter: nnx.Module, target: Transformer | None, target_cfg: ModelConfig, out: Path, *,
             target_name: str, dtype: Any = None, form: str = "delta", **prepared: Any) -> Path:
        """The export of ``drafter`` in its serving layout under ``out``."""

    def export_note(self, target_dir: Path, out: Path, form: str) -> str | None:
        """What the export of ``form`` in ``out`` is and what serves it, where that needs saying
        (``dflash-export`` prints it)."""
        return None

    needs_target_weights: ClassVar[bool] = False
    """Whether ``save`` reads the target's weights (then ``prepare_export`` runs on every process)."""

    def prepare_export(self, target: Transformer) -> dict[str, Any]:
        """What ``save`` needs from a target that may be sharded over processes (a collective: every
        process calls it, process 0 then saves)."""
        return {}

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def loss(self, drafter: nnx.Module, target: Transformer, batch: dict[str, jax.Array], key: jax.Array,
             **step_kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Loss and metrics of one packed batch (``dflash.training.step`` jits it)."""

    def needs_target_logits(self, step_kw: dict[str, Any]) -> bool:
        """Whether a train step needs the target's distribution (KL or target labels)."""
        return step_kw["kl_weight"] > 0 or bool(step_kw["target_labels"])

    @abc.abstractmethod
    def flops(self, target: ModelConfig, dcfg: Any, *, batch: int, seq: int, anchors: int, block: int,
              target_logits: bool, remat: bool) -> dict[str, float]:
        """FLOPs of one micro-batch train step by part: ``target``, ``drafter``, ``loss_head``, ``total``."""

    # ------------------------------------------------------------------ decoding
    @abc.abstractmethod
    def method(self, drafter: nnx.Module, *, stochastic: bool = False,
               block_size: int | None = None) -> DraftMethod:
        """The engine's draft method for a loaded drafter."""

    def eval_methods(self, drafter: nnx.Module) -> dict[str, DraftMethod]:
        """Extra methods a run's final evaluation decodes with (name -> method), beside the drafter's."""
        return {}

    def anchor_logits(self, drafter: nnx.Module, target: Transformer, seq_1S: jax.Array, anchors_A: jax.Array,
                      block: int) -> jax.Array:
        """Logits ``[A, block-1, V]`` of a block drafted at every anchor of one sequence at once, through
        the training path (``dflash.bench.anchors``: acceptance at every position)."""
        raise ConfigError(f"{self.label} drafters have no per-anchor drafting path (--anchor-profile)")

    def init_from_diffs(self, wanted: Any, loaded: Any) -> list[str]:
        return [f"drafter.{n}: config {getattr(wanted, n)!r}, drafter {getattr(loaded, n)!r}"
                for n in self.compared_on_init_from if getattr(wanted, n) != getattr(loaded, n)]


KINDS: dict[str, DrafterKind] = {}


def register(kind: DrafterKind) -> DrafterKind:
    KINDS[kind.name] = kind
    register_rules(kind.sharding)
    return kind


def drafter_kind(name: str) -> DrafterKind:
    if name not in KINDS:
        raise ConfigError(f"unknown method {name!r}; registered drafter kinds: {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(drafter: nnx.Module) -> DrafterKind:
    """The kind of a loaded drafter module."""
    for kind in KINDS.values():
        if type(drafter) is kind.module:
            return kind
    raise TypeError(f"no drafter kind for {type(drafter).__name__}")


# ----------------------------------------------------------------------------- finding exports
SHIPPED: dict[str, Path] = {}
"""Short names of drafters that ship inside the package (kinds add theirs)."""


def export_of_run(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A ``dflash-train`` run directory stands for its final export (``RUN/export``).

    Anything else is returned unchanged. A run without an export yet (still training, or
    stopped early) is an error that says how to export one of its checkpoints.
    """
    run = Path(name_or_path)
    if not ((run / "config.yaml").is_file() and not (run / "config.json").exists()):
        return name_or_path
    if (run / "export" / "config.json").is_file():
        return run / "export"
    raise CheckpointError(
        f"{run} is a dflash-train run directory without a final export ({run / 'export'} is written "
        f"when the run finishes); export one of its checkpoints with `dflash-export --run {run} "
        f"--step latest --out DIR` (or --step best) and pass that DIR as the drafter")


def export_dir(name_or_path: str | os.PathLike) -> Path:
    """The directory of a drafter named by a path, a run, a shipped name or a hub id."""
    name_or_path = export_of_run(name_or_path)
    if str(name_or_path) in SHIPPED:
        path = SHIPPED[str(name_or_path)]
        if not (path / "config.json").exists():
            raise CheckpointError(f"shipped drafter {name_or_path!r} is missing at {path}")
        return path
    return resolve(name_or_path)


def find_export(name_or_path: str | os.PathLike) -> tuple[DrafterKind, Path]:
    """``(kind, directory)`` of a drafter export; a clear error if it is none of the known kinds.
    ``KIND:PATH`` (e.g. ``mtp:DIR``, a target checkpoint's own MTP head) names the kind outright."""
    prefix, _, rest = str(name_or_path).partition(":")
    if rest and prefix in KINDS:
        return KINDS[prefix], export_dir(rest)
    directory = export_dir(name_or_path)
    hf = read_config_json(directory)
    for kind in KINDS.values():
        if kind.claims(hf):
            return kind, directory
    known = ", ".join(a for kind in KINDS.values() for a in kind.architectures)
    raise CheckpointError(f"{directory} is not a drafter of a known kind: config.json architectures="
                          f"{hf.get('architectures')!r} (expected one of: {known})")


def load_drafter(name_or_path: str | os.PathLike, target: Transformer | ModelConfig | None = None, *,
                 target_cfg: ModelConfig | None = None, dtype: Any = jnp.float32,
                 attention_impl: str = "auto",
                 mesh: Mesh | None = None, replicate_indivisible: bool = False) -> nnx.Module:
    """Any exported drafter, checked against ``target`` (a loaded model, or only its config) when given."""
    if isinstance(target, ModelConfig):
        target, target_cfg = None, target
    kind, directory = find_export(name_or_path)
    return kind.load(directory, target, target_cfg=target_cfg, dtype=dtype, attention_impl=attention_impl,
                     mesh=mesh, replicate_indivisible=replicate_indivisible)


def method_for(drafter: nnx.Module, *, stochastic: bool = False,
               block_size: int | None = None) -> DraftMethod:
    """The engine method that runs a loaded drafter module."""
    return kind_of(drafter).method(drafter, stochastic=stochastic, block_size=block_size)


def tree_method_for(drafter: nnx.Module, width: int, block_size: int | None = None,
                    lookup: bool = False) -> BeamTreeDraft:
    """The drafter's chain drafted as a beam tree of ``width`` (``lookup``: plus a prompt-lookup branch)."""
    return BeamTreeDraft.around(method_for(drafter, block_size=block_size), width, lookup)


def dynamic_tree_method_for(drafter: nnx.Module | None, depth: int = 7, top_k: int = 10,
                            total_tokens: int = 60) -> DynamicTreeDraft:
    """The drafter's stepwise chain (of block ``depth + 1``) drafted as an EAGLE-2 dynamic tree."""
    if drafter is None:
        raise ConfigError("dynamic tree needs an exported drafter that drafts one token per step "
                          "(EAGLE-3, MTP)")
    chain = method_for(drafter)
    if isinstance(chain, StepwiseDraft):  # only then ask for the block: a block drafter gets the clear error
        chain = method_for(drafter, block_size=depth + 1)
    return DynamicTreeDraft.around(chain, top_k, total_tokens, label=kind_of(drafter).label)


def resolve_method(spec: str | None, target: Transformer, *, block_size: int | None = None,
                   stochastic: bool = False, attention_impl: str | None = None,
                   mesh: Mesh | None = None) -> tuple[DraftMethod, nnx.Module | None]:
    """``None``/``"ar"`` -> AR, ``"ngram"`` -> prompt lookup, else an exported drafter of any kind.

    An exported drafter is given as a directory, a run, a shipped name or a hub id, and is checked
    against ``target``. Returns ``(method, drafter_module_or_None)`` for ``speculative_generate``.
    The drafter is built with ``attention_impl`` (default: the target's ``attention_impl``), so one
    setting covers a run, and read into its shards on ``mesh`` (the target is on it too).
    """
    impl = target.attention_impl if attention_impl is None else attention_impl
    if spec in (None, "", "ar", "none"):
        return NoDraft(), None
    if spec == "ngram":
        return NgramDraft(block_size=block_size or 16), None
    drafter = load_drafter(spec, target, dtype=target.dtype, attention_impl=impl, mesh=mesh)
    return method_for(drafter, stochastic=stochastic, block_size=block_size), drafter
