"""Tests of the multi-sample AIS bounds (pyro_mi.bounds.ais) against exact ground truth.

Per-point ground truth: for each simulated (x_i, z_i), m_i = log p(x_i|z_i) - log p(x_i)
with the exact marginal p(x_i), so E[m_i] = I(x; z). A lower (upper) bound must have
mean(lower_i - m_i) <= 0 (mean(upper_i - m_i) >= 0) up to its Monte-Carlo error; the
paired difference removes the data-sampling noise, so small N suffices.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mi import estimate_mi
from pyro_mi.bounds.ais import POSTERIOR_DRAWS
from pyro_mi.bounds import METHODS, ais_bounds, bdmc_bounds, cr_ais_bounds, im_ais_bounds, iwae_bounds
from pyro_mi.bounds.ais import bdmc_log_px, cr_ais_log_px, im_ais_log_px
from pyro_mi.density import ModelDensity
from pyro_mi.examples.linear_vae import make_linear_vae
from pyro_mi.proposal import PriorProposal
from pyro_mi.weights import log_mean_exp

ROOT = Path(__file__).resolve().parents[1]
# Small tensors: one thread avoids thread thrashing on shared CPUs (results do not depend on it).


# ---------------------------------------------------------------- models with exact log p(x)
def linear_setup(num_data=32, seed=0):
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5)
    d = ModelDensity(ex.model, ex.obs_sites)
    pyro.set_rng_seed(seed)
    x, z = d.sample(num_data)
    W, b = ex.params["W"], ex.params["b"]
    cov = 0.25 * torch.eye(4) + W @ W.T
    truth = d.log_likelihood(x, z) - dist.MultivariateNormal(b, cov).log_prob(x["x"])
    return ex, d, x, z, truth


A, B = 3.0, 1.0  # Gamma(shape A, rate B) prior on a Poisson rate


def gamma_poisson(x=None):
    lam = pyro.sample("lam", dist.Gamma(A, B))
    return pyro.sample("x", dist.Poisson(lam), obs=x)


def gamma_poisson_log_px(x):
    """Exact marginal: negative binomial with A failures and success probability 1 / (1 + B)."""
    return dist.NegativeBinomial(total_count=torch.tensor(A), probs=torch.tensor(1 / (1 + B))).log_prob(x)


def gamma_poisson_mi():
    """I = E[lam log lam] - E[lam] - E[log x!] - E[log p(x)], the sums over x exact to 1e-12."""
    xs = torch.arange(0, 400, dtype=torch.float64)
    lpx = gamma_poisson_log_px(xs).double()
    px = lpx.exp()
    e_lam_log_lam = A / B * (torch.digamma(torch.tensor(A + 1.0, dtype=torch.float64)) - math.log(B))
    e_log_fact = (px * torch.lgamma(xs + 1)).sum()
    return float(e_lam_log_lam - A / B - e_log_fact - (px * lpx).sum())


def wall_model(x=None):
    """x | z ~ Uniform(z - 1, z + 1): log p(x|z) = -inf outside a window of z."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    return pyro.sample("x", dist.Uniform(z - 1.0, z + 1.0), obs=x)


def wall_log_px(x):
    n = torch.distributions.Normal(0.0, 1.0)
    return torch.log(0.5 * (n.cdf(x + 1) - n.cdf(x - 1)))


def check_bracket(result, truth, slack=0.02):
    dl = result.lower_per_point - truth
    du = result.upper_per_point - truth
    se_l = float(dl.std() / math.sqrt(dl.numel()))
    se_u = float(du.std() / math.sqrt(du.numel()))
    assert float(dl.mean()) <= 3 * se_l + slack, (float(dl.mean()), se_l)
    assert float(du.mean()) >= -3 * se_u - slack, (float(du.mean()), se_u)
    return float(dl.mean()), float(du.mean())


