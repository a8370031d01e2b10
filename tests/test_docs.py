"""Every code block of the README and the docs runs as printed, and the docs build without warnings.

A ``python`` block runs in one process with the blocks before it on the same page; a ``text`` block
right after it is its expected output: each of its lines must appear in what the block printed.
In a ``bash`` block, each ``&&``-separated command runs, except those that are CI's own or
regenerate measurements: installing (``pip``), the test suite (``pytest``), this build
(``sphinx-build``, run by :func:`test_docs_build`) and ``benchmarks/docs_page.py`` with pages to
regenerate (about an hour; ``--list`` runs).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md")
    if not {"generated", "tutorials", "_build"} & set(p.relative_to(ROOT / "docs").parts))
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SENTINEL = "----pyro_mi-docs-block----"


def blocks(page: Path) -> list[tuple[str, str]]:
    """The (language, code) of each fenced block of a markdown page, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def words_of(command: str) -> list[str]:
    """A shell command's words, without leading environment assignments (``OMP_NUM_THREADS=1``)."""
    words = shlex.split(command)
    while words and re.fullmatch(r"\w+=\S*", words[0]):
        words = words[1:]
    return words


def runnable(command: str) -> bool:
    """Whether a shell command of a bash block is run here (see the module docstring)."""
    words = words_of(command)
    if not words or words[0] in ("pip", "sphinx-build") or "pytest" in words:
        return False
    return not ("benchmarks/docs_page.py" in words and "--list" not in words)


def test_every_page_has_been_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/getting_started.md", "docs/guide/eig.md", "docs/guide/svi.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_code_blocks_run(page, tmp_path):
    found = blocks(page)
    python = [(i, code) for i, (lang, code) in enumerate(found) if lang == "python"]
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    if python:
        script = "".join(f"{code}\nprint({SENTINEL!r})\n" for _, code in python)
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{page.name}: a python block failed:\n{proc.stderr[-3000:]}"
        outputs = proc.stdout.split(SENTINEL + "\n")
        for (i, _), printed in zip(python, outputs):
            if i + 1 < len(found) and found[i + 1][0] == "text":
                printed_lines = {line.rstrip() for line in printed.splitlines()}
                missing = [line for line in found[i + 1][1].splitlines() if line.rstrip() not in printed_lines]
                assert not missing, f"{page.name}: block {i}'s printed output lacks {missing}; it printed:\n{printed}"
    for lang, code in found:
        if lang != "bash":
            continue
        for line in code.strip().splitlines():
            for command in (c.strip() for c in line.split("&&")):
                if not runnable(command):
                    continue
                words = words_of(command)
                argv = [sys.executable, "-m", "pyro_mi.cli", *words[1:]] if words[0] == "pyro-mi" else \
                    [sys.executable, *words[1:]] if words[0] == "python" else words
                proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, f"{page.name}: `{command}` failed:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_docs_build(tmp_path):
    """The documentation builds with warnings as errors (as CI builds it)."""
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs"), str(tmp_path / "html")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
