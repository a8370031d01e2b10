"""MINE-AIS and the AIS evaluation of the IBAL (Brekelmans et al. 2022, sec. 4, eq. 17–20, App. M).

Ground truth: a linear-Gaussian model with an exact marginal, so each simulated point's MI
contribution m_i = log p(x_i|z_i) - log p(x_i) is known and every bound is tested by paired
differences against it (DESIGN.md, "Testing").
"""

import json
import math

import pyro
import pytest
import torch
from torch import nn

from models import linear_gaussian, linear_gaussian_exact, linear_params
from pyro_mi import GaussianEncoder, ModelDensity, estimate_mi, fit_guide
from pyro_mi.bounds import METHODS, ibal_bounds, mine_ais_bounds
from pyro_mi.bounds.likelihood_critic import LikelihoodCritic
from pyro_mi.cli import main
from pyro_mi.proposal import GuideDensity, PriorProposal
from pyro_mi.samplers import hmc
from pyro_mi.weights import log_mean_exp

N = 600
FAST = dict(hidden_sizes=(32, 32), progress=False)


@pytest.fixture(scope="module")
def setup():
    """z in R^2, x in R^5 (noise 0.5): simulated points with their exact per-point MI, a fitted encoder."""
    pyro.set_rng_seed(0)
    ex = linear_gaussian_exact(latent_dim=2, obs_dim=5, noise=0.5)
    d = ModelDensity(ex.model, "x")
    x, z = d.sample(N)
    with torch.no_grad():
        m = d.log_likelihood(x, z).double() - ex.log_px(x["x"])
    q = GaussianEncoder(d, hidden_sizes=(32,))
    fit_guide(d, q, num_steps=400, progress=False)
    return ex, d, x, z, m, q


def paired(diff):
    """Mean and standard error of paired differences (N,)."""
    diff = diff.double()
    return float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))


class ConstantCritic(nn.Module):
    def forward(self, x, z):
        return torch.full(torch.broadcast_shapes(x.shape[:-1], z.shape[:-1]), 3.7)


class OptimalCritic(nn.Module):
    """T* = log p(x|z) + log p(z) - log q(z|x) (Prop. 4.1): the IBAL then equals the MI."""

    def __init__(self, density, proposal):
        super().__init__()
        self.density, self.proposal = density, proposal

    def forward(self, xf, z):
        xf = xf.reshape(-1, *xf.shape[-2:])[0]
        x = {"x": xf}
        return self.density.log_joint(x, z) - self.proposal.log_prob(z, x)


def ba_per_point(d, q, x, z):
    with torch.no_grad():
        return q.log_prob(z, x) - d.log_prior(z, x)


def test_registered():
    assert METHODS["mine-ais"] is mine_ais_bounds


@pytest.mark.parametrize("base", ["encoder", "prior"])
def test_constant_critic_gives_ba_exactly(setup, base):
    ex, d, x, z, m, q = setup
    q = q if base == "encoder" else PriorProposal(d)
    r = ibal_bounds(d, q, {"x": x["x"][:64]}, z[:64], num_steps=10, critic=ConstantCritic(),
                    progress=False)
    ba = ba_per_point(d, q, {"x": x["x"][:64]}, z[:64])
    torch.testing.assert_close(r.lower_per_point, ba, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.diagnostics["ibal_upper_per_point"], ba, atol=1e-4, rtol=0)
    assert r.upper is None and r.notes and r.diagnostics["giwae_lower"] == pytest.approx(r.lower, abs=1e-4)


def test_one_step_is_giwae(setup):
    """With T = 1 the reverse chain's weight is T(x, z_i) and the bound is GIWAE with K = num_chains (App. M.2)."""
    ex, d, x, z, m, q = setup
    critic = OptimalCritic(d, q)
    K = 8
    r = ibal_bounds(d, q, x, z, num_chains=K, num_steps=1, critic=critic, progress=False)
    with torch.no_grad():
        t = critic(d.flatten_data(x), z)
    fwd, rev = r.diagnostics["log_weights_forward"], r.diagnostics["log_weights_reverse"]
    torch.testing.assert_close(rev[0], t, atol=1e-4, rtol=0)
    ba = ba_per_point(d, q, x, z)
    expected = ba + t - log_mean_exp(torch.cat([t.unsqueeze(0), fwd[: K - 1]]), 0)
    torch.testing.assert_close(r.lower_per_point, expected, atol=1e-4, rtol=0)
    assert bool((r.lower_per_point - ba <= math.log(K) + 1e-5).all())