# ---------------------------------------------------------------- reductions
def test_estimators_on_synthetic_log_weights():
    g = torch.Generator().manual_seed(0)
    fwd, rev, rev2 = (torch.randn(k, 7, generator=g) for k in (5, 5, 4))
    elbo, eubo = im_ais_log_px(fwd, rev)
    torch.testing.assert_close(elbo, torch.log(fwd.exp().mean(0)))
    torch.testing.assert_close(eubo, torch.log((rev[0].exp() + fwd[:4].exp().sum(0)) / 5))
    elbo, eubo = cr_ais_log_px(fwd, rev, rev2)
    torch.testing.assert_close(eubo, -torch.log((-rev).exp().mean(0)))
    torch.testing.assert_close(elbo, -torch.log(((-fwd[0]).exp() + (-rev2).exp().sum(0)) / 5))
    elbo, eubo = bdmc_log_px(fwd, rev)
    torch.testing.assert_close(elbo, log_mean_exp(fwd, 0))
    torch.testing.assert_close(eubo, -log_mean_exp(-rev, 0))
    # equal weights: every estimator gives that weight on both sides
    w = torch.full((3, 2), 1.5)
    for lo, up in (im_ais_log_px(w, w), cr_ais_log_px(w, w, w[:2]), bdmc_log_px(w, w)):
        torch.testing.assert_close(lo, torch.full((2,), 1.5))
        torch.testing.assert_close(up, torch.full((2,), 1.5))


def test_t1_is_iwae_on_the_chains_draws():
    # T = 1: no transitions; the forward weights are log p(x, z0) - log pi0(z0) at the draws z0
    ex, d, x, z, _ = linear_setup()
    q = PriorProposal(d)
    r = im_ais_bounds(d, q, x, z, num_chains=8, num_steps=1, record=True, precondition="none",
                      progress=False)
    z0 = r.diagnostics["chains"]["states"]["z"][0, :8]  # (chains, N, D), forward chains first
    log_w = d.log_likelihood(x, z0)
    torch.testing.assert_close(r.diagnostics["log_weights_forward"], log_w)
    ll = d.log_likelihood(x, z)
    torch.testing.assert_close(r.upper_per_point, ll - log_mean_exp(log_w, 0))
    torch.testing.assert_close(r.lower_per_point, ll - log_mean_exp(torch.cat([ll[None], log_w[:7]]), 0))


def test_k1_is_single_chain_ais_for_every_method():
    ex, d, x, z, _ = linear_setup(num_data=8)
    q = PriorProposal(d)
    res = [fn(d, q, x, z, num_chains=1, num_steps=10, generator=torch.Generator().manual_seed(2), progress=False)
           for fn in (im_ais_bounds, cr_ais_bounds, bdmc_bounds)]
    for r in res[1:]:
        torch.testing.assert_close(r.lower_per_point, res[0].lower_per_point)
        torch.testing.assert_close(r.upper_per_point, res[0].upper_per_point)
    ll = d.log_likelihood(x, z)
    torch.testing.assert_close(res[0].upper_per_point, ll - res[0].diagnostics["log_weights_forward"][0])
    torch.testing.assert_close(res[0].lower_per_point, ll - res[0].diagnostics["log_weights_reverse"][0])


# ---------------------------------------------------------------- ground truth
@pytest.mark.parametrize("method,max_gap", [("ais", 0.5), ("im-ais", 0.5), ("cr-ais", 2.0), ("bdmc", 0.6)])
def test_brackets_linear_gaussian(method, max_gap):
    # prior as pi0, true MI 3.07 nats; measured gaps 0.26 (ais), 1.54 (cr-ais), 0.42 (bdmc)
    ex, d, x, z, truth = linear_setup(num_data=32)
    pyro.set_rng_seed(1)
    r = METHODS[method](d, PriorProposal(d), x, z, num_chains=8, num_steps=200, progress=False)
    check_bracket(r, truth)
    assert r.gap < max_gap
    assert abs(float(truth.mean()) - ex.true_mi) < 1.0  # the 32 points are a fair sample


