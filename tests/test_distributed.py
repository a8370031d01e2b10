"""Scale-out on torch.distributed: 2 gloo processes give the numbers of one, bit for bit; an
interrupted 2-process run resumes with 1 process; a dead rank fails the others with a clear
message. The processes run tests/distributed_script.py (or the CLI) with one thread each."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_mi import distributed
from pyro_mi.checkpoint import merge_payloads

SCRIPT = str(Path(__file__).with_name("distributed_script.py"))
ROOT = str(Path(__file__).parents[1])


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _torchrun(args, processes=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}"] + args
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _single(args, check=True):
    out = subprocess.run([sys.executable] + args, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.pt"
    _single([SCRIPT, str(path)])
    return torch.load(path, weights_only=False)


def test_two_processes_give_the_per_point_values_of_one(one_process, tmp_path):
    _torchrun([SCRIPT, str(tmp_path / "two.pt")])
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert set(two) == {"iwae", "ais", "mine-ais"}
    for method, r in one_process.items():
        for side in ("lower", "upper"):
            if r[side] is None:
                assert two[method][side] is None
            else:  # bit for bit: each block's random numbers are its own
                assert r[side].shape == (48,) and torch.equal(r[side], two[method][side]), (method, side)


def test_interrupted_two_process_run_resumes_with_one(one_process, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    out = _torchrun([SCRIPT, str(tmp_path / "x.pt"), "--checkpoint", str(ckpt), "--interrupt-block", "1"],
                    check=False)
    assert out.returncode != 0
    assert (tmp_path / "run.ckpt.rank1").exists(), out.stderr[-3000:]  # rank 1 saved its block's progress
    _single([SCRIPT, str(tmp_path / "resumed.pt"), "--checkpoint", str(ckpt)])
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    for side in ("lower", "upper"):
        assert torch.equal(resumed["ais"][side], one_process["ais"][side])
    assert not any(p.name.startswith("run.ckpt") for p in tmp_path.iterdir())  # every rank's file is gone


def test_a_dead_rank_fails_the_other_with_a_clear_message(tmp_path):
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": "2"}
    args = [sys.executable, SCRIPT, str(tmp_path / "x.pt"), "--exit-early"]
    dead = subprocess.Popen(args, env={**env, "RANK": "1", "LOCAL_RANK": "1"})
    alive = subprocess.run(args, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, capture_output=True, text=True,
                           timeout=120)
    dead.wait(timeout=60)
    assert alive.returncode != 0
    assert "DistributedError: rank 0 of 2" in alive.stderr and "another process died" in alive.stderr


def test_cli_under_torchrun_prints_the_json_of_one_process():
    flags = ["estimate", "--example", "linear-vae", "--method", "ais", "--num-data", "64", "--points-per-block",
             "32", "--num-chains", "2", "--num-steps", "10", "--fit-steps", "50", "--json"]
    one = json.loads(_single(["-m", "pyro_mi.cli"] + flags).stdout)
    out = _torchrun(["-m", "pyro_mi.cli"] + flags)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    two = json.loads(lines[0])
    one.pop("seconds"), two.pop("seconds")
    assert one == two


def test_blocks_and_checkpoint_merge():
    assert distributed.block_spans(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert distributed.world() == (0, 1)
    with pytest.raises(ValueError, match="points_per_block"):
        distributed.check_points_per_block(0)
    # of several ranks' copies of a block, the most advanced wins; other parts come from the own file first
    own = {"training": "own", "block:0": {"progress": (False, 1, 3)}}
    other = {"training": "other", "block:0": {"progress": (True, 2, -1)}, "block:1": {"progress": (False, 0, 7)}}
    merged = merge_payloads([own, other])
    assert merged["training"] == "own" and merged["block:0"]["progress"][0] and "block:1" in merged


def test_blocks_change_nothing_but_the_random_numbers():
    """A block's values do not depend on the other blocks: the first 16 of 48 points with blocks of 16
    equal a 16-point run with the same seed (the seed of block 0 is the run's first)."""
    from pyro_mi import ModelDensity
    from pyro_mi.bounds import iwae_bounds
    from pyro_mi.examples import get_example
    from pyro_mi.proposal import PriorProposal

    ex = get_example("linear-vae", latent_dim=3, obs_dim=6)
    density = ModelDensity(ex.model, ex.obs_sites)
    torch.manual_seed(0)
    x, z = density.sample(48)
    q = PriorProposal(density)
    torch.manual_seed(5)
    full = iwae_bounds(density, q, x, z, 10, points_per_block=16, progress=False)
    torch.manual_seed(5)
    part = iwae_bounds(density, q, {k: v[:16] for k, v in x.items()}, z[:16], 10, points_per_block=16,
                       progress=False)
    assert torch.equal(full.lower_per_point[:16], part.lower_per_point)
    assert torch.equal(full.upper_per_point[:16], part.upper_per_point)


def test_timeout_flag_applies_only_under_torchrun(capsys):
    from pyro_mi.cli import main

    assert main(["estimate", "--example", "linear-vae", "--num-data", "8", "--timeout", "5"]) == 2
    assert "--timeout applies only under torchrun" in capsys.readouterr().err


def test_recorded_chains_of_several_blocks_join_on_the_data_axis():
    from pyro_mi import estimate_mi
    from pyro_mi.examples import get_example

    ex = get_example("linear-vae", latent_dim=3, obs_dim=6)
    r = estimate_mi(ex.model, ex.obs_sites, method="ais", num_data=40, seed=0, fit_steps=20, progress=False,
                    num_chains=2, num_steps=6, record=True, points_per_block=16)
    idata = r.to_arviz()
    assert dict(idata.posterior.sizes)["data"] == 40 and dict(idata.posterior.sizes)["chain"] == 2  # forward chains
    assert dict(idata.annealing.sizes)["chain"] == 3
    assert idata.annealing_stats["accept_prob"].shape[:3] == (3, 6, 40)
