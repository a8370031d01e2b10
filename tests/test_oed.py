"""pyro_mi.eig: EIG bounds per design against analytic values, nuisance latents, gradients.

Linear-Gaussian models have exact per-point values log p(y_i|θ_i) - log p(y_i), so the
bounds are tested by paired differences (3 standard errors of the paired difference).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.contrib.oed import glmm

import pyro_mi
from pyro_mi.oed import design_batch_shape
from pyro_mi.design_density import DesignDensity

COEF_SD = torch.tensor([1.0, 0.5])


def linear_model():
    return glmm.known_covariance_linear_model(torch.tensor(0.0), COEF_SD, torch.tensor(1.0))


def designs(batch=3, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(n, 2, generator=g) * s for s in torch.linspace(0.3, 2.0, batch)])


def exact_linear(X, w, y, noise=1.0, prior_cov=None):
    """log p(y|w) - log p(y) per point for y = X w + N(0, noise^2 I), w ~ N(0, prior_cov)."""
    prior_cov = torch.diag(COEF_SD**2) if prior_cov is None else prior_cov
    n = X.shape[0]
    marginal = dist.MultivariateNormal(torch.zeros(n), X @ prior_cov @ X.T + noise**2 * torch.eye(n))
    return dist.Normal(w @ X.T, noise).log_prob(y).sum(-1) - marginal.log_prob(y)


def assert_paired(lower, upper, exact, z=3.0, draws_variance=(0.0, 0.0)):
    """Per-point lower and upper estimates bound ``exact`` in expectation (paired, z se; the
    variance over draws shared by the points, if any, added: ``exact`` does not depend on them)."""
    for side, sign, values, var in (("lower", 1, lower, draws_variance[0]), ("upper", -1, upper, draws_variance[1])):
        diff = values - exact
        se = (float(diff.var()) / diff.numel() + var) ** 0.5
        assert sign * float(diff.mean()) <= z * se + 1e-6, (side, float(diff.mean()), se)


def assert_paired_bounds(result, exact, z=3.0):
    var = tuple(result.diagnostics.get(f"{side}_draws_variance", 0.0) for side in ("lower", "upper"))
    assert_paired(result.lower_per_point, result.upper_per_point, exact, z, var)


def test_design_batch_from_the_model_plates():
    assert design_batch_shape(linear_model(), designs()) == (3,)
    assert design_batch_shape(linear_model(), designs()[0]) == ()


@pytest.mark.parametrize("share", [False, True])
def test_linear_eig_per_design_brackets_the_analytic_value(share):
    X = designs()
    r = pyro_mi.eig(linear_model(), X, "y", "w", num_data=600, num_particles=300, share_particles=share)
    assert r.results[0].settings["share_particles"] is share
    assert r.lower.shape == r.upper.shape == r.lower_stderr.shape == (3,)
    truth = torch.stack([0.5 * torch.logdet(torch.eye(8) + x @ torch.diag(COEF_SD**2) @ x.T) for x in X])
    assert torch.all(r.lower - 3 * r.lower_stderr <= truth) and torch.all(truth <= r.upper + 3 * r.upper_stderr)
    for x, res in zip(X, r.results):  # paired, per simulated experiment
        w = res.z  # w is unconstrained: packed z is w itself
        assert_paired_bounds(res, exact_linear(x, w, res.x["y"]))


def test_a_design_batch_gives_the_single_runs():
    """Together: one run of B·N experiments split per design agrees with each design run alone
    (4 combined se); one by one: bit for bit."""
    X = designs()
    batch = pyro_mi.eig(linear_model(), X, "y", num_data=400, num_particles=50)
    assert [r.settings["designs"] for r in batch.results] == ["together"] * 3
    for b in range(3):
        single = pyro_mi.eig(linear_model(), X[b], "y", num_data=400, num_particles=50, seed=b + 1)
        assert single.lower.shape == () and batch.results[b].num_data == 400
        for side in ("lower", "upper"):
            se = float(torch.hypot(getattr(batch, f"{side}_stderr")[b], getattr(single, f"{side}_stderr")))
            assert abs(float(getattr(batch, side)[b] - getattr(single, side))) < 4 * se
    apart = pyro_mi.eig(linear_model(), X, "y", num_data=50, num_particles=20, vectorize="vmap")
    assert "ran one at a time" in apart.results[0].notes[-1]
    for b in range(3):
        single = pyro_mi.eig(linear_model(), X[b], "y", num_data=50, num_particles=20, vectorize="vmap")
        torch.testing.assert_close(apart.results[b].lower_per_point, single.results[0].lower_per_point)
        torch.testing.assert_close(apart.upper[b], single.upper)


def test_shared_prior_draws_score_every_experiment():
    """A design's K prior draws, shared by its experiments, give log p(y_i|θ_k) as the model does
    at each (y_i, θ_k), for a design batch (row i % B) and for one design."""
    X = designs()
    batch = pyro_mi.oed._designs_density(linear_model(), X, ("y",))
    one = DesignDensity(linear_model(), "y", model_args=(X[1],))
    for density, rows in ((batch, X), (one, X[1:2])):
        x, _ = density.sample(12)
        log_lik, z = density.shared_prior_likelihood(7)
        got = log_lik(x)  # (K, n)
        assert got.shape == (7, 12) and z.shape == (7, len(rows), 2)
        for i in range(12):
            r = i % len(rows)
            want = dist.Normal(z[:, r] @ rows[r].T, 1.0).log_prob(x["y"][i]).sum(-1)
            torch.testing.assert_close(got[:, i], want)
    def late(design):  # a latent after y: its draws would depend on each experiment's y
        pyro.sample("late", dist.Normal(linear_model()(design).sum(-1), 1.0))

    def two(design):  # y2's distribution depends on y
        pyro.sample("y2", dist.Normal(linear_model()(design).sum(-1), 1.0))

    for model, obs in ((late, "y"), (two, ("y", "y2"))):
        density = DesignDensity(model, obs, model_args=(X[0],))
        assert "one observed site, sampled after every other site" in density.shared_prior_reason()
        with pytest.raises(ValueError, match="cannot be shared"):
            density.shared_prior_likelihood(3)


def test_shared_draws_standard_errors_cover_the_spread_over_seeds():
    """The K prior draws of a design are shared by its N experiments, so the experiments are
    correlated; the jackknife variance over the draws, added to each standard error, makes it
    match the spread of the bounds over 200 seeds (within 25%; it was within 12%, where the
    per-point standard error alone was up to 1.5 times too small, on the NMC side), and the means
    over seeds bound the truth."""
    X = designs()
    truth = torch.stack([0.5 * torch.logdet(torch.eye(8) + x @ torch.diag(COEF_SD**2) @ x.T) for x in X])
    runs = [pyro_mi.eig(linear_model(), X, "y", num_data=100, num_particles=30, share_particles=True, seed=s)
            for s in range(200)]
    for side, sign in (("lower", 1), ("upper", -1)):
        means = torch.stack([getattr(r, side) for r in runs])
        stderrs = torch.stack([getattr(r, f"{side}_stderr") for r in runs]).mean(0)
        naive = torch.tensor([[float(getattr(res, f"{side}_per_point").std()) / 10 for res in r.results]
                              for r in runs]).mean(0)
        spread = means.std(0)
        assert torch.all(spread < 1.25 * stderrs) and torch.all(stderrs < 1.25 * spread), (side, spread, stderrs)
        assert torch.all(stderrs >= naive)
        assert torch.all(sign * (means.mean(0) - truth) <= 3 * spread / 200**0.5), (side, means.mean(0), truth)


def test_shared_and_per_point_particles_agree():
    """The same design batch with shared particles and with K particles per experiment: the same
    bounds within 4 combined standard errors; share_particles where they cannot be shared is
    refused with the reason."""
    X = designs()
    shared = pyro_mi.eig(linear_model(), X, "y", num_data=400, num_particles=100, share_particles=True)
    apart = pyro_mi.eig(linear_model(), X, "y", num_data=400, num_particles=100, seed=1)
    for side in ("lower", "upper"):
        se = torch.hypot(getattr(shared, f"{side}_stderr"), getattr(apart, f"{side}_stderr"))
        assert torch.all((getattr(shared, side) - getattr(apart, side)).abs() < 4 * se)
    nig = glmm.normal_inverse_gamma_linear_model(torch.tensor(0.0), torch.ones(2), torch.tensor(3.0), torch.tensor(3.0))
    for kwargs, why in (({"num_particles": 5}, "num_particles must be at least 10"),
                        ({"points_per_block": 100}, "option 'points_per_block' applies to per-point draws"),
                        ({"method": "ba"}, "needs method 'iwae' with the prior proposal"),
                        ({"model": nig, "target_labels": "w"}, "nuisance latents \\['tau'\\]"),
                        ({"model": nig}, "the model runs fold, not batched")):
        args = {"model": linear_model(), "design": X, "observation_labels": "y", "num_data": 20, **kwargs}
        with pytest.raises(ValueError, match=why):
            pyro_mi.eig(**args, share_particles=True)


def test_shared_particles_are_an_iwae_option():
    """``IWAE(share_particles=True)`` is what ``share_particles=True`` runs (the same numbers); each
    design's standard errors add the jackknife variance of its own experiments' leave-one-draw-out
    values; K < 10 is refused when declared, and estimate_mi's density, which draws per point, at run."""
    X = designs()
    short = pyro_mi.eig(linear_model(), X, "y", num_data=100, num_particles=20, share_particles=True, seed=4)
    declared = pyro_mi.eig(linear_model(), X, "y", num_data=100, seed=4,
                           bound=pyro_mi.bounds.IWAE(num_particles=20, share_particles=True))
    for a, b in zip(short.results, declared.results):
        torch.testing.assert_close(a.lower_per_point, b.lower_per_point, rtol=0, atol=0)
        assert (a.lower_stderr, a.upper_stderr) == (b.lower_stderr, b.upper_stderr)
        for side in ("lower", "upper"):
            left_out = a.diagnostics[f"{side}_jackknife"]  # (m, 100): this design's experiments only
            assert left_out.shape == (20 if side == "upper" else 19, 100)
            t = left_out.double().mean(1)
            points = getattr(a, f"{side}_per_point").double()
            want = (points.var() / 100 + (len(t) - 1) * t.var(correction=0)) ** 0.5
            assert math.isclose(getattr(a, f"{side}_stderr"), float(want), rel_tol=1e-6)
    with pytest.raises(ValueError, match="num_particles must be at least 10"):
        pyro_mi.bounds.IWAE(num_particles=5, share_particles=True)

    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(w, 1.0))

    with pytest.raises(ValueError, match="estimate_mi's density draws particles per point"):
        pyro_mi.estimate_mi(model, "y", num_data=20, proposal="prior", bound=pyro_mi.bounds.IWAE(num_particles=20, share_particles=True))