def test_brackets_conjugate_constrained_latent():
    true_mi = gamma_poisson_mi()
    d = ModelDensity(gamma_poisson, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(200)
    truth = d.log_likelihood(x, z) - gamma_poisson_log_px(x["x"])
    assert abs(float(truth.mean()) - true_mi) < 4 * float(truth.std()) / math.sqrt(200)
    r = ais_bounds(d, PriorProposal(d), x, z, num_chains=8, num_steps=50, progress=False)
    check_bracket(r, truth)
    assert r.gap < 0.1
    assert r.lower - 0.1 < true_mi < r.upper + 0.1


def test_gap_shrinks_with_num_steps():
    ex, d, x, z, truth = linear_setup(num_data=32)
    gaps = []
    for T in (3, 15, 75):
        pyro.set_rng_seed(1)
        gaps.append(im_ais_bounds(d, PriorProposal(d), x, z, num_chains=4, num_steps=T, precondition="none",
                                  progress=False).gap)
    assert gaps[0] > gaps[1] > gaps[2]


def test_pilot_freezes_step_sizes_and_online_is_labelled_approximate():
    ex, d, x, z, truth = linear_setup(num_data=32)
    r = ais_bounds(d, PriorProposal(d), x, z, num_chains=8, num_steps=40, progress=False)
    check_bracket(r, truth)
    assert r.diagnostics["step_sizes"].shape == (41, 32)
    assert r.settings["adapt"] == "pilot" and r.settings["exact"] and r.warnings == []
    on = ais_bounds(d, PriorProposal(d), x, z, num_chains=8, num_steps=40, adapt="online", progress=False)
    assert not on.settings["exact"] and on.to_dict()["exact"] is False
    assert any("approximate" in w for w in on.warnings)


def test_non_finite_density_region_does_not_crash():
    d = ModelDensity(wall_model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(32)
    truth = d.log_likelihood(x, z) - wall_log_px(x["x"])
    pyro.set_rng_seed(1)
    # forward chains that start outside the window carry zero weight; with 32 chains every
    # data point has some inside (else its MI upper bound would be +inf, still a valid bound)
    r = ais_bounds(d, PriorProposal(d), x, z, num_chains=32, num_steps=30, progress=False)
    assert math.isfinite(r.lower) and math.isfinite(r.upper)
    assert r.diagnostics["divergences"] > 0
    check_bracket(r, truth, slack=0.05)


def test_fast_normal_log_prob_matches_torch():
    # the density layer's fast path for Normal / Independent(Normal) sites (the AIS hot path)
    from pyro_mi.density import site_log_prob

    torch.manual_seed(0)
    loc = torch.randn(4, 3, 5, requires_grad=True)
    scale = torch.rand(4, 3, 5).add(0.5).requires_grad_(True)
    z = torch.randn(4, 3, 5, requires_grad=True)
    fns = [
        dist.Normal(loc, 0.7).to_event(1),
        dist.Normal(loc, scale).to_event(1),
        dist.Normal(loc, scale),
        dist.Normal(loc, scale).to_event(2),
        dist.Normal(torch.zeros(5), torch.ones(5)).to_event(1).expand((4, 3)),
        dist.Normal(loc[:, :1], torch.full((5,), 0.5)).to_event(1),
        torch.distributions.Normal(loc, 1.3),
    ]
    for fn in fns:
        for value in (torch.randn(3, 5), z, torch.randn(5)):
            with pyro.validation_enabled(False):
                fn._validate_args = False
                getattr(fn, "base_dist", fn)._validate_args = False
                expected, got = fn.log_prob(value), site_log_prob(fn, value)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected)
            if expected.requires_grad:
                ge = torch.autograd.grad(expected.sum(), [loc, scale, z], allow_unused=True)
                gg = torch.autograd.grad(got.sum(), [loc, scale, z], allow_unused=True)
                for a, b in zip(ge, gg):
                    a = torch.zeros(4, 3, 5) if a is None else a
                    b = torch.zeros(4, 3, 5) if b is None else b
                    torch.testing.assert_close(b, a)
    # with argument validation on, torch's path runs (and validates)
    fn = dist.Normal(torch.zeros(2), 1.0, validate_args=True)
    with pytest.raises(ValueError):
        site_log_prob(fn, torch.tensor([0.0, float("nan")]))


# ---------------------------------------------------------------- determinism, resume, chunks
def test_determinism():
    ex, d, x, z, _ = linear_setup(num_data=8)
    out = []
    for _ in range(2):
        pyro.set_rng_seed(3)
        out.append(ais_bounds(d, PriorProposal(d), x, z, num_chains=4, num_steps=10, progress=False))
    assert torch.equal(out[0].lower_per_point, out[1].lower_per_point)
    assert torch.equal(out[0].upper_per_point, out[1].upper_per_point)


@pytest.mark.parametrize("method,adapt", [("ais", "pilot"), ("cr-ais", "online"), ("bdmc", "none")])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, method, adapt):
    ex, d, x, z, _ = linear_setup(num_data=8)
    opts = dict(num_chains=3, num_steps=12, adapt=adapt, progress=False, max_chains_per_chunk=2, record=True)

    def gen():
        return torch.Generator().manual_seed(4)

    full = METHODS[method](d, PriorProposal(d), x, z, generator=gen(), **opts)
    ckpt = tmp_path / "run.pt"
    seen = []

    def interrupt(key, state, info):
        seen.append(key)
        if len(seen) == 17:  # in the middle of the second chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        METHODS[method](d, PriorProposal(d), x, z, generator=gen(), checkpoint=str(ckpt), checkpoint_every=1e9,
                        callback=interrupt, **opts)
    assert ckpt.exists()
    torch.manual_seed(123)  # the global RNG plays no part
    resumed = METHODS[method](d, PriorProposal(d), x, z, generator=gen(), checkpoint=str(ckpt), **opts)
    assert torch.equal(resumed.lower_per_point, full.lower_per_point)
    assert torch.equal(resumed.upper_per_point, full.upper_per_point)
    for k in ("accept_prob", "log_weight_increment"):  # the chain records survive the resume too
        a, b = full.diagnostics["chains"]["stats"][k], resumed.diagnostics["chains"]["stats"][k]
        assert torch.equal(a.nan_to_num(-9), b.nan_to_num(-9))
    assert full.diagnostics["divergences"] == resumed.diagnostics["divergences"]
    assert not ckpt.exists() and not (tmp_path / "run.pt.lock").exists()


