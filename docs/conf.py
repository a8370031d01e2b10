"""Sphinx configuration of pyro_mi's documentation (``sphinx-build -W -b html docs docs/_build/html``).

Pages are markdown (MyST); the API reference is generated from the docstrings (autodoc, Google
style via napoleon); each tutorial's page is generated here from its script and the outputs of its
last full run (``docs/tutorials/output``, written by ``python benchmarks/docs_page.py tutorials``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "pyro_mi"
author = "the pyro_mi developers"
copyright = "2026, the pyro_mi developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "tutorials/output/*.md"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state shapes and types in words
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a named tuple's Attributes: section, not a second entry per field
html_theme = "alabaster"
html_static_path: list[str] = []


_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_notation(app, what, name, obj, options, lines) -> None:
    """Docstrings write p(x|z) and shapes such as (*S, N, D) as the papers do; reStructuredText
    would read ``|`` as a substitution and ``*`` as emphasis. Escapes both outside literals."""
    literal_indent = None
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None and (not line.strip() or indent > literal_indent):
            continue  # inside a literal block
        literal_indent = indent if line.rstrip().endswith("::") else None
        parts = _LITERAL.split(line)
        for j in range(0, len(parts), 2):  # even parts are outside inline literals and roles
            parts[j] = re.sub(r"(?<![\\*\w])\*(?=[A-Za-z_.][\w .]*[,)\]])", r"\\*", parts[j]).replace("|", "\\|")
        lines[i] = "".join(parts)


def setup(app):
    app.connect("autodoc-process-docstring", _escape_notation)


def _tutorial_page(script: Path, outputs: Path) -> str:
    """A tutorial script (jupytext percent format) as a page: its markdown cells as text, its code
    cells as code, then the figures and tables its last full run wrote."""
    text = script.read_text()
    text = re.sub(r"\A# ---\n.*?# ---\n", "", text, flags=re.S)  # the jupytext header
    page: list[str] = []
    for cell in re.split(r"^# %%", text, flags=re.M)[1:]:
        head, _, body = cell.partition("\n")
        if "[markdown]" in head:
            page.append("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in
                                  body.strip().splitlines()))
        elif body.strip():
            page.append(f"```python\n{body.strip()}\n```")
    prefix = script.stem[:3]
    shown = sorted(outputs.glob(f"{prefix}*")) if outputs.exists() else []
    if shown:
        page.append("## What the last full run wrote")
        stamp = outputs / "STAMP.md"
        if stamp.exists():
            page.append(stamp.read_text().strip())
    for path in shown:
        rel = path.relative_to(DOCS / "tutorials")
        if path.suffix == ".png":
            page.append(f"![{path.name}]({rel})")
        elif path.suffix == ".md":
            page.append(f"`{path.name}`:\n\n" + path.read_text().strip())
        elif path.suffix in (".txt", ".csv"):
            page.append(f"`{path.name}`:\n\n```text\n{path.read_text().strip()}\n```")
    return "\n\n".join(page) + "\n"


def _write_tutorial_pages() -> None:
    pages = DOCS / "tutorials"
    pages.mkdir(exist_ok=True)
    names = []
    for script in sorted((ROOT / "tutorials").glob("[0-9]*.py")):
        page = _tutorial_page(script, pages / "output")
        target = pages / f"{script.stem}.md"
        if not target.exists() or target.read_text() != page:  # unchanged pages keep Sphinx's cache
            target.write_text(page)
        names.append(script.stem)
    index = ("# Tutorials\n\nRunnable scripts in `tutorials/` (jupytext percent format); each writes its tables "
             "and figures. `PYRO_MI_TUTORIAL_FAST=1` runs a small version, which the test suite runs; the pages "
             "show the outputs of the last full run.\n\n```{toctree}\n:maxdepth: 1\n\n" + "\n".join(names) + "\n```\n")
    if not (pages / "index.md").exists() or (pages / "index.md").read_text() != index:
        (pages / "index.md").write_text(index)


_write_tutorial_pages()