def test_optimal_critic_recovers_true_mi(setup):
    """Prop. 4.1: IBAL(q, T*) = I. Paired against the exact per-point MI: the lower side is
    below it within 3 se, and close to it (the AIS gap is small on this path)."""
    ex, d, x, z, m, q = setup
    r = ibal_bounds(d, q, x, z, num_steps=100, critic=OptimalCritic(d, q), progress=False)
    low, se = paired(r.lower_per_point.double() - m)
    up, se_up = paired(r.diagnostics["ibal_upper_per_point"].double() - m)
    assert low <= 3 * se, (low, se)
    assert up >= -3 * se_up, (up, se_up)
    assert low > -0.03 and up < 0.03, (low, up)
    assert not r.warnings


def test_forward_and_reverse_close_as_num_steps_grows(setup):
    """From the prior (a long path), the IBAL sandwich of the optimal critic narrows with T."""
    ex, d, x, z, m, q = setup
    prior = PriorProposal(d)
    gaps = []
    for T in (3, 30, 300):
        r = ibal_bounds(d, prior, {"x": x["x"][:200]}, z[:200], num_steps=T, critic=OptimalCritic(d, prior),
                        generator=torch.Generator().manual_seed(1), progress=False)
        gaps.append(r.diagnostics["ibal_upper"] - r.lower)
    assert gaps[0] > gaps[1] > gaps[2] >= -0.01 and gaps[2] < 0.15, gaps


@pytest.mark.slow
@pytest.mark.parametrize("base", ["encoder", "prior"])
def test_mine_ais_is_a_lower_bound_above_ba(setup, base):
    """Trained MINE-AIS: below the exact MI within 3 se (paired), and at or above BA of its own base."""
    ex, d, x, z, m, q = setup
    pyro.set_rng_seed(3)
    base_q = q if base == "encoder" else PriorProposal(d)
    r = mine_ais_bounds(d, base_q, x, z, likelihood_steps=0, max_steps=400, eval_every=50, **FAST)
    low, se = paired(r.lower_per_point.double() - m)
    assert low <= 3 * se, (low, se)
    gain, se_gain = paired(r.lower_per_point - ba_per_point(d, r.diagnostics["proposal"], x, z))
    assert gain >= -3 * se_gain, (gain, se_gain)
    if base == "prior":  # from BA(p(z)) = 0 the critic has to learn all of the MI
        assert r.lower > 0.5 * ex.true_mi, r.lower
    assert r.diagnostics["training"].steps > 0


class Interrupt:
    """Wraps hmc.step to raise KeyboardInterrupt once, at its ``at``-th call."""

    def __init__(self, at):
        self.at, self.calls, self.step = at, 0, hmc.step

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.step(*args, **kwargs)


# hmc.step calls: 1-19 the initial validation (19 transitions), then 5 per training step and 19 per
# validation (every 10 steps), then the evaluation's pilot and chains (calls 227-249)
# (the likelihood critic's fit calls no hmc.step: the same counts hold with it)
def test_checkpoint_resumes_the_likelihood_critics_fit(setup, tmp_path, monkeypatch):
    """An interrupt during the likelihood critic's fit saves it: the resumed run fits only the rest
    and ends where the uninterrupted one did."""
    from pyro_mi.bounds.likelihood_critic import LikelihoodCritic

    ex, d, x, z, m, q = setup
    xs, zs = {"x": x["x"][:32]}, z[:32]
    calls = {"n": 0, "stop": None}
    log_likelihood = LikelihoodCritic.log_likelihood

    def counted(self, *args):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return log_likelihood(self, *args)

    monkeypatch.setattr(LikelihoodCritic, "log_likelihood", counted)

    def run(**kw):
        calls["n"] = 0
        pyro.set_rng_seed(5)
        return mine_ais_bounds(d, q, xs, zs, num_steps=20, max_steps=0, num_val=16, likelihood_steps=60,
                               generator=torch.Generator().manual_seed(0), **FAST, **kw)

    whole = run()
    total = calls["n"]
    path = tmp_path / "mine.ckpt"
    calls["stop"] = 45  # inside the fit (60 steps, a validation every 200)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=str(path), checkpoint_every=0.0)
    assert path.exists()
    calls["stop"] = None
    resumed = run(checkpoint=str(path))
    assert calls["n"] < total - 30, (calls["n"], total)  # the first 40-odd fit steps were not redone
    torch.testing.assert_close(resumed.lower_per_point, whole.lower_per_point, atol=0, rtol=0)


@pytest.mark.parametrize("at,likelihood", [(30, False), (80, False), (240, False), (240, True)],
                         ids=["training", "validation", "evaluation", "likelihood-critic"])