def _interrupted(d, x, z, ckpt, q, **opts):
    def stop(key, state, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ais_bounds(d, q, x, z, checkpoint=str(ckpt), callback=stop, progress=False, **opts)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    from pyro_mi.proposal import GaussianEncoder, fit_guide

    ex, d, x, z, _ = linear_setup(num_data=4)
    ckpt = tmp_path / "c.pt"
    g = dict(generator=torch.Generator().manual_seed(0))
    _interrupted(d, x, z, ckpt, PriorProposal(d), num_steps=5, **g)
    with pytest.raises(ValueError, match="different run"):  # other settings
        ais_bounds(d, PriorProposal(d), x, z, num_steps=6, checkpoint=str(ckpt), progress=False,
                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="different run"):  # another seed
        ais_bounds(d, PriorProposal(d), x, z, num_steps=5, checkpoint=str(ckpt), progress=False,
                   generator=torch.Generator().manual_seed(1))
    # the proposal is part of the run: a differently fitted encoder is refused
    ckpt2 = tmp_path / "c2.pt"
    q = GaussianEncoder(d)
    fit_guide(d, q, num_steps=5, progress=False)
    _interrupted(d, x, z, ckpt2, q, num_steps=5, generator=torch.Generator().manual_seed(0))
    fit_guide(d, q, num_steps=5, progress=False)
    with pytest.raises(ValueError, match="different run"):
        ais_bounds(d, q, x, z, num_steps=5, checkpoint=str(ckpt2), progress=False,
                   generator=torch.Generator().manual_seed(0))


def test_second_writer_is_refused_and_bad_paths_fail_before_work(tmp_path):
    from pyro_mi.checkpoint import Checkpoint

    ex, d, x, z, _ = linear_setup(num_data=4)
    ckpt = tmp_path / "c.pt"
    holder = Checkpoint(ckpt, "another run")  # another process would hold the same lock
    try:
        with pytest.raises(ValueError, match="in use by another running process"):
            ais_bounds(d, PriorProposal(d), x, z, num_steps=5, checkpoint=str(ckpt), progress=False)
    finally:
        holder.release()
    calls = []
    for kw in (dict(checkpoint=str(tmp_path / "missing" / "c.pt")), dict(save_chains=str(tmp_path / "no" / "c.nc"))):
        with pytest.raises(ValueError, match="does not exist"):
            ais_bounds(d, PriorProposal(d), x, z, num_steps=5, progress=False,
                       callback=lambda *a: calls.append(1), **kw)
    assert not calls  # refused before any chain ran


def test_chunks_give_valid_bounds():
    ex, d, x, z, truth = linear_setup(num_data=32)
    pyro.set_rng_seed(1)
    r = ais_bounds(d, PriorProposal(d), x, z, num_chains=8, num_steps=60, max_chains_per_chunk=3, progress=False)
    check_bracket(r, truth)
    assert r.diagnostics["log_weights_forward"].shape == (8, 32)


# ---------------------------------------------------------------- errors and front ends
def test_bad_options():
    ex, d, x, z, _ = linear_setup(num_data=4)
    q = PriorProposal(d)
    with pytest.raises(ValueError, match="num_chains"):
        ais_bounds(d, q, x, z, num_chains=0)
    with pytest.raises(ValueError, match="step_size"):
        ais_bounds(d, q, x, z, step_size=-0.1)
    with pytest.raises(ValueError, match="schedule"):
        ais_bounds(d, q, x, z, schedule="cosine", num_steps=3, progress=False)
    with pytest.raises(ValueError, match="adapt"):
        ais_bounds(d, q, x, z, adapt="sometimes")
    with pytest.raises(ValueError, match="apply only to adapt='pilot'"):  # never silently ignored
        ais_bounds(d, q, x, z, adapt="online", pilot_chains=4)
    with pytest.raises(ValueError, match="num_steps is 5"):
        ais_bounds(d, q, x, z, schedule=[0.0, 0.5, 1.0], num_steps=5, progress=False)


def test_estimate_mi_with_guide_and_arviz(tmp_path):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    ex = make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5, exact_guide=True)
    path = tmp_path / "chains.nc"
    r = estimate_mi(ex.model, "x", guide=ex.guide, method="ais", num_data=16, num_chains=4, num_steps=10,
                    save_chains=str(path), progress=False)
    assert r.lower - 0.3 < ex.true_mi < r.upper + 0.3 and r.gap < 0.2  # exact posterior as pi0
    assert 0 < r.diagnostics["ess"] <= 4
    idata = r.to_arviz()
    # posterior: draws of p(z|x_i) only, the 4 forward chains at beta = 1 after the annealing (issue 33)
    assert set(idata.posterior.data_vars) == {"z"}
    assert idata.posterior["z"].shape[:3] == (4, POSTERIOR_DRAWS, 16)
    assert idata.sample_stats["accept_prob"].shape == (4, POSTERIOR_DRAWS, 16)
    assert idata.log_likelihood["obs"].shape == (4, POSTERIOR_DRAWS, 16)
    # the annealing path in groups of its own: 4 forward + 1 reverse chain, with their betas
    assert idata.annealing_stats["accept_prob"].shape == (5, 10, 16)
    assert list(idata.annealing.direction.values) == ["forward"] * 4 + ["reverse"]
    assert idata.annealing_stats.beta.shape == (5, 10)
    assert idata.posterior.attrs["method"] == "ais"
    summary = az.summary(idata)
    assert len(summary) == 2 * 16  # one row per latent element and point
    assert summary["r_hat"].notna().all()
    assert summary["r_hat"].median() < 1.05  # the chains at beta = 1 agree on each point's posterior
    az.ess(idata)
    az.rhat(idata)
    az.plot_trace(idata, var_names=["z"], coords={"data": [0]})
    loaded = az.from_netcdf(str(path))
    assert loaded.annealing_stats["diverging"].shape == (5, 10, 16)
    assert loaded.posterior["z"].shape[:3] == (4, POSTERIOR_DRAWS, 16)


