"""The notebooks' install cell, run as Colab runs it, against this checkout: pip builds the
package from a clean copy of the files git would check out and installs it into a fresh virtual
environment; the installed package (not the source tree) then has every file of ``dflash/``
(shipped models, configs), loadable entry points, and a console script that decodes.

Cheap by design: no download (the fresh environment sees this one's site-packages through a
``.pth`` line, so pip finds the build backend and skips the dependencies, ``--no-deps``), one
build, one short command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from dflash.viz.notebook import INSTALL_CELL, REPOSITORY

ROOT = Path(__file__).resolve().parents[1]


def _clone(dest: Path) -> list[str]:
    """Copies what a clone of this working tree would hold (tracked and new unignored files)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [f for f in listed.split("\0") if f and (ROOT / f).is_file()]  # deleted, not committed: gone
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return files


def _fresh_venv(dest: Path) -> Path:
    """A venv without pip whose sys.path ends with this environment's site-packages (dependencies,
    pip, setuptools), unprocessed: an editable dflash installed there stays invisible."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "dflash_test_parent.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_the_install_cell_installs_a_package_that_works_from_anywhere(tmp_path):
    src = tmp_path / "src"
    files = _clone(src)
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0",  # "0": isolation off
               PIP_DISABLE_PIP_VERSION_CHECK="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    work = tmp_path / "elsewhere"  # not the source tree: nothing imports from a checkout
    work.mkdir()
    hub = f'source = "git+https://github.com/{REPOSITORY}"'
    assert INSTALL_CELL.count(hub) == 1
    cell = INSTALL_CELL.replace(hub, f'source = "{src.as_uri()}"')
    run = subprocess.run([str(python), "-c", cell], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    probe = """if True:
        import importlib.metadata as md, json, dflash
        dist = md.distribution("dflash")
        scripts = sorted(ep.name for ep in dist.entry_points if ep.group == "console_scripts")
        assert all(callable(ep.load()) for ep in dist.entry_points if ep.group == "console_scripts")
        print(json.dumps({"module": dflash.__file__, "files": [str(f) for f in dist.files],
                          "scripts": scripts}))"""
    run = subprocess.run([str(python), "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    installed = json.loads(run.stdout)
    assert Path(installed["module"]).is_relative_to(tmp_path / "venv")
    shipped = {f for f in files if f.startswith("dflash/")}  # package data: models, configs, requirements
    assert sorted(shipped - set(installed["files"])) == []
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert installed["scripts"] == sorted(pyproject["project"]["scripts"])

    run = subprocess.run([str(tmp_path / "venv" / "bin" / "dflash-generate"), "--prompt", "def f(x):",
                          "--max-new-tokens", "4", "--json"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["num_tokens"] == 4  # the shipped tiny target, read from the install