def test_nuisance_latents_are_marginalised():
    """y = X θ + ψ 1 + ε with a nuisance offset ψ ~ N(0, s²): exact per-point EIG about θ."""
    X = designs(batch=1, n=6)[0]
    s, noise = 1.5, 0.7

    def model(design):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), COEF_SD).to_event(1))
        psi = pyro.sample("psi", dist.Normal(0.0, s))
        return pyro.sample("y", dist.Normal(theta @ design.T + psi.unsqueeze(-1), noise).to_event(1))

    r = pyro_mi.eig(model, X, "y", "theta", num_data=600, num_particles=2000, num_nuisance=1000)
    res = r.results[0]
    assert res.settings["nuisance"] == ["psi"] and "marginalised" in res.notes[-1]
    theta, y = res.z[:, :2], res.x["y"]
    n = X.shape[0]
    noise_cov = noise**2 * torch.eye(n) + s**2 * torch.ones(n, n)
    given_theta = dist.MultivariateNormal(theta @ X.T, noise_cov).log_prob(y)
    marginal = dist.MultivariateNormal(torch.zeros(n), X @ torch.diag(COEF_SD**2) @ X.T + noise_cov).log_prob(y)
    assert_paired_bounds(res, given_theta - marginal)
    # θ's prior does not depend on ψ: its log p(θ) bounds are exact and equal
    torch.testing.assert_close(res.diagnostics["log_p_theta_lower"], res.diagnostics["log_p_theta_upper"])
    # the gap is small at this K and M
    assert float(r.upper - r.lower) < 0.1