def test_checkpoint_resumes_to_the_same_result(setup, tmp_path, monkeypatch, at, likelihood):
    ex, d, x, z, m, q = setup
    xs, zs = {"x": x["x"][:32]}, z[:32]

    def run(**kw):
        pyro.set_rng_seed(5)
        return mine_ais_bounds(d, q, xs, zs, num_steps=20, max_steps=30, eval_every=10, num_val=16,
                               generator=torch.Generator().manual_seed(0), **FAST,
                               likelihood_steps=40 if likelihood else 0, **kw)

    whole = run()
    path = tmp_path / "mine.ckpt"
    monkeypatch.setattr(hmc, "step", Interrupt(at))
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=str(path))
    assert path.exists()
    monkeypatch.undo()
    resumed = run(checkpoint=str(path))
    assert not path.exists()
    torch.testing.assert_close(resumed.lower_per_point, whole.lower_per_point, atol=0, rtol=0)
    assert resumed.diagnostics["training"].steps == whole.diagnostics["training"].steps


def test_records_chains_for_arviz(setup):
    ex, d, x, z, m, q = setup
    pyro.set_rng_seed(0)
    r = mine_ais_bounds(d, q, {"x": x["x"][:16]}, z[:16], num_steps=8, max_steps=4, eval_every=2, num_val=8,
                        record=True, **FAST)
    idata = r.to_arviz()
    assert idata.posterior["z"].shape[:3] == (4, len(idata.posterior.draw), 16)  # the 4 forward chains at beta = 1
    assert idata.annealing["z"].shape[:3] == (5, len(idata.annealing.draw), 16)
    assert r.diagnostics["chains"]["coordinates"] == "whitened"


class Simulator(pyro.distributions.Normal):
    """A simulator: it samples, but has no density."""

    def log_prob(self, value):
        raise NotImplementedError


