"""BA and IWAE bounds against analytic and exact-marginal MI.

Tolerances: a bound may overshoot the truth only by Monte-Carlo error over the
simulated data points, so each check allows 3 standard errors of that bound.
"""

import math

import pyro
import pytest
import torch

from models import beta_binomial, linear_gaussian, two_sites
from pyro_mi import GaussianEncoder, ModelDensity, PriorProposal, estimate_mi, fit_guide
from pyro_mi.bounds import importance
from pyro_mi import weights
from pyro_mi.bounds.importance import ba_bounds, iwae_bounds


def brackets(r, truth, z=3.0):
    return r.lower - z * r.lower_stderr <= truth <= r.upper + z * r.upper_stderr


@pytest.mark.parametrize("proposal", ["prior", "guide"])
def test_iwae_brackets_linear_gaussian(proposal):
    model, _, _, truth = linear_gaussian()
    r = estimate_mi(model, "x", method="iwae", proposal=proposal, num_data=500, num_particles=200,
                    fit_steps=300, progress=False)
    assert brackets(r, truth), (r.lower, r.upper, truth)
    assert r.gap < (1.0 if proposal == "prior" else 0.3)
    assert abs(r.lower - truth) < 4 * r.lower_stderr + 0.3


def test_two_latent_sites_brackets():
    model, truth = two_sites()
    r = estimate_mi(model, "x", method="iwae", num_data=500, num_particles=100, fit_steps=300, progress=False)
    assert brackets(r, truth), (r.lower, r.upper, truth)
    assert r.gap < 0.1


def test_beta_binomial_conjugate_brackets():
    model, truth = beta_binomial()
    r = estimate_mi(model, "x", method="iwae", num_data=1000, num_particles=100, fit_steps=300, progress=False)
    assert brackets(r, truth), (r.lower, r.upper, truth)
    assert r.gap < 0.05
    ba = estimate_mi(model, "x", method="ba", num_data=1000, num_particles=20, fit_steps=300, progress=False)
    assert brackets(ba, truth) and ba.lower <= r.lower + 1e-6 and ba.upper >= r.upper - 1e-6


def test_user_guide_is_used():
    model, _, guide, truth = linear_gaussian()
    r = estimate_mi(model, "x", method="ba", guide=guide, num_data=500, num_particles=10, progress=False)
    assert brackets(r, truth)
    assert "fit" not in r.diagnostics


def _fixture(K_fit=200):
    model, _, _, truth = linear_gaussian(latent_dim=3, obs_dim=5, noise=0.3)
    pyro.set_rng_seed(0)
    d = ModelDensity(model, "x")
    x, z = d.sample(200)
    q = GaussianEncoder(d)
    fit_guide(d, q, num_steps=K_fit, progress=False)
    return d, q, x, z, truth


def test_iwae_tightens_with_K_and_respects_log_K():
    d, q, x, z, truth = _fixture()
    ba = ba_bounds(d, q, x, z, progress=False)
    prev = None
    for K in (1, 10, 100, 1000):
        pyro.set_rng_seed(1)
        r = iwae_bounds(d, q, x, z, num_particles=K, progress=False)
        if K == 1:  # IWAE with one sample is BA on the same draw (its lower side exactly)
            torch.testing.assert_close(r.lower_per_point, ba.lower_per_point)
        # IWAE lower <= BA lower + log K, per data point (Brekelmans et al. 2022, App. B.2)
        assert (r.lower_per_point <= ba.lower_per_point + math.log(K) + 1e-4).all()
        if prev is not None:
            assert r.lower >= prev.lower - 0.02 and r.upper <= prev.upper + 0.02
        prev = r
    assert prev.gap < 0.1 and brackets(prev, truth)


def test_streaming_matches_direct_computation(monkeypatch):
    """K split into many chunks gives the same bounds as one logsumexp over the same draws."""
    d, q, x, z, _ = _fixture(K_fit=50)
    draws = []

    class Recording:
        def rsample(self, x_, k):
            zk, lq = q.rsample(x_, k)
            draws.append((zk, lq))
            return zk, lq

        def log_prob(self, z_, x_):
            return q.log_prob(z_, x_)

    monkeypatch.setattr(importance, "CHUNK_NUMBERS", 7 * 200 * (d.latent_dim + d.obs_dim))  # 7 particles a chunk
    with torch.no_grad():
        r = iwae_bounds(d, Recording(), x, z, num_particles=50, progress=False)
        assert len(draws) == 8
        zk = torch.cat([a for a, _ in draws])
        lq = torch.cat([b for _, b in draws])
        log_w = d.log_joint(x, zk) - lq
        lp, ll = d.log_terms(x, z)
        log_w_true = lp + ll - q.log_prob(z, x)
        elbo = torch.logsumexp(log_w, 0) - math.log(50)
        eubo = torch.logsumexp(torch.cat([log_w_true[None], log_w[:49]]), 0) - math.log(50)
    torch.testing.assert_close(r.upper_per_point, ll - elbo)
    torch.testing.assert_close(r.lower_per_point, ll - eubo)


