"""Fault paths of `pyro-mi`: errors in the user's model file, output paths checked before work,
SIGINT / SIGTERM (one line, exit 130 / 143, the AIS checkpoint saved)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyro_mi
from pyro_mi import cli
from pyro_mi.cli import main

GOOD = """
import pyro, pyro.distributions as dist

def model(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    return pyro.sample("x", dist.Normal(z, 0.5), obs=x)
"""

BROKEN = {
    "syntax": ("def model(x=None:\n    pass\n", 1, "SyntaxError"),
    "missing_import": ("import pyro\nimport not_a_module_xyz\n", 2, "ModuleNotFoundError: No module named 'not_a_module_xyz'"),
    "raises_on_import": ("import pyro\nSCALE = 1 / 0\n", 2, "ZeroDivisionError: division by zero"),
}

RUNTIME = GOOD + """
def bad_model(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    scale = {"sigma": 0.5}["sd"]
    return pyro.sample("x", dist.Normal(z, scale), obs=x)

def bad_guide(x):
    loc = 1 // 0
    pyro.sample("z", dist.Normal(loc, 1.0))
"""


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_errors_in_the_model_file_are_one_line_with_file_and_line(capsys, tmp_path, kind):
    text, line, message = BROKEN[kind]
    path = tmp_path / f"{kind}.py"
    path.write_text(text)
    code, out, err = run(capsys, "estimate", f"{path}:model", "--obs", "x")
    assert code == 2 and out == ""
    first = one_line(err)
    assert f"{path.name}:{line}: " in first and message in first, first


@pytest.mark.parametrize(
    "target, guide, statement, message",
    [
        ("bad_model", None, 'scale = {"sigma": 0.5}["sd"]', "KeyError: 'sd'"),
        ("model", "bad_guide", "loc = 1 // 0", "ZeroDivisionError: integer division"),
    ],
)
def test_errors_raised_in_the_users_code_name_its_line(capsys, tmp_path, target, guide, statement, message):
    line = [s.strip() for s in RUNTIME.splitlines()].index(statement) + 1
    path = tmp_path / "runtime.py"
    path.write_text(RUNTIME)
    argv = ["estimate", f"{path}:{target}", "--obs", "x", "--num-data", "8", "--num-particles", "4", "--json"]
    if guide:
        argv += ["--guide", f"{path}:{guide}"]
    code, out, err = run(capsys, *argv)
    first = one_line(err)
    assert code == 2 and f"{path.name}:{line}: {message}" in first, first
    assert json.loads(out) == {"error": first.removeprefix("pyro-mi: error: ")}


@pytest.mark.parametrize("flag", ["--checkpoint", "--save-chains"])
def test_output_paths_are_checked_before_any_work(capsys, tmp_path, flag):
    marker = tmp_path / "imported"
    path = tmp_path / "m.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n" + GOOD)
    target = tmp_path / "no_such_dir" / "out.nc"
    code, _, err = run(capsys, "estimate", f"{path}:model", "--obs", "x", "--method", "ais", flag, target)
    assert code == 2 and "does not exist" in one_line(err) and flag in err
    assert not marker.exists()  # failed before the model file was even loaded


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt, 130), (cli.Terminated, 143)])
@pytest.mark.parametrize("saved", [True, False])
def test_interrupt_prints_one_line(capsys, tmp_path, monkeypatch, exc, status, saved):
    ckpt = tmp_path / "run.ckpt"

    def interrupted(*args, **kwargs):
        if saved:  # what the AIS runner does on KeyboardInterrupt
            ckpt.write_bytes(b"state")
        raise exc()

    monkeypatch.setattr(cli, "estimate_mi", interrupted)
    path = tmp_path / "m.py"
    path.write_text(GOOD)
    code, out, err = run(capsys, "estimate", f"{path}:model", "--obs", "x", "--method", "ais", "--checkpoint", ckpt)
    assert code == status and out == ""
    if saved:
        assert one_line(err) == f"pyro-mi: interrupted; saved to {ckpt}; rerun the same command to resume"
    else:  # --checkpoint was passed, but nothing was saved yet: the message must not ask for it (issue 32)
        assert one_line(err) == (f"pyro-mi: interrupted before anything was saved to {ckpt} (a phase that is not "
                                 "checkpointed, such as fitting the proposal, a critic or AIS's per-point Gaussians, "
                                 "was running); rerunning "
                                 "the command starts afresh")


def test_interrupt_of_a_method_without_checkpoints(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "estimate_mi", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    path = tmp_path / "m.py"
    path.write_text(GOOD)
    code, out, err = run(capsys, "estimate", f"{path}:model", "--obs", "x", "--json")
    line = one_line(err)
    assert code == 130 and line.startswith("pyro-mi: interrupted; nothing saved (--method iwae cannot resume")
    assert json.loads(out) == {"error": line.removeprefix("pyro-mi: ")}


# ----------------------------------------------------------------- real signals, in a subprocess
SLEEPY = """
import os, time
import pyro, pyro.distributions as dist

MARKER, AFTER = {marker!r}, {after}
calls = 0

def model(x=None):
    global calls
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if z.dim() >= 2:  # chains or particles
        calls += 1
        if calls == AFTER:
            open(MARKER, "w").close()
            time.sleep(120)
    return pyro.sample("x", dist.Normal(z, 0.5), obs=x)
"""


def start(tmp_path, after, *flags):
    marker = tmp_path / "running"
    path = tmp_path / "sleepy.py"
    path.write_text(SLEEPY.format(marker=str(marker), after=after))
    root = str(Path(pyro_mi.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_mi.cli", "estimate", f"{path}:model", "--obs", "x", "--proposal", "prior",
         "--num-data", "4", "--no-progress", *flags],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job ignores SIGINT, and children inherit that: restore the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach the model"
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_run_with_one_line(tmp_path, sig, status):
    proc = start(tmp_path, 1, "--method", "iwae", "--num-particles", "100000")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status and out == ""
    assert one_line(err) == "pyro-mi: interrupted; nothing saved (--method iwae cannot resume; ais, im-ais, cr-ais, bdmc, mine-ais can)"


def test_sigterm_saves_the_ais_checkpoint(tmp_path):
    ckpt = tmp_path / "ais.ckpt"
    # without the per-point fit, whose model runs come first and are not checkpointed (they are redone, the same);
    # eager, so the model runs at every step (a recorded graph would not call it)
    proc = start(tmp_path, 20, "--method", "ais", "--num-chains", "2", "--num-steps", "50", "--precondition", "none",
                 "--compile", "none", "--checkpoint", ckpt)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and out == ""
    assert one_line(err) == f"pyro-mi: interrupted; saved to {ckpt}; rerun the same command to resume"
    assert ckpt.exists()
