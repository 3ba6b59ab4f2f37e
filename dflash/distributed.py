"""Multi-process runs on ``jax.distributed``: start-up, who is primary, quiet logs, and N local
processes of one job (``run_local``: ``dflash-launch``, the multi-process tests and benchmarks).

One Python process per host (TPU pod slice, multi-node GPU cluster, or several local
processes for tests) joins JAX's multi-controller runtime here, before any JAX computation.
Auto-detected launches are the ones ``jax.distributed`` bootstraps itself (Cloud TPU VMs,
SLURM, Open MPI); anywhere else the coordinator is given explicitly (flags or environment).
Detection reads only the environment, so a single-process run never starts a coordinator.

The start-up consistency check, and ``initialize_from_args`` (start-up + check, for the CLIs),
live in :mod:`dflash.fingerprint`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from dflash.errors import DistributedError

__all__ = ["DistributedError", "Launch", "add_distributed_args", "detect_launch", "initialize",
           "host_local", "is_primary", "quiet_logging", "show_progress",
           "skip_absent_tpu", "sync_processes"]

ENV_COORDINATOR = "DFLASH_COORDINATOR"
ENV_NUM_PROCESSES = "DFLASH_NUM_PROCESSES"
ENV_PROCESS_ID = "DFLASH_PROCESS_ID"
ENV_MODE = "DFLASH_DISTRIBUTED"  # auto (default) | off (never initialize) | on (always, auto-detected)
ENV_VERBOSE = "DFLASH_VERBOSE"
MODES = ("auto", "off", "on")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # what a Cloud TPU VM's chips appear as


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started. ``how`` is ``single`` (no jax.distributed), ``explicit``
    (coordinator given), or the cluster jax auto-detects: ``slurm``, ``mpi``, ``cloud-tpu``."""

    how: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi(self) -> bool:
        return self.how != "single"


def _int(value: object, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _on_tpu_vm() -> bool:
    """Whether this host has TPU chips (their device files)."""
    return any(Path(f).exists() for f in _TPU_DEVICE_FILES)


def detect_launch(coordinator: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, environ: Mapping[str, str] | None = None, *,
                  on_tpu_vm: bool | None = None) -> Launch:
    """The launch this process is part of; arguments win over ``DFLASH_*`` variables, which win
    over auto-detection. Pure: reads ``environ`` (default ``os.environ``) and, unless
    ``on_tpu_vm`` is given, whether TPU chips' device files exist."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    n = _int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES), "--num-processes")
    pid = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID), "--process-id")
    given = {"--coordinator": coordinator, "--num-processes": n, "--process-id": pid}
    if any(v is not None for v in given.values()):
        if n == 1 and coordinator is None and pid in (None, 0):
            return Launch("single")
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise DistributedError(f"an explicit multi-process launch needs --coordinator HOST:PORT, "
                                   f"--num-processes N and --process-id I (or {ENV_COORDINATOR}, "
                                   f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: {', '.join(missing)}")
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):  # type: ignore[arg-type]
            raise DistributedError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if n < 1 or not 0 <= pid < n:  # type: ignore[operator]
            raise DistributedError(f"--process-id must be in [0, {n}) for --num-processes {n}, got {pid}")
        return Launch("explicit", coordinator, n, pid)
    mode = env.get(ENV_MODE, "auto").lower()
    if mode not in MODES:
        raise DistributedError(f"{ENV_MODE}={mode!r} is not one of {MODES}")
    if mode == "off":
        return Launch("single")
    if all(v in env for v in _SLURM_VARS) and (_int(env["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1:
        return Launch("slurm")
    ompi_size = _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1
    if "OMPI_MCA_orte_hnp_uri" in env and ompi_size > 1:
        return Launch("mpi")
    if on_tpu_vm is None:
        on_tpu_vm = _on_tpu_vm()
    if on_tpu_vm:
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
        if hosts is not None:  # GKE (JobSet) lists the slice's hosts; one name: a single-host slice
            if "," in hosts:
                return Launch("cloud-tpu")
        elif "TPU_SKIP_MDS_QUERY" not in env:  # a GCE TPU VM: jax asks its metadata server
            return Launch("cloud-tpu")
    return Launch("auto-forced") if mode == "on" else Launch("single")


def skip_absent_tpu(environ: Mapping[str, str] | None = None, *, on_tpu_vm: bool | None = None) -> bool:
    """On a host with neither TPU chips nor a GPU plugin, sets JAX's platforms to ``cpu`` (unless
    ``JAX_PLATFORMS`` is set). Why: with ``libtpu`` installed (the test extra, for TPU plans)
    JAX otherwise probes for a TPU at start-up and prints a page of libtpu errors before
    falling back to the CPU. Compiling for a virtual TPU slice (``dflash.plan``) does not need
    the TPU platform. Returns whether it did so."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    if on_tpu_vm is None:
        on_tpu_vm = _on_tpu_vm()
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    if on_tpu_vm or list(entry_points(group="jax_plugins")) or find_spec("jax_plugins") is not None:
        return False  # TPU chips, or a CUDA / ROCm plugin: leave the choice to JAX
    jax.config.update("jax_platforms", "cpu")
    return True


