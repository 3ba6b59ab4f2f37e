"""The repository is self-contained: no file points at a path outside it, and every
``docs/design.md §N`` reference names a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ipynb", ".txt", ".cfg", ""}
# Relative links that climb out of the directory they are in, absolute home/work paths, and the
# design brief that lived next to the repository while it was written.
OUTSIDE = re.compile(r"\.\./\S+|(?<![\w.])/(?:work|home|Users|tmp/[\w-]+/)[\w./-]*|\bDESIGN(?:\.md)?\b")


def _text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / f for f in listed.splitlines()]
    return [f for f in files if f.suffix in TEXT_SUFFIXES and f.is_file()
            and not f.relative_to(ROOT).as_posix().startswith(("dflash/assets/", "docs/results/"))]


def _outside(match: str, file: Path) -> bool:
    if match.startswith("../"):  # a relative link is fine while it stays inside the repository
        target = (file.parent / match.rstrip(").,;:`'\"")).resolve()
        return ROOT.resolve() not in (target, *target.parents)
    return True


def test_no_reference_to_a_path_outside_the_repository():
    found = []
    for f in _text_files():
        if f == Path(__file__).resolve():
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            found += [f"{f.relative_to(ROOT)}:{n}: {m}" for m in OUTSIDE.findall(line) if _outside(m, f)]
    assert not found, "references outside the repository:\n" + "\n".join(found)


def test_design_section_references_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {m.group(1) for m in re.finditer(r"^## (\d+)\.", design, re.M)}
    assert sections == {str(i) for i in range(1, 13)}
    bad = []
    for f in _text_files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for ref in re.findall(r"design\.md`? §([\d.]+(?:/§[\d.]+)*)", line):
                for sec in ref.split("/§"):
                    if sec.split(".")[0] not in sections:
                        bad.append(f"{f.relative_to(ROOT)}:{n}: §{sec}")
    assert not bad, "references to sections docs/design.md does not have:\n" + "\n".join(bad)


def test_readme_outputs_are_ignored_by_git():
    """What the README's commands write (run from the root) never shows up in ``git status``."""
    flags = r"--(?:out|json|run-dir|anchor-profile|plots)"
    outputs = set()
    for doc in ("README.md", "docs/export.md"):
        outputs |= set(re.findall(flags + r"[ =]([\w./-]+)", (ROOT / doc).read_text()))
    outputs = {o for o in outputs if not o.startswith("docs/") and o not in ("DIR", "OUT.json")
               and ("/" in o or "." in o)}  # a path, not a word of a comment
    assert {"exported/tiny", "bench.json", "runs/longer"} <= outputs  # the pattern still reads the README
    listed = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=ROOT,
                            capture_output=True, text=True).stdout.split()
    assert sorted(set(outputs) - set(listed)) == []


def test_the_readme_says_how_to_install_and_run_tensorboard():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.fullmatch(r"tensorboard==[\d.]+", "".join(extras["tensorboard"]))  # pinned exactly
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[tensorboard]"' in readme and "tensorboard --logdir" in readme


def _commands(doc: Path) -> list[str]:
    """The shell lines of ``doc``'s fenced bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def test_the_quickstart_names_real_commands_flags_configs_and_presets():
    import shlex

    from clihelp import unknown_flags

    doc = ROOT / "docs" / "quickstart-tpu.md"
    lines = _commands(doc)
    pipeline = (ROOT / "configs/launch/pipeline.sh").read_text()
    presets = set(re.findall(r"^  (\w+)\)", pipeline, re.M))
    assert {"smoke", "qwen3_8b"} <= presets
    subcommands = set(re.findall(r"^  (\w+)\)", (ROOT / "configs/launch/tpu-vm.sh").read_text(), re.M))
    seen = set()
    segments = [seg for line in lines for seg in re.split(r";\s*(?:do\s+)?|\s&&\s", line)]
    for line in segments:  # each command of a line: "a; do b; done", "a && b"
        words = shlex.split(line.split(" | ")[0].split(" > ")[0], comments=True)
        for w in words:
            if w.startswith("PRESET="):
                assert w.split("=", 1)[1] in presets, line
            if re.fullmatch(r"configs/[\w./-]+", w):
                assert (ROOT / w).exists(), line
        if not words:
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words[:1] == ["nohup"]:
            words = words[1:]
        if words and words[0].startswith("dflash-"):
            assert unknown_flags(words) == [], line
            seen.add(words[0])
        if words[:2] == ["bash", "configs/launch/tpu-vm.sh"]:
            assert words[2] in subcommands, line
            seen.add(f"tpu-vm.sh {words[2]}")
    assert {"dflash-prepare-data", "dflash-regenerate", "tpu-vm.sh up", "tpu-vm.sh resume",
            "tpu-vm.sh teardown"} <= seen
    text = doc.read_text()
    assert text.index("## 2. The smoke run") < text.index("## 3. The real run")  # smoke first
    assert "docs/quickstart-tpu.md" in (ROOT / "README.md").read_text()