def test_nuisance_the_target_prior_depends_on():
    """Pyro's normal-inverse-gamma model: τ ~ Gamma(α, β), w ~ N(0, 1/(τλ)), y ~ N(X w, 1/τ), target w.
    r(τ|w) is τ's prior, not p(τ|w): the log p(θ) bounds matter. Exact per-point EIG
    log p(y, w) - log p(w) - log p(y), each a Normal-Gamma integral over τ in closed form."""
    X = designs(batch=1, n=6)[0]
    a, b, lam = 3.0, 3.0, 2.0
    model = glmm.normal_inverse_gamma_linear_model(torch.tensor(0.0), torch.full((2,), lam**0.5), torch.tensor(a),
                                                   torch.tensor(b))
    r = pyro_mi.eig(model, X, "y", "w", num_data=600, num_particles=1000, num_nuisance=1000)
    res = r.results[0]
    assert res.settings["nuisance"] == ["tau"]
    w, y = res.z[:, 1:], res.x["y"]  # z packs the latents in trace order: tau, then w

    def normal_gamma(k, quad, log_det=0.0):  # log ∫ Gamma(τ; a, b) N_k(0, S/τ) at quadratic form quad dτ
        return (a * math.log(b) - math.lgamma(a) + torch.lgamma(torch.tensor(a + k / 2))
                - (a + k / 2) * torch.log(b + quad / 2) - k / 2 * math.log(2 * math.pi) - log_det / 2)

    p, n = 2, X.shape[0]
    S = torch.eye(n) + X @ X.T / lam
    log_p_y = normal_gamma(n, (y @ torch.linalg.inv(S) * y).sum(-1), torch.logdet(S))
    log_p_w = normal_gamma(p, lam * (w * w).sum(-1), -p * math.log(lam))
    log_p_yw = normal_gamma(p + n, lam * (w * w).sum(-1) + ((y - w @ X.T) ** 2).sum(-1), -p * math.log(lam))
    assert_paired_bounds(res, log_p_yw - log_p_w - log_p_y)
    # the estimates of log p(w) and log p(y, w) bound their exact values too
    d = res.diagnostics
    assert_paired(d["log_p_theta_lower"], d["log_p_theta_upper"], log_p_w)
    assert_paired(d["log_p_y_theta_lower"], d["log_p_y_theta_upper"], log_p_yw)
    assert float(r.upper - r.lower) < 0.2


