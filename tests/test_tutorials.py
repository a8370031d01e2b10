"""Every tutorial runs end to end (in its fast mode) and writes its outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9]*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    out = path.parent / "output"
    before = {p: p.stat().st_mtime for p in out.glob(f"{path.stem[:2]}_*")} if out.exists() else {}
    env = dict(os.environ, PYRO_MI_TUTORIAL_FAST="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in out.glob(f"{path.stem[:2]}_*") if p.stat().st_mtime > before.get(p, 0)]
    assert written, f"{path.name} wrote no tutorials/output/{path.stem[:2]}_* file"
