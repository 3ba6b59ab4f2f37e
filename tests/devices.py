"""Runs a test body in a fresh process that sees ``n`` simulated CPU devices.

XLA fixes the device count when the backend starts, so a test that needs 8 devices cannot
run in the pytest process (1 device). ``@on_cpu_devices(8)`` re-imports the test's module
in a subprocess (with ``conftest``'s settings) and runs the body there; the subprocess's
failure output becomes the test's. Bodies take no fixtures (use ``tempfile``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
_INSIDE = "DFLASH_TEST_DEVICES"


def on_cpu_devices(n: int = 8, timeout: int = 600) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def decorate(body: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(body)
        def test() -> None:
            if os.environ.get(_INSIDE) == str(n):
                return body()
            flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", _INSIDE: str(n),
                   "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
            code = (f"import conftest, jax; assert jax.device_count() == {n}, jax.devices()\n"
                    f"from {body.__module__} import {body.__name__} as test; test()")
            proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout)
            assert proc.returncode == 0, f"subprocess with {n} devices failed:\n{proc.stdout[-3000:]}" \
                                         f"\n{proc.stderr[-6000:]}"

        return test

    return decorate