@pytest.mark.parametrize("share", [False, True])
def test_gradients_match_finite_differences(share):
    torch.set_default_dtype(torch.float64)
    try:
        X = designs(batch=1, n=4)[0].double()

        def lower(design):
            return pyro_mi.eig(linear_model(), design, "y", num_data=64, num_particles=16,
                               differentiable=True, share_particles=share).lower

        d = X.clone().requires_grad_()
        (grad,) = torch.autograd.grad(lower(d), d)
        h = 1e-5
        for i, j in [(0, 0), (1, 1), (3, 0)]:
            e = torch.zeros_like(X)
            e[i, j] = h
            fd = (lower(X + e) - lower(X - e)) / (2 * h)
            torch.testing.assert_close(grad[i, j], fd.detach(), rtol=1e-5, atol=1e-7)
        assert float(grad.abs().sum()) > 0
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", ["known_cov", "nig", "logistic", "group", "lmer", "sigmoid"])
def test_pyro_glmm_models_run_unchanged(name):
    X = designs(batch=2, n=6)
    models = {
        "known_cov": (glmm.known_covariance_linear_model(torch.tensor(0.0), COEF_SD, torch.tensor(1.0)), X, ["w"]),
        "nig": (glmm.normal_inverse_gamma_linear_model(torch.tensor(0.0), torch.ones(2), torch.tensor(3.0),
                                                       torch.tensor(3.0)), X, ["w"]),
        "logistic": (glmm.logistic_regression_model(torch.tensor(0.0), COEF_SD), X, ["w"]),
        "group": (glmm.group_linear_model(torch.tensor(0.0), torch.ones(1), torch.tensor(0.0), torch.ones(1),
                                          torch.tensor(1.0)), X, ["w1"]),
        "lmer": (glmm.lmer_model(torch.ones(2), 2, torch.full((2,), 2.0), torch.full((2,), 2.0)),
                 torch.cat([X, torch.eye(2).repeat(2, 3, 2)], -1), ["w"]),
        "sigmoid": (glmm.sigmoid_model(torch.tensor(0.0), torch.ones(1), torch.tensor(0.0), torch.ones(1),
                                       torch.tensor(1.0), torch.tensor(2.0), torch.tensor(2.0), torch.ones(6, 1)),
                    X, ["w1"]),
    }
    model, design, targets = models[name]
    r = pyro_mi.eig(model, design, "y", targets, batch_dims=1, num_data=100, num_particles=50, num_nuisance=50)
    assert r.lower.shape == (2,) and torch.isfinite(r.lower).all() and torch.isfinite(r.upper).all()
    assert torch.all(r.lower <= r.upper + 3 * (r.lower_stderr + r.upper_stderr))
    # designs run together where the design plate encloses the model (nig and lmer expand their
    # draws to the design batch: their chains run folded into the design plate)
    assert r.results[0].settings["designs"] == ("one by one" if name == "sigmoid" else "together")
    if name == "sigmoid":  # it samples k outside its plates
        assert "ran one at a time" in r.results[0].notes[-1] and "'k'" in r.results[0].notes[-1]


