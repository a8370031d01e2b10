"""The density layer against hand-written log densities, and its input errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from models import beta_binomial, linear_gaussian, two_sites
from pyro_mi import GuideDensity, ModelDensity


def test_linear_gaussian_log_terms_match_torch():
    pyro.set_rng_seed(0)
    model, _, _, _ = linear_gaussian()
    d = ModelDensity(model, "x")
    assert d.latent_dim == 2 and d.obs_shapes == {"x": torch.Size([3])}
    x, z = d.sample(5)
    zz = torch.randn(4, 3, 5, 2)  # arbitrary leading dims
    lp, ll = d.log_terms(x, zz)
    assert lp.shape == ll.shape == (4, 3, 5)
    torch.testing.assert_close(lp, dist.Normal(0.0, 1.0).log_prob(zz).sum(-1))
    tr = pyro.poutine.trace(pyro.poutine.condition(model, {"z": zz[0, 0]})).get_trace(x=x["x"])
    torch.testing.assert_close(ll[0, 0], tr.nodes["x"]["fn"].log_prob(x["x"]))


def test_constrained_latents_include_log_jacobian():
    pyro.set_rng_seed(1)

    def model(x=None):
        p = pyro.sample("p", dist.Beta(2.0, 3.0))
        pyro.sample("s", dist.Gamma(torch.full((2,), 2.0), 1.0).to_event(1))
        return pyro.sample("x", dist.Binomial(10, p), obs=x)

    d = ModelDensity(model, ("x",))
    assert [s.name for s in d.latent_sites] == ["p", "s"] and d.latent_dim == 3
    x, z = d.sample(6)
    lp, ll = d.log_terms(x, z)
    p, s = torch.sigmoid(z[:, 0]), z[:, 1:].exp()
    expected = (
        dist.Beta(2.0, 3.0).log_prob(p) + torch.log(p * (1 - p))
        + dist.Gamma(2.0, 1.0).log_prob(s).sum(-1) + z[:, 1:].sum(-1)
    )
    torch.testing.assert_close(lp, expected)
    torch.testing.assert_close(ll, dist.Binomial(10, p).log_prob(x["x"]))
    c = d.constrained(z)
    torch.testing.assert_close(c["p"], p)
    assert c["s"].shape == (6, 2)


def test_plate_model_matches_one_point_model():
    model, model_plate, _, _ = linear_gaussian()
    pyro.set_rng_seed(2)
    d1 = ModelDensity(model, "x")
    x1, z1 = d1.sample(7)
    pyro.set_rng_seed(2)
    d2 = ModelDensity(model_plate, "x", data=x1["x"])
    x2, z2 = d2.sample(7)
    torch.testing.assert_close(x1["x"], x2["x"])
    torch.testing.assert_close(z1, z2)
    zz = torch.randn(3, 7, 2)
    for a, b in zip(d1.log_terms(x1, zz), d2.log_terms(x1, zz)):
        torch.testing.assert_close(a, b)


def test_gradients_flow_to_z():
    model, _ = two_sites()
    d = ModelDensity(model, "x")
    x, z = d.sample(4)
    z = z.expand(3, 4, 2).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d.log_joint(x, z).sum(), z)
    assert g.shape == z.shape and torch.isfinite(g).all()


def test_guide_density_matches_distribution():
    model, _, guide, _ = linear_gaussian()
    d = ModelDensity(model, "x")
    q = GuideDensity(d, guide)
    x, _ = d.sample(5)
    z, log_q = q.rsample(x, 4)
    assert z.shape == (4, 5, 2) and log_q.shape == (4, 5)
    torch.testing.assert_close(log_q, q.log_prob(z, x))


# --------------------------------------------------------------- bad input
def test_missing_observed_site():
    model, _ = two_sites()
    with pytest.raises(ValueError, match="observed site 'y' is not a sample site"):
        ModelDensity(model, "y")


def test_discrete_latent_site():
    def model(x=None):
        k = pyro.sample("k", dist.Bernoulli(0.3))
        return pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    with pytest.raises(ValueError, match="latent site 'k' is discrete"):
        ModelDensity(model, "x")


def test_guide_missing_or_extra_site():
    model, _ = two_sites()
    d = ModelDensity(model, "x")

    def guide_missing(x):
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def guide_extra(x):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("c", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="does not sample latent site 'b'"):
        GuideDensity(d, guide_missing)
    with pytest.raises(ValueError, match="samples site 'c', which is not a latent site"):
        GuideDensity(d, guide_extra)


def test_non_finite_log_density_names_site():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        # a zero scale for z < 0 makes log p(x|z) non-finite at some simulated points
        return pyro.sample("x", dist.Normal(z, torch.relu(z)), obs=x)

    with pyro.validation_enabled(False), pytest.raises(ValueError, match="site 'x' is not finite"):
        ModelDensity(model, "x").sample(50)


def test_factor_site_is_not_a_latent():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -0.5 * z**2)
        return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    d = ModelDensity(model, "x")
    assert [s.name for s in d.latent_sites] == ["z"]
    x, z = d.sample(3)
    torch.testing.assert_close(d.log_prior(z, x), dist.Normal(0.0, 1.0).log_prob(z[:, 0]) - 0.5 * z[:, 0] ** 2)


def test_mismatched_shapes():
    model, _, _, _ = linear_gaussian()
    d = ModelDensity(model, "x")
    x, z = d.sample(4)
    with pytest.raises(ValueError, match="z has shape"):
        d.log_terms(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="z has shape"):
        d.log_terms(x, torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"x\['x'\] has per-point shape"):
        d.log_terms({"x": torch.zeros(4, 5)}, z)
    with pytest.raises(ValueError, match="observed sites are"):
        d.log_terms({"y": torch.zeros(4, 3)}, z)


def test_mismatched_data_points_between_sites():
    def model(x=None, y=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    d = ModelDensity(model, ("x", "y"))
    with pytest.raises(ValueError, match=r"x\['y'\] has 3 data points but x\['x'\] has 4"):
        d.log_terms({"x": torch.zeros(4), "y": torch.zeros(3)}, torch.zeros(4, 1))


def test_beta_binomial_truth_is_sane():
    _, mi = beta_binomial()
    assert 0.0 < mi < torch.log(torch.tensor(11.0))


def test_non_broadcasting_model_gets_clear_error():
    def model(x=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(mu, 1.0).expand([5]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="failed after site 'mu'.*broadcast"):
        ModelDensity(model, "x", vectorize="plate")
    assert ModelDensity(model, "x").vectorize == "vmap"  # "auto" runs it as written, point by point


def test_scale_is_refused_not_applied():
    # a scaled site is not a density of the model's joint (issue 32: a negative "MI" came out of
    # poutine.scale(10)); tests/test_catalogue_inputs.py has the mask
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.poutine.scale(scale=2.0):
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"site 'x' is scaled by 2.0"):
        ModelDensity(model, "x")


def _regression(mix=False):
    """A data-plate regression y_i ~ N(c_i z_i, 0.5) with a covariate c_i per point."""
    def model(cov, y=None):
        scale = cov.mean() if mix else cov  # mix: every point sees the whole batch
        with pyro.plate("data", cov.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            return pyro.sample("y", dist.Normal(scale * z, 0.5), obs=y)
    return model


@pytest.mark.parametrize("data", [torch.zeros(3), None], ids=["data", "covariates-alone"])
def test_covariates_follow_their_data_points(data):
    """With data, or with the covariates alone (the template simulated): the same draws."""
    cov = torch.tensor([0.5, 1.0, 2.0])
    d = ModelDensity(_regression(), "y", data=data, covariates={"cov": cov})
    assert d.has_data_plate and d.obs_shapes["y"] == torch.Size([])
    pyro.set_rng_seed(0)
    x, z = d.sample(7)  # point i has covariate i % 3
    pyro.set_rng_seed(0)
    torch.testing.assert_close(ModelDensity(_regression(), "y", data=torch.zeros(3), covariates={"cov": cov}).sample(7),
                               (x, z))
    c = cov[torch.arange(7) % 3]
    lp, ll = d.log_terms(x, z)
    torch.testing.assert_close(ll, dist.Normal(c * z[:, 0], 0.5).log_prob(x["y"]))
    torch.testing.assert_close(lp, dist.Normal(0.0, 1.0).log_prob(z[:, 0]))
    zk = torch.randn(5, 7, 1)
    torch.testing.assert_close(d.log_likelihood(x, zk), dist.Normal(c * zk[..., 0], 0.5).log_prob(x["y"]))


def test_covariates_mixed_across_points_are_refused():
    with pytest.raises(ValueError, match="depends on the other points"):
        ModelDensity(_regression(mix=True), "y", data=torch.zeros(3), covariates={"cov": torch.tensor([0.5, 1.0, 2.0])})
    with pytest.raises(ValueError, match="one row per data point"):
        ModelDensity(_regression(), "y", data=torch.zeros(3), covariates={"cov": torch.ones(2)})
    with pytest.raises(ValueError, match="data-plate model"):
        ModelDensity(two_sites()[0], "x", covariates={"cov": torch.ones(2)})


def test_data_plate_model_that_does_not_broadcast_over_chains_runs_folded():
    """expand(own batch shape), as glmm's normal-inverse-gamma model writes it: the chains run as
    rows of the model's data plate, with the same draws and densities as the broadcasting model."""
    def model(y=None, rigid=True):
        n = y.shape[0]
        with pyro.plate("data", n):
            tau = pyro.sample("tau", dist.Gamma(3.0, 3.0))
            sd = tau.rsqrt().expand((n,)) if rigid else tau.rsqrt()
            return pyro.sample("y", dist.Normal(0.0, sd), obs=y)

    template = torch.zeros(4)
    with pytest.raises(ValueError, match="failed after site 'tau'"):
        ModelDensity(model, "y", data=template, vectorize="plate")
    folded = ModelDensity(model, "y", data=template)
    plain = ModelDensity(lambda y=None: model(y, rigid=False), "y", data=template)
    assert (folded.vectorize, plain.vectorize) == ("fold", "plate") and "folded" in folded.notices[0]
    runs = []
    for d in (folded, plain):
        pyro.set_rng_seed(0)
        x, z = d.sample(6)
        zk = torch.randn(3, 6, 1)
        runs.append((x["y"], z, *d.log_terms(x, zk), d.prior_log_likelihood(x, 5)))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_log_likelihood_at_the_sampled_pairs_comes_from_their_draw():
    """At the (x, z) that sample() returned, log p(x|z) is the draw's own (no model run), equal to the
    recomputed one within rounding; x or z changed in place, or other tensors, are scored afresh."""
    def model():
        w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.Normal(w, 1.0).expand([3]).to_event(1))

    pyro.set_rng_seed(0)
    d = ModelDensity(model, "y")
    x, z = d.sample(50)
    drawn = d.log_likelihood(x, z)
    torch.testing.assert_close(drawn, d.log_terms(x, z)[1])
    assert d.log_likelihood(x, z) is drawn
    assert d.log_likelihood(x, z.clone()) is not drawn
    z.add_(1.0)
    fresh = d.log_likelihood(x, z)
    assert fresh is not drawn and not torch.allclose(fresh, drawn)
    torch.testing.assert_close(fresh, d.log_terms(x, z)[1])