def is_initialized() -> bool:
    from jax._src import distributed as jdist  # the public API has no query; pinned jax version

    return jdist.global_state.client is not None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 120, verbose: bool | None = None) -> Launch:
    """Joins ``jax.distributed`` when this process is one of several; a no-op otherwise.

    Must run before any JAX computation (the backends are created on first use). Idempotent.
    On CPU, cross-process collectives go through gloo. Non-primary processes log warnings only
    unless ``verbose`` (or ``DFLASH_VERBOSE=1``).
    """
    launch = detect_launch(coordinator, num_processes, process_id)
    if launch.multi and not is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = dict(initialization_timeout=timeout_s)
        if launch.how == "explicit":
            kwargs.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                          process_id=launch.process_id)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as err:  # XlaRuntimeError / RuntimeError / ValueError by the failure
            where = f" at {launch.coordinator}" if launch.coordinator else ""
            raise DistributedError(
                f"jax.distributed.initialize ({launch.how} launch) failed{where}: {err}. Every process "
                "must be started with the same coordinator and process count, and process 0 (which "
                "hosts the coordinator) must be reachable from all of them") from err
    quiet_logging(verbose)
    return launch


def add_distributed_args(parser: argparse.ArgumentParser, verbose_flag: bool = True) -> None:
    """The multi-process flags every long-running CLI takes (see ``docs/multihost.md``).
    ``verbose_flag=False`` when the CLI has its own ``--verbose`` (it then also means full logs on
    every process)."""
    g = parser.add_argument_group("multi-process (jax.distributed; auto-detected on Cloud TPU VMs, SLURM)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator (or {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"processes in the job (or {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's index, 0..N-1 (or {ENV_PROCESS_ID})")
    if verbose_flag:
        g.add_argument("--verbose", action="store_true", default=None,
                       help=f"full logs on every process, not only process 0 (or {ENV_VERBOSE}=1)")


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0, the one that writes configs, logs, metrics and exports."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Barrier across the job's processes (no-op in a single process); ``name`` must match."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_local(tree: Any) -> Any:
    """``tree`` with every array that spans several processes replaced by a copy on this process's
    first device (replicated arrays: the local replica; sharded ones: gathered, which is a
    collective, so every process must call this at the same point)."""
    def local(a: Any) -> Any:
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return a
        if a.is_fully_replicated:
            return a.addressable_data(0)
        from jax.experimental import multihost_utils

        return jax.device_put(multihost_utils.process_allgather(a, tiled=True), jax.local_devices()[0])

    return jax.tree.map(local, tree)


def show_progress(requested: bool) -> bool:
    """Progress bars on process 0 only: N bars over the same global count say nothing more."""
    return requested and is_primary()


def quiet_logging(verbose: bool | None = None) -> None:
    """Non-primary processes log warnings and errors only, unless verbose."""
    if verbose is None:
        verbose = os.environ.get(ENV_VERBOSE, "").lower() in ("1", "true", "yes", "on")
    if verbose or not is_initialized() or is_primary():
        return
    for name in ("", "dflash", "absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")  # library warnings repeat process 0's


# ----------------------------------------------------------------------------- local processes
@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int  # -9 when stopped by the launcher (a peer failed or the time ran out)
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local process ``process_id``: coordinator variables and CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = env.get("XLA_FLAGS", "")
    if devices_per_process and "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    if devices_per_process:  # simulated devices are CPU ones: keep an installed libtpu from probing for a TPU
        env.setdefault("JAX_PLATFORMS", "cpu")
    env.update({"XLA_FLAGS": flags, ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(process_id)})
    return env


def run_local(command: Sequence[str], num_processes: int, *, devices_per_process: int = 0,
              timeout_s: float = 600.0, env: Mapping[str, str] | None = None, grace_s: float = 15.0,
              cwd: str | None = None, echo: bool = False) -> list[ProcessResult]:
    """Runs ``command`` as ``num_processes`` local processes; returns each one's exit code and output.

    Every process is stopped by ``timeout_s``; once one fails, the rest get ``grace_s`` to fail
    too (they see the same error at the same check) before they are stopped.
    """
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="dflash-launch-"))
    procs, files = [], []
    try:
        for pid in range(num_processes):
            out, err = open(logs / f"{pid}.out", "w+"), open(logs / f"{pid}.err", "w+")
            files.append((out, err))
            penv = local_env(pid, num_processes, port, devices_per_process, env)
            procs.append(subprocess.Popen(list(command), env=penv,
                                          stdout=None if echo and pid == 0 else out,
                                          stderr=None if echo and pid == 0 else err, cwd=cwd))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_s)
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        results = []
        for pid, (p, (out, err)) in enumerate(zip(procs, files, strict=True)):
            out.seek(0)
            err.seek(0)
            results.append(ProcessResult(pid, p.returncode, out.read(), err.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for out, err in files:
            out.close()
            err.close()
        shutil.rmtree(logs, ignore_errors=True)