def test_bad_requests_are_refused():
    X = designs()
    logistic = glmm.logistic_regression_model(torch.tensor(0.0), COEF_SD)
    with pytest.raises(ValueError, match="site 'y'.*no rsample"):
        pyro_mi.eig(logistic, X, "y", differentiable=True, num_data=10)
    with pytest.raises(ValueError, match="differentiable=True supports"):
        pyro_mi.eig(linear_model(), X, "y", method="ais", differentiable=True)
    group = glmm.group_linear_model(torch.tensor(0.0), torch.ones(1), torch.tensor(0.0), torch.ones(1),
                                    torch.tensor(1.0))
    with pytest.raises(ValueError, match="nuisance latents.*must bound log p"):
        pyro_mi.eig(group, X, "y", "w1", method="ba", num_data=10)
    with pytest.raises(ValueError, match="target_labels"):
        pyro_mi.eig(linear_model(), X, "y", "nope", num_data=10)
    with pytest.raises(ValueError, match="batch_dims"):
        pyro_mi.eig(linear_model(), X, "y", batch_dims=3)

    def nuisance_model(design, factor=False, late=False):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        psi = pyro.sample("psi", dist.Normal(0.0, 1.0))
        if factor:  # the nuisance weights would leave this term out
            pyro.factor("penalty", -(psi**2))
        y = pyro.sample("y", dist.Normal(theta @ design.T + psi.unsqueeze(-1), 1.0).to_event(1))
        if late:
            pyro.sample("late", dist.Normal(y.sum(-1), 1.0))
        return y

    with pytest.raises(ValueError, match="site 'penalty' is a pyro.factor"):
        pyro_mi.eig(lambda d: nuisance_model(d, factor=True), X[0], "y", "theta", num_data=10)
    with pytest.raises(ValueError, match="latent site 'late' is sampled after observation site 'y'"):
        pyro_mi.eig(lambda d: nuisance_model(d, late=True), X[0], "y", "theta", num_data=10)