def test_the_draws_own_log_densities_serve_a_constrained_latent_and_every_site():
    """A Gamma precision's round trip through log and exp is not bit-exact in float32: the draw's own log
    densities still serve (no model run), equal to those scored at the unpacked z within rounding, for
    log p(x|z) and for every site (drawn_log_probs); None at other tensors."""
    def model():
        tau = pyro.sample("tau", dist.Gamma(3.0, 3.0))
        w = pyro.sample("w", dist.Normal(0.0, tau.rsqrt()))
        pyro.sample("y", dist.Normal(w, tau.rsqrt()).expand([4]).to_event(1))

    d = ModelDensity(model, "y")
    pyro.set_rng_seed(1)
    with torch.no_grad():
        tau = d._draw(1, 500)[0]["tau"]
    assert not torch.equal(d.unpack(d.pack({"tau": tau, "w": tau}))["tau"], tau)  # rounding: the case in hand
    pyro.set_rng_seed(1)
    x, z = d.sample(500)
    drawn = d.drawn_log_probs(x, z)
    assert set(drawn) == {"tau", "w", "y"} and d.log_likelihood(x, z) is d.log_likelihood(x, z)
    scored = d.site_log_probs(d.unpack(z[None]), x, 1, 500)
    for k in drawn:
        torch.testing.assert_close(drawn[k], scored[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.log_likelihood(x, z), d.log_terms(x, z)[1], rtol=1e-5, atol=1e-5)
    assert d.drawn_log_probs(x, z.clone()) is None