def simulator_model(x=None):
    z = pyro.sample("z", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
    loc = torch.cat([z, z.sum(-1, keepdim=True)], -1).tanh() * 3
    return pyro.sample("x", Simulator(loc, 0.3).to_event(1), obs=x)


def test_never_evaluates_the_likelihood():
    """MINE-AIS runs on a simulator without log p(x|z); a method that needs it names the site."""
    r = estimate_mi(simulator_model, "x", method="mine-ais", num_data=32, fit_steps=20, likelihood_steps=50,
                    max_steps=4, num_steps=5, num_val=8, progress=False)
    assert isinstance(r.diagnostics["critic"], LikelihoodCritic)
    assert math.isfinite(r.lower) and r.upper is None
    with pytest.raises(ValueError, match="site 'x': its distribution Simulator has no log_prob"):
        estimate_mi(simulator_model, "x", method="iwae", num_data=32, fit_steps=20, progress=False)


def test_bad_options_name_themselves(setup):
    ex, d, x, z, m, q = setup
    with pytest.raises(ValueError, match="num_negative_steps"):
        mine_ais_bounds(d, q, x, z, num_negative_steps=0, **FAST)
    with pytest.raises(TypeError, match="critic"):
        ibal_bounds(d, q, x, z, critic="T", progress=False)
    with pytest.raises(ValueError, match="proposal_lr applies only"):
        mine_ais_bounds(d, q, x, z, proposal_lr=1e-3, **FAST)
    with pytest.raises(ValueError, match="hidden_sizes"):
        mine_ais_bounds(d, q, x, z, critic=ConstantCritic(), **FAST)
    with pytest.raises(ValueError, match="likelihood_steps must be a non-negative integer"):
        mine_ais_bounds(d, q, x, z, likelihood_steps=-1, **FAST)
    with pytest.raises(ValueError, match="num_negative_steps applies to the energy-based training"):
        mine_ais_bounds(d, q, x, z, num_negative_steps=3, **FAST)  # the likelihood critic, no energy-based steps
    with pytest.raises(ValueError, match="likelihood_steps fits the likelihood critic"):
        mine_ais_bounds(d, q, x, z, critic=ConstantCritic(), likelihood_steps=5, progress=False)


def test_cli_json(capsys):
    code = main(["estimate", "--example", "linear-vae", "--method", "mine-ais", "--num-data", "32",
                 "--fit-steps", "20", "--likelihood-steps", "20", "--max-steps", "4", "--num-steps", "5",
                 "--num-negative-steps", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["method"] == "mine-ais" and out["upper"] is None and isinstance(out["lower"], float)
    assert out["notes"] and "ibal_upper" in out["diagnostics"] and "giwae_lower" in out["diagnostics"]
    assert out["num_negative_steps"] == 2 and out["likelihood_steps"] == 20
    assert main(["estimate", "--example", "linear-vae", "--method", "iwae", "--num-negative-steps", "2"]) == 2
    assert "--num-negative-steps does not apply to --method iwae" in capsys.readouterr().err


# ----------------------------------------------------------------- the likelihood critic
def test_likelihood_critic_terms(setup):
    """T = log N(x; f(z), s^2) + log p(z) - log q(z|x): the surrogate alone with the prior as base."""
    ex, d, x, z, m, q = setup
    torch.testing.assert_close(d.unflatten_data(d.flatten_data(x))["x"], x["x"])
    xf, zz = d.flatten_data(x)[:8], torch.randn(3, 8, 2)
    for base in (q, PriorProposal(d)):
        c = LikelihoodCritic(d, base, (16,))
        with torch.no_grad():
            lik = torch.distributions.Normal(c.f(zz), c.log_scale.exp()).log_prob(xf).sum(-1)
            torch.testing.assert_close(c.log_likelihood(xf, zz), lik)
            extra = d.log_prior(zz, {"x": xf}) - q.log_prob(zz, {"x": xf}) if base is q else 0
            torch.testing.assert_close(c(xf, zz), lik + extra)
    model, _, guide = linear_gaussian(2, 5, 0.5)[:3]
    with pytest.raises(ValueError, match="one-data-point model"):
        LikelihoodCritic(ModelDensity(linear_gaussian(2, 5, 0.5)[1], "x", data={"x": torch.zeros(4, 5)}), q)
    with pytest.raises(ValueError, match="base must be the prior or a GaussianEncoder"):
        LikelihoodCritic(d, GuideDensity(d, guide))


def test_exact_likelihood_critic_recovers_true_mi(setup):
    """Prop. 4.1 with the surrogate set to the true p(x|z) (f linear, f(z) = Wz + b, s = 0.5):
    from the encoder base, the IBAL equals the exact MI within the AIS gap, paired per point."""
    ex, d, x, z, m, q = setup
    W, b = linear_params(2, 5, 0)
    c = LikelihoodCritic(d, q, hidden_sizes=())
    with torch.no_grad():
        c.f[0].weight.copy_(W)
        c.f[0].bias.copy_(b)
        c.log_scale.fill_(math.log(0.5))
    r = ibal_bounds(d, q, x, z, num_steps=100, critic=c, progress=False)
    low, se = paired(r.lower_per_point.double() - m)
    assert low <= 3 * se and low > -0.03, (low, se)


@pytest.mark.parametrize("base", ["encoder", "prior"])
def test_likelihood_critic_is_a_lower_bound_near_truth(setup, base):
    """The default MINE-AIS critic (fitted surrogate likelihood, no energy-based steps): below the
    exact MI within 3 se (paired), close to it (measured: -0.013 ± 0.012 nats from the encoder,
    -0.084 ± 0.016 from the prior, whose 100-step AIS path is longer), and not below BA of its base
    (from the encoder, whose BA on this linear model is within 0.03 nats of the truth since the
    encoder has a linear part; above it by almost all of the MI, 3.12 nats, from the prior)."""
    ex, d, x, z, m, q = setup
    pyro.set_rng_seed(4)
    base_q = q if base == "encoder" else PriorProposal(d)
    r = mine_ais_bounds(d, base_q, x, z, likelihood_steps=1000, **FAST)
    assert r.settings["likelihood_steps"] == 1000 and r.settings["max_steps"] == 0
    assert r.diagnostics["training"].steps == 0 and r.diagnostics["likelihood_training"].steps > 0
    assert isinstance(r.diagnostics["critic"], LikelihoodCritic)
    low, se = paired(r.lower_per_point.double() - m)
    assert low <= 3 * se, (low, se)
    assert low > (-0.05 if base == "encoder" else -0.15), (low, se)
    gain, se_gain = paired(r.lower_per_point - ba_per_point(d, base_q, x, z))
    assert gain > (-2 if base == "encoder" else 0.9 * ex.true_mi / se_gain) * se_gain, (low, gain, se_gain)


def test_poorly_fitted_likelihood_critic_warns(setup):
    """A surrogate fitted for 5 steps bounds the MI far below BA of its base: the result says so."""
    ex, d, x, z, m, q = setup
    pyro.set_rng_seed(6)
    r = mine_ais_bounds(d, q, {"x": x["x"][:200]}, z[:200], likelihood_steps=5, num_steps=10, **FAST)
    low, se = paired(r.lower_per_point.double() - m[:200])
    assert low <= 3 * se  # still a bound
    assert any("below BA of its base" in w for w in r.warnings), r.warnings