def test_pyro_oed_tutorial_model_runs_unchanged():
    """The model of Pyro's OED tutorial (working memory): θ ~ N(7, 2²), one Bernoulli answer
    with logit θ - l per length l; a batch of lengths is a plate_stack. True EIG by quadrature."""
    prior_mean, prior_sd = torch.tensor(7.0), torch.tensor(2.0)

    def model(l):
        with pyro.plate_stack("plate", l.shape[:-1]):
            theta = pyro.sample("theta", dist.Normal(prior_mean, prior_sd))
            theta = theta.unsqueeze(-1)
            logit_p = 1.0 * (theta - l)
            return pyro.sample("y", dist.Bernoulli(logits=logit_p).to_event(1))

    lengths = torch.tensor([[4.0], [7.0], [12.0]])
    r = pyro_mi.eig(model, lengths, "y", "theta", num_data=1000, num_particles=200)
    assert r.batch_shape == (3,)
    theta = torch.linspace(-13, 27, 40_001, dtype=torch.float64)
    weight = torch.distributions.Normal(7.0, 2.0).log_prob(theta).exp() * (theta[1] - theta[0])

    def entropy(p):
        return -(p * p.log() + (1 - p) * (1 - p).log())

    for b, l in enumerate(lengths[:, 0].double()):
        p = torch.sigmoid(theta - l).clamp(1e-300, 1 - 1e-16)
        truth = float(entropy((weight * p).sum()) - (weight * entropy(p)).sum())
        assert float(r.lower[b] - 3 * r.lower_stderr[b]) <= truth <= float(r.upper[b] + 3 * r.upper_stderr[b])


def test_a_probed_model_is_not_probed_again_and_gives_the_same_numbers(monkeypatch):
    """A second call on the same model with designs of the same shape reuses the first call's probe
    (DesignDensity.with_values) and gives what a fresh probe gives, bit for bit; a model whose sites
    change with the design's values is probed anew."""
    from pyro_mi import oed
    from pyro_mi.density import ModelDensity

    model, first, second = linear_model(), designs(seed=0), designs(seed=1)
    for d in (first, first[0]):  # a design batch (run together), and one design
        oed._PROBED.clear()
        pyro_mi.eig(model, d, "y", num_data=64, num_particles=20)
        probes = []
        monkeypatch.setattr(ModelDensity, "_probe", lambda self, v, real=ModelDensity._probe: probes.append(1)
                            or real(self, v))
        cached = pyro_mi.eig(model, second if d.dim() == 3 else second[0], "y", num_data=64, num_particles=20)
        assert probes == []
        monkeypatch.undo()
        oed._PROBED.clear()
        fresh = pyro_mi.eig(model, second if d.dim() == 3 else second[0], "y", num_data=64, num_particles=20)
        assert torch.equal(cached.lower, fresh.lower) and torch.equal(cached.upper, fresh.upper)

    def switching(design):  # a site that only a positive design has
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        if design.sum() > 0:
            theta = theta + pyro.sample("extra", dist.Normal(0.0, 0.1))
        return pyro.sample("y", dist.Normal(theta * design, 1.0).to_event(1))

    oed._PROBED.clear()
    pyro_mi.eig(switching, -torch.ones(3), "y", "theta", num_data=64, num_particles=20)
    after = pyro_mi.eig(switching, torch.ones(3), "y", "theta", num_data=64, num_particles=20, num_nuisance=10)
    oed._PROBED.clear()
    alone = pyro_mi.eig(switching, torch.ones(3), "y", "theta", num_data=64, num_particles=20, num_nuisance=10)
    assert any("nuisance" in n for n in after.results[0].notes)  # "extra" is marginalised
    assert torch.equal(after.lower, alone.lower) and torch.equal(after.upper, alone.upper)


