"""``dflash-launch``: run a dflash command as N local processes of one ``jax.distributed`` job.

For trying multi-host on one machine (and for the multi-process tests): it picks a free port on
127.0.0.1, starts N copies of the command with ``DFLASH_COORDINATOR`` / ``DFLASH_NUM_PROCESSES``
/ ``DFLASH_PROCESS_ID`` set (and, on CPU, ``--devices-per-process`` simulated devices each), and
when one of them fails it stops the others instead of leaving them waiting in a collective.
Not a cluster manager: on real hosts use the launch guides in ``docs/multihost.md``.

    dflash-launch --local-processes 2 --devices-per-process 4 -- dflash-train --config configs/tiny_code.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from dflash.checks import COUNT, POSITIVE, flag
from dflash.cli.parser import make_parser
from dflash.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


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


def main(argv: list[str] | None = None) -> int:
    p = make_parser("dflash-launch", __doc__)
    p.add_argument("--local-processes", type=flag(COUNT), required=True,
                   help="processes to start on this machine")
    p.add_argument("--devices-per-process", type=flag(COUNT.with_special(0, "leave as is")), default=0,
                   help="simulated CPU devices per process (XLA_FLAGS); 0 = leave as is")
    p.add_argument("--timeout", type=flag(POSITIVE), default=24 * 3600.0,
                   help="stop every process after this many s")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. dflash-train ...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.local_processes < 1:
        p.error("give --local-processes N >= 1 and a command after --")
    results = run_local(command, args.local_processes, devices_per_process=args.devices_per_process,
                        timeout_s=args.timeout, echo=True)
    for r in results[1:]:  # process 0 printed live; the others' output follows, labelled
        for line in (r.stdout + r.stderr).splitlines():
            print(f"[process {r.process_id}] {line}", file=sys.stderr)
    bad = [r for r in results if r.returncode != 0]
    for r in bad:
        print(f"dflash-launch: process {r.process_id} exited with {r.returncode}", file=sys.stderr)
    return bad[0].returncode if bad and bad[0].returncode > 0 else (1 if bad else 0)


if __name__ == "__main__":
    raise SystemExit(main())