def test_to_arviz_refuses_results_without_chains():
    ex, d, x, z, _ = linear_setup(num_data=4)
    r = iwae_bounds(d, PriorProposal(d), x, z, num_particles=2, progress=False)
    with pytest.raises(ValueError, match="no recorded chains"):
        r.to_arviz()


def test_cli_ais_json(tmp_path):
    import json

    from pyro_mi.cli import main

    model_file = tmp_path / "gp.py"
    model_file.write_text(
        "import pyro, pyro.distributions as dist\n"
        "def model(x=None):\n"
        "    lam = pyro.sample('lam', dist.Gamma(3.0, 1.0))\n"
        "    return pyro.sample('x', dist.Poisson(lam), obs=x)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pyro_mi.cli", "estimate", f"{model_file}:model", "--obs", "x", "--method", "bdmc",
         "--proposal", "prior", "--num-data", "32", "--num-chains", "4", "--num-steps", "20", "--num-leapfrog", "2",
         "--step-size", "0.1", "--schedule", "linear", "--save-chains", str(tmp_path / "c.nc"), "--json"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["method"] == "bdmc" and res["num_chains"] == 4 and res["schedule"] == "linear"
    assert res["lower"] < res["upper"] + 0.1
    assert (tmp_path / "c.nc").exists()
    assert main(["estimate", f"{model_file}:model", "--obs", "x", "--method", "ais", "--num-chains", "0",
                 "--proposal", "prior", "--json"]) == 2