def test_log_weight_sums_match_logsumexp():
    """One exp pass gives the three logsumexps, with gradients, where the head lies 300 nats below the
    rest (a head scaled by the overall largest weight would underflow to -inf), where every weight of a
    point is 0, and for an empty head or rest."""
    g = torch.Generator().manual_seed(0)
    log_w = (torch.randn(40, 6, generator=g) * 20).requires_grad_()
    with torch.no_grad():
        log_w[-1, 1] += 300.0
        log_w[:, 2] = -math.inf
    for head in (0, 1, 39, 40):
        got = weights.log_weight_sums(log_w, head)
        want = (torch.logsumexp(log_w[:head], 0), torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        grads = [torch.autograd.grad(v[torch.isfinite(v)].sum(), log_w)[0] for v in (got[1], want[1])]
        torch.testing.assert_close(grads[0], grads[1], equal_nan=True)  # nan where every weight is 0, as logsumexp
    assert weights.log_weight_sums(log_w, 39)[0][1] > -math.inf


def test_leave_one_out_log_ratios():
    """log(S_(-j) / S) against logsumexp without draw j, with and without a kept weight,
    where one weight dominates by 500 nats (w_j / S rounds to 1: the exact fallback) and by 5."""
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(9, 4, 3, generator=g) * 10
    log_w[2, 1, 1] += 500.0
    log_w[5, 0, 2] += 5.0
    keep = torch.randn(4, 3, generator=g) * 10
    for kept in (None, keep):
        total = torch.logsumexp(log_w, 0) if kept is None else torch.logaddexp(torch.logsumexp(log_w, 0), kept)
        without = torch.stack([torch.logsumexp(torch.cat([log_w[:j], log_w[j + 1:]]), 0) for j in range(9)])
        if kept is not None:
            without = torch.logaddexp(without, kept)
        got = weights.leave_one_out_log_ratios(log_w, total, kept)
        torch.testing.assert_close(got, without - total, rtol=1e-5, atol=1e-4)
        assert torch.isfinite(got).all()


def test_large_K_runs_in_chunks():
    model, _ = two_sites()
    pyro.set_rng_seed(0)
    d = ModelDensity(model, "x")
    x, z = d.sample(64)
    r = iwae_bounds(d, PriorProposal(d), x, z, num_particles=100_000, progress=False)
    assert r.gap < 0.01 and math.isfinite(r.lower)


def test_same_seed_same_numbers():
    model, _ = two_sites()
    a = estimate_mi(model, "x", num_data=32, num_particles=10, fit_steps=20, progress=False, seed=3)
    b = estimate_mi(model, "x", num_data=32, num_particles=10, fit_steps=20, progress=False, seed=3)
    assert (a.lower, a.upper) == (b.lower, b.upper)


def test_plate_and_one_point_models_give_same_numbers():
    model, model_plate, _, _ = linear_gaussian()
    template = torch.zeros(40, 3)
    a = estimate_mi(model, "x", num_data=40, num_particles=20, fit_steps=30, progress=False)
    b = estimate_mi(model_plate, "x", data=template, num_data=40, num_particles=20, fit_steps=30, progress=False)
    assert a.lower == pytest.approx(b.lower, abs=1e-5) and a.upper == pytest.approx(b.upper, abs=1e-5)


def test_bad_method_and_particles():
    model, _ = two_sites()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        estimate_mi(model, "x", method="nope")
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        estimate_mi(model, "x", num_particles=0, fit_steps=1, progress=False)
    with pytest.raises(ValueError, match="proposal must be 'prior', 'guide' or a function of the density, got 'posterior'"):
        estimate_mi(model, "x", proposal="posterior", progress=False)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    latent_dim=st.integers(1, 3),
    obs_dim=st.integers(1, 4),
    num_data=st.integers(2, 6),
    K=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_property_shapes_and_log_K_ordering(latent_dim, obs_dim, num_data, K, seed):
    model, _, _, _ = linear_gaussian(latent_dim, obs_dim, noise=0.5, seed=seed)
    pyro.set_rng_seed(seed)
    d = ModelDensity(model, "x")
    x, z = d.sample(num_data)
    q = PriorProposal(d)
    ba = ba_bounds(d, q, x, z, progress=False)
    r = iwae_bounds(d, q, x, z, num_particles=K, progress=False)
    assert r.lower_per_point.shape == r.upper_per_point.shape == (num_data,)
    assert torch.isfinite(r.lower_per_point).all() and torch.isfinite(r.upper_per_point).all()
    assert (r.lower_per_point <= ba.lower_per_point + math.log(K) + 1e-4).all()
    zz = torch.randn(2, 3, num_data, latent_dim)
    assert d.log_joint(x, zz).shape == (2, 3, num_data)
