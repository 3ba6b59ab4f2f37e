"""Under CI=true an unexpected skip (here a module-level ``importorskip``) fails the run, with or
without xdist; an ``accelerator`` test skipped on a CPU does not, and outside CI nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FILES = {
    "conftest.py": "import skip_policy\n\n\ndef pytest_configure(config):\n"
                   "    config.addinivalue_line('markers', 'accelerator: needs a TPU or GPU')\n"
                   "    skip_policy.register(config)\n",
    "test_area.py": "import pytest\n\npytest.importorskip('dflash_no_such_module')\n\n\ndef test_hidden():\n"
                    "    pass\n",
    "test_cpu.py": "import pytest\n\n\n@pytest.mark.accelerator\ndef test_kernel():\n"
                   "    pytest.skip('no TPU or GPU')\n\n\ndef test_plain():\n    pass\n",
}


def _pytest(where: Path, ci: bool, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env.update(PYTHONPATH=str(TESTS), **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=where,
                          env=env, capture_output=True, text=True, timeout=120)


def test_an_unexpected_skip_fails_a_ci_run(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    for args in (("-n", "0"), ("-n", "2")):
        run = _pytest(tmp_path, True, *args)
        assert run.returncode == 1, run.stdout
        assert "unexpected skips (CI=true)" in run.stdout and "test_area.py: could not import" in run.stdout
        assert "test_kernel" not in run.stdout.split("unexpected skips")[1]  # marked accelerator: expected
    assert _pytest(tmp_path, False, "-n", "0").returncode == 0  # outside CI a skip is a skip
    assert _pytest(tmp_path, True, "-n", "0", "test_cpu.py").returncode == 0  # only expected skips
