"""The new bad inputs of issue "Safe to resume, and no traceback or silent number on any input": each
ends in a correct result or a one-line error naming its cause (the checkpoint cases are in
test_checkpoint.py; out of memory, string arrays and missing arguments in test_models_as_written.py)."""

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_mi
from pyro_mi import ModelDensity
from pyro_mi.bounds import ais_bounds, giwae_bounds
from pyro_mi.checkpoint import Checkpoint
from pyro_mi.cli import main
from pyro_mi.critics import JointCritic
from pyro_mi.examples.linear_vae import make_linear_vae
from pyro_mi.proposal import PriorProposal


def simple(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    return pyro.sample("x", dist.Normal(z, 1.0), obs=x)


# ------------------------------------------------------------------ tracebacks, now one line
def test_latent_sites_that_change_between_runs_are_named():
    def model(x=None):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        k = pyro.sample("k", dist.Normal(0.0, 1.0))
        if float(k.reshape(-1)[0]) > 0:  # a latent sampled on some runs only
            pyro.sample("z2", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(z1, 1.0), obs=x)

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=r"sample sites change between runs \(sites \['z2'\]"):
        pyro_mi.estimate_mi(model, "x", num_data=8, progress=False)


@pytest.mark.parametrize("obs, error, message", [
    (["x", "x"], ValueError, "observed site 'x' is named more than once"),
    (123, TypeError, "obs_sites must be a site name or a non-empty sequence of names, got 123"),
])
def test_bad_observed_site_names(obs, error, message):
    with pytest.raises(error, match=message):
        pyro_mi.estimate_mi(simple, obs, num_data=8, progress=False)


def _linear(design):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("y", dist.Normal(design @ w, 1.0).to_event(1))


@pytest.mark.parametrize("design, message", [
    (torch.zeros(0, 2), r"design is empty \(shape \(0, 2\)\)"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"non-finite entry at index \[0, 1\] \(value nan\)"),
    (torch.randn(3, 5), r"fails when called on the design of shape \(3, 5\) \(does its last dim match"),
])
def test_bad_designs_are_named(design, message):
    with pytest.raises(ValueError, match=message):
        pyro_mi.eig(_linear, design, "y", num_data=8, num_particles=4)


def test_a_critic_of_the_wrong_size_is_named():
    ex = make_linear_vae(latent_dim=2, obs_dim=3)
    d = ModelDensity(ex.model, "x")
    x, z = d.sample(8)
    with pytest.raises(ValueError, match="the critic does not take x of 3 features and z of 2"):
        giwae_bounds(d, PriorProposal(d), x, z, critic=JointCritic(5, 2), max_steps=1, progress=False)


# ------------------------------------------------------------------ silent numbers, now refused
def test_a_scaled_or_masked_site_is_refused_by_name():
    def scaled(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=10.0):
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def masked(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=False):
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"site 'x' is scaled by 10.0 \(poutine.scale"):
        pyro_mi.estimate_mi(scaled, "x", num_data=8, progress=False)
    with pytest.raises(ValueError, match=r"site 'x' is masked \(poutine.mask with False entries\)"):
        pyro_mi.estimate_mi(masked, "x", num_data=8, progress=False)


def test_observed_data_of_the_wrong_shape_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"observed site 'x': the model passes obs= of shape \(20, 3\), but its "
                                         r"distribution has shape \(20, 2\)"):
        pyro_mi.estimate_mi(model, "x", model_args=(torch.zeros(20, 3),), num_data=8, progress=False)


@pytest.mark.parametrize("option, message", [
    (dict(seed=2**70), r"seed must be None or an integer in \[0, 2\*\*63\)"),
    (dict(fit_steps=-1), "fit_steps must be None or a non-negative integer, got -1"),
])
def test_bad_run_options_name_themselves(option, message):
    with pytest.raises(ValueError, match=message):
        pyro_mi.estimate_mi(simple, "x", num_data=8, progress=False, **option)


# ------------------------------------------------------------------ failed writes keep the numbers
def test_a_full_disk_at_the_final_checkpoint_save_keeps_the_bounds(tmp_path, monkeypatch):
    ex = make_linear_vae(latent_dim=2, obs_dim=3)
    d = ModelDensity(ex.model, "x")
    x, z = d.sample(8)
    real_save = Checkpoint.save

    def save(self, payload):
        if payload.get("block:0", {}).get("done"):
            raise ValueError(f"checkpoint {self.path!r} cannot be saved: No space left on device")
        real_save(self, payload)

    monkeypatch.setattr(Checkpoint, "save", save)
    r = ais_bounds(d, PriorProposal(d), x, z, num_steps=5, num_chains=2, checkpoint=str(tmp_path / "c"),
                   progress=False)
    assert r.lower is not None and r.upper is not None
    assert [f for f in (tmp_path).iterdir() if f.name.endswith(".tmp")] == []


def test_a_failed_chain_write_prints_the_bounds_then_the_error(capsys, tmp_path, monkeypatch):
    import pyro_mi.diagnostics as diagnostics

    def fail(result, path):
        raise ValueError(f"cannot write chains to {str(path)!r}: No space left on device")

    monkeypatch.setattr(diagnostics, "save_chains", fail)
    code = main(["estimate", "--example", "linear-vae", "--method", "ais", "--num-steps", "3", "--num-data", "4",
                 "--fit-steps", "5", "--save-chains", str(tmp_path / "c.nc"), "--json"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert code == 2 and r["lower"] is not None and r["write_errors"] and "No space left on device" in err


def test_json_holds_an_error_object_even_for_a_bug(capsys, monkeypatch):
    import pyro_mi.cli as cli

    def bug(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "estimate_mi", bug)
    with pytest.raises(KeyError):
        main(["estimate", "--example", "linear-vae", "--json"])
    assert json.loads(capsys.readouterr().out) == {"error": "internal error: KeyError: 'boom'"}


# ------------------------------------------------------------------ unclear messages, now clear
def test_command_line_arrays_that_cannot_be_arguments(capsys, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    np.save(tmp_path / "big.npy", np.full((4, 3), 1e300))
    for name, message in (("empty", "an empty array (shape (0, 3)) cannot be a model argument"),
                          ("big", "the array's values overflow torch.float32 (e.g. 1e+300")):
        code = main(["estimate", "pyro_mi.examples.zoo:eight_schools", "--obs", "obs", "--model-arg",
                     f"sigma={tmp_path / (name + '.npy')}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "--model-arg sigma=" in err, err
