"""The catalogue of inputs that once gave silent wrong numbers: each now gives a clear error
or a number with its warning (issue "Every number pyro_mi prints is a bound").

Model-level cases (a reduction over the batch, a batch of designs, a latent at the boundary of
its support, a guide of the wrong shape or support) are in test_density_checks.py and
test_proposal.py; command-line cases (strict JSON, options, faults) in test_cli*.py.
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_mi
from pyro_mi.bounds import METHODS, ba_bounds, iwae_bounds
from pyro_mi.density import ModelDensity
from pyro_mi.examples.linear_vae import make_linear_vae
from pyro_mi.proposal import GuideDensity, PriorProposal
from pyro_mi.result import MIResult


def cauchy_model(x=None):
    z = pyro.sample("z", dist.Cauchy(0.0, 1.0))
    return pyro.sample("x", dist.Normal(z, 0.1), obs=x)


def wall_model(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    return pyro.sample("x", dist.Uniform(z - 0.05, z + 0.05), obs=x)


def test_all_chains_divergent_is_a_warning():
    # step size 1e6: every transition diverges (and is rejected); the bound is valid but says so
    r = pyro_mi.estimate_mi(cauchy_model, "x", method="ais", proposal="prior", adapt="none", step_size=1e6,
                            num_data=64, num_steps=20, progress=False)
    assert r.diagnostics["divergent_chain_fraction"] == 1.0
    assert any("diverged" in w for w in r.warnings)
    assert any("diverged" in w for w in r.to_dict()["warnings"])
    assert "WARNING" in str(r)


def test_heavy_tailed_prior_is_warned():
    # the Cauchy prior that once gave an upper bound of 6.9e9 nats with no word: chains that
    # start in its tails carry no weight, so the upper bound is loose, and the result says so,
    # naming the few points that carry the gap (issue "hierarchical models")
    r = pyro_mi.estimate_mi(cauchy_model, "x", method="ais", num_data=256, fit_steps=1000, progress=False)
    if r.gap > 1:
        assert any("of the gap" in w and "dominant_points" in w for w in r.warnings)
        assert r.diagnostics["dominant_points"]
    assert all(math.isfinite(v) for v in (r.lower, r.upper))


def test_one_data_point_is_an_error():
    with pytest.raises(ValueError, match="num_data must be an integer >= 2"):
        pyro_mi.estimate_mi(cauchy_model, "x", num_data=1, progress=False)


def test_option_a_method_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="takes no option 'num_particles'"):
        pyro_mi.estimate_mi(cauchy_model, "x", method="ais", num_particles=5, num_data=4, progress=False)


def test_a_side_with_no_finite_bound_is_not_reported_and_says_why():
    # a narrow uniform likelihood: with one prior draw per point, some points get no draw with p(x|z) > 0,
    # so no finite upper bound exists there: the side is None (null in JSON), the warning names the points
    d = ModelDensity(wall_model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(64)
    r = iwae_bounds(d, PriorProposal(d), x, z, num_particles=1, progress=False)
    assert r.upper is None and r.lower is not None
    assert any(w.startswith("the upper side is not reported: at ") and "every proposal draw has zero weight" in w
               for w in r.warnings)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["upper"] is None


def test_crossed_sides_are_noise_or_a_warning():
    # BA with the exact posterior as q: both sides equal the MI in expectation, so their means cross,
    # by Monte-Carlo noise: said in a note (issue "hierarchical models": a crossing within the
    # standard errors is noise and is said to be)
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5, exact_guide=True)
    d = ModelDensity(ex.model, "x")
    q = GuideDensity(d, ex.guide)
    crossed = []
    for seed in range(6):
        pyro.set_rng_seed(seed)
        x, z = d.sample(32)
        r = ba_bounds(d, q, x, z, num_particles=4, progress=False)
        if r.gap < 0:
            crossed.append(r)
    assert crossed, "no seed crossed"
    assert all(any("sides crossed" in n and "Monte-Carlo noise" in n for n in r.notes) for r in crossed)
    assert not any("sides crossed" in w for r in crossed for w in r.warnings)
    # beyond 2 standard errors of the paired difference it is a warning
    r = MIResult("demo", torch.tensor([1.0, 1.2]), torch.tensor([0.9, 1.0]))
    assert r.gap < 0 and "sides crossed" in r.warnings[0] and "not a bound" in r.warnings[0]


def test_json_is_strict():
    r = MIResult("demo", torch.tensor([1.0, 2.0]), None, settings={"x": float("nan"), "y": float("inf")},
                 diagnostics={"ess": float("nan")})
    text = json.dumps(r.to_dict(), allow_nan=False)  # raises on NaN or Infinity
    d = json.loads(text)
    assert d["upper"] is None and d["x"] is None and d["y"] is None and d["diagnostics"]["ess"] is None
    assert d["meaning"]["interval_95"] == "95% interval for the model's MI"
    assert "2 simulated points" in d["meaning"]["lower_upper"]


def test_results_keep_the_points_they_bound_and_say_what_they_mean():
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5)
    for method, opts in (("iwae", dict(num_particles=8)), ("ais", dict(num_steps=5)), ("ba", {})):
        r = pyro_mi.estimate_mi(ex.model, "x", method=method, num_data=16, fit_steps=20, progress=False, **opts)
        assert r.x["x"].shape == (16, 4) and r.z.shape == (16, 2)
        assert "bounds on the MI of these 16 simulated points" in str(r)
        assert "95% interval for the model's MI" in str(r)


def test_estimate_mi_leaves_the_global_rng_alone():
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = pyro_mi.estimate_mi(ex.model, "x", method="ais", num_data=8, num_steps=5, fit_steps=5, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = pyro_mi.estimate_mi(ex.model, "x", method="ais", num_data=8, num_steps=5, fit_steps=5, progress=False)
    assert torch.equal(a.lower_per_point, b.lower_per_point)  # the seed (default 0) reproduces the run


@pytest.mark.parametrize("method", ["ais", "cr-ais", "bdmc"])
def test_every_ais_method_is_exact_by_default(method):
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5)
    d = ModelDensity(ex.model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(8)
    r = METHODS[method](d, PriorProposal(d), x, z, num_steps=10, progress=False)
    assert r.settings["adapt"] == "pilot" and r.settings["exact"] is True
