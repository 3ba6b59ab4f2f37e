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
import sys

from dflash.distributed import ProcessResult, free_port, local_env, run_local  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-processes", type=int, required=True, help="processes to start on this machine")
    p.add_argument("--devices-per-process", type=int, default=0,
                   help="simulated CPU devices per process (XLA_FLAGS); 0 = leave as is")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="stop every process after this many s")
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
