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
    # The fast run writes beside the test, not over the full run's outputs that the docs show.
    env = dict(os.environ, PYRO_MI_TUTORIAL_FAST="1", MPLBACKEND="Agg", PYRO_MI_TUTORIAL_OUTPUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob(f"{path.stem[:2]}_*")), f"{path.name} wrote no {path.stem[:2]}_* output file"