def test_a_list_of_designs_of_different_shapes_runs_in_one_call():
    """A list of single designs: each shape runs as one batch, and design i's bounds are what a call
    on a batch of the designs of its shape gives, in the list's order."""
    model = linear_model()
    short, long = designs(batch=2, n=4, seed=0), designs(batch=2, n=8, seed=1)
    mixed = [short[0], long[0], short[1], long[1]]
    r = pyro_mi.eig(model, mixed, "y", num_data=64, num_particles=20)
    assert r.batch_shape == (4,) and r.lower.shape == (4,)
    by_shape = {4: pyro_mi.eig(model, short, "y", num_data=64, num_particles=20),
                8: pyro_mi.eig(model, long, "y", num_data=64, num_particles=20)}
    for i, d in enumerate(mixed):
        batch = by_shape[d.shape[0]]
        assert r.lower[i] == batch.lower[i // 2] and r.upper[i] == batch.upper[i // 2]
    with pytest.raises(TypeError, match="list of tensors"):
        pyro_mi.eig(model, [short[0], "x"], "y")
    with pytest.raises(ValueError, match="batch_dims"):
        pyro_mi.eig(model, mixed, "y", batch_dims=1)


def test_each_design_result_holds_its_own_points_and_is_judged_alone():
    """A design batch runs as one bound over B·N points; each design's result is made of its own
    points (MIResult.select): its per-point diagnostics (point axis last) and point indices are its
    own, and its warnings are judged on its points (assess per design)."""
    X = designs()
    r = pyro_mi.eig(linear_model(), X, "y", method="ais", num_data=16, num_chains=2, num_steps=10)
    for b, res in enumerate(r.results):
        assert res.num_data == 16 and res.z.shape[0] == 16
        assert res.diagnostics["log_weights_forward"].shape[-1] == 16
        assert res.diagnostics["step_sizes"].shape[-1] == 16
        assert all(0 <= i < 16 for i in res.diagnostics.get("refined_points", []))
        assert res.ceiling is None and float(res.lower_per_point.mean()) == pytest.approx(float(r.lower[b]))
        assert res.diagnostics["ess"] == pytest.approx(float(res.diagnostics["ess_per_point"].mean()))


def test_select_renumbers_points_and_judges_a_crossing_afresh():
    lower = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    upper = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    whole = pyro_mi.MIResult("iwae", lower_per_point=lower, upper_per_point=upper, warnings=["kept"],
                             diagnostics={"ess_per_point": torch.arange(6.0), "log_w": torch.zeros(3, 6),
                                          "dominant_points": [1, 2], "points_centred": [3, 4, 5], "ess": 2.0})
    assert whole.gap == 0 and not whole.derived
    odd = whole.select(torch.tensor([1, 3, 5]))  # lower 1 > upper 0 at points 1 and 3: a crossing of their own
    assert torch.equal(odd.diagnostics["ess_per_point"], torch.tensor([1.0, 3.0, 5.0])) and odd.diagnostics["ess"] == 3.0
    assert odd.diagnostics["log_w"].shape == (3, 3) and odd.diagnostics["dominant_points"] == [0]
    assert odd.diagnostics["points_centred"] == [1, 2]
    assert odd.warnings[0] == "kept" and odd.derived and odd.derived[0] in odd.notes + odd.warnings
    again = odd.select(torch.tensor([1, 2]))  # points 3 and 5 of the whole: a crossing is not carried
    assert not any(d in again.warnings + again.notes for d in odd.derived)


def test_a_results_checks_run_again_on_each_selection():
    """A bound's warnings that depend on its points (MIResult.checks: IWAE's low ESS) are derived again
    for each selection of the points, not copied from the whole."""
    def low_mean(r):
        return ["low"] if float(r.diagnostics["ess_per_point"].mean()) < 1.5 else []

    lower, upper = torch.zeros(4), torch.ones(4)
    whole = pyro_mi.MIResult("iwae", lower_per_point=lower, upper_per_point=upper, checks=(low_mean,),
                             diagnostics={"ess_per_point": torch.tensor([1.0, 1.0, 3.0, 3.0])})
    assert whole.warnings == []  # mean 2
    assert whole.select(torch.tensor([0, 1])).warnings == ["low"]
    assert whole.select(torch.tensor([2, 3])).warnings == []
