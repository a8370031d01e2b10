"""Tests of the built-in example models (``pyro_mi.examples``): fast, deterministic."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_mi.examples import EXAMPLES, Example, get_example
from pyro_mi.examples.linear_vae import linear_vae_params, make_linear_vae


def _sample_sites(trace) -> dict:
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


@pytest.fixture(scope="module")
def digits():
    from pyro_mi.examples.digits_vae import load_digits_data

    return get_example("digits-vae"), load_digits_data()


@pytest.fixture(scope="module")
def gan():
    from pyro_mi.examples.digits_vae import load_digits_data

    return get_example("digits-gan"), load_digits_data()


# ---------------------------------------------------------------- registry


def test_registry_names_and_bad_name():
    assert EXAMPLES == ("linear-vae", "digits-vae", "digits-gan")
    for name in EXAMPLES:
        ex = get_example(name)
        assert isinstance(ex, Example) and ex.name == name and ex.obs_sites == ("x",)
    with pytest.raises(ValueError, match="linear-vae.*digits-vae.*digits-gan"):
        get_example("no-such-model")


# ---------------------------------------------------------------- linear VAE


def test_linear_vae_true_mi_matches_direct_logdet():
    ex = get_example("linear-vae")
    W, b = linear_vae_params(seed=0, latent_dim=10, obs_dim=100)
    assert torch.equal(W, ex.params["W"]) and torch.equal(b, ex.params["b"])
    W64 = W.double()
    direct = 0.5 * torch.logdet(torch.eye(100, dtype=torch.float64) + W64 @ W64.T).item()
    assert ex.true_mi == pytest.approx(direct, rel=1e-6)
    # Gaussian entropy identity: H(x) - H(x|z), with Cov x = W W^T + I, Cov x|z = I.
    k = 100
    h_x = dist.MultivariateNormal(b.double(), W64 @ W64.T + torch.eye(k, dtype=torch.float64)).entropy()
    h_x_given_z = 0.5 * k * (1.0 + math.log(2 * math.pi))
    assert ex.true_mi == pytest.approx(h_x.item() - h_x_given_z, rel=1e-6)
    assert ex.true_mi > 0


def test_linear_vae_noise_scale_and_seed():
    ex = make_linear_vae(seed=3, latent_dim=4, obs_dim=7, noise_scale=2.0)
    W = ex.params["W"].double()
    expected = 0.5 * torch.logdet(torch.eye(7, dtype=torch.float64) + W @ W.T / 4.0).item()
    assert ex.true_mi == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(ex.params["W"], make_linear_vae(seed=4, latent_dim=4, obs_dim=7).params["W"])
    with pytest.raises(ValueError):
        make_linear_vae(noise_scale=0.0)
    with pytest.raises(ValueError):
        make_linear_vae(latent_dim=0)


def test_linear_vae_trace_shapes_and_broadcasting():
    ex = get_example("linear-vae")
    sites = _sample_sites(poutine.trace(ex.model).get_trace())
    assert list(sites) == ["z", "x"]
    assert sites["z"]["value"].shape == (10,) and sites["x"]["value"].shape == (100,)
    assert not sites["x"]["is_observed"]
    with pyro.plate("c", 3, dim=-2), pyro.plate("d", 5, dim=-1):
        tr = poutine.trace(ex.model).get_trace()
    tr.compute_log_prob()
    sites = _sample_sites(tr)
    assert sites["z"]["value"].shape == (3, 5, 10)
    assert sites["x"]["value"].shape == (3, 5, 100)
    assert sites["x"]["log_prob"].shape == (3, 5)


def test_linear_vae_conditioning_and_obs_keyword():
    ex = get_example("linear-vae")
    x = torch.randn(5, 100)
    with pyro.plate("d", 5, dim=-1):
        tr_kw = poutine.trace(ex.model).get_trace(x=x)
        tr_cond = poutine.trace(poutine.condition(ex.model, data={"x": x})).get_trace()
    for tr in (tr_kw, tr_cond):
        assert tr.nodes["x"]["is_observed"] and torch.equal(tr.nodes["x"]["value"], x)
        assert tr.nodes["z"]["value"].shape == (5, 10)


def test_linear_vae_exact_guide_is_the_posterior():
    ex = make_linear_vae(seed=1, latent_dim=3, obs_dim=6, noise_scale=0.7, exact_guide=True)
    W, b, s = ex.params["W"].double(), ex.params["b"].double(), ex.params["noise_scale"]
    x = torch.randn(4, 6)
    with pyro.plate("d", 4, dim=-1):
        q = poutine.trace(ex.guide).get_trace(x=x)
        p = poutine.trace(poutine.replay(ex.model, trace=q)).get_trace(x=x)
    q.compute_log_prob()
    p.compute_log_prob()
    log_joint = p.nodes["z"]["log_prob"] + p.nodes["x"]["log_prob"]
    marginal = dist.MultivariateNormal(b, W @ W.T + s**2 * torch.eye(6, dtype=torch.float64))
    log_post = log_joint.double() - marginal.log_prob(x.double())  # Bayes' rule
    assert torch.allclose(q.nodes["z"]["log_prob"].double(), log_post, atol=1e-4)
    assert get_example("linear-vae").guide is None


# ---------------------------------------------------------------- digits VAE


def test_digits_vae_data(digits):
    _, X = digits
    assert X.shape == (1797, 64) and X.dtype == torch.float32
    assert X.min() >= 0 and X.max() <= 1


def test_digits_vae_model_and_guide_batched(digits):
    ex, X = digits
    assert ex.true_mi is None and ex.guide is not None
    assert ex.params["obs_scale"] >= 0.05
    sites = _sample_sites(poutine.trace(ex.model).get_trace())
    assert sites["z"]["value"].shape == (8,) and sites["x"]["value"].shape == (64,)
    x = X[:15].reshape(3, 5, 64)
    with pyro.plate("c", 3, dim=-2), pyro.plate("d", 5, dim=-1):
        q = poutine.trace(ex.guide).get_trace(x=x)
        p = poutine.trace(poutine.replay(poutine.condition(ex.model, data={"x": x}), trace=q)).get_trace()
        prior = poutine.trace(ex.model).get_trace()
    for tr in (q, p, prior):
        tr.compute_log_prob()
    assert q.nodes["z"]["value"].shape == (3, 5, 8)
    assert torch.equal(p.nodes["z"]["value"], q.nodes["z"]["value"])
    assert prior.nodes["x"]["value"].shape == (3, 5, 64)
    for lp in (q.nodes["z"]["log_prob"], p.nodes["x"]["log_prob"], prior.nodes["x"]["log_prob"]):
        assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    # weights are frozen, but gradients still flow to the latent value
    vae = ex.params["vae"]
    assert not any(prm.requires_grad for prm in vae.parameters())
    z = torch.zeros(8, requires_grad=True)
    tr = poutine.trace(poutine.condition(ex.model, data={"z": z, "x": X[0]})).get_trace()
    torch.autograd.grad(tr.log_prob_sum(), z)
    with pytest.raises(ValueError):
        ex.guide()


def test_digits_vae_reconstructs_better_than_data_mean(digits):
    ex, X = digits
    vae = ex.params["vae"]
    loc, scale = vae.encoder(X)
    recon_mse = ((vae.decoder(loc) - X) ** 2).mean()
    mean_mse = ((X.mean(0) - X) ** 2).mean()
    assert recon_mse < 0.25 * mean_mse
    assert (scale > 0).all()


# ---------------------------------------------------------------- digits GAN


def test_digits_gan_shipped_weights_load(gan):
    from importlib import resources

    from pyro_mi.examples.digits_gan import DEFAULTS, Generator, load_digits_gan

    ex, _ = gan
    assert ex.true_mi is None and ex.guide is None and ex.obs_sites == ("x",)
    g = ex.params["generator"]
    assert isinstance(g, Generator) and g.hparams == DEFAULTS
    assert ex.params["obs_scale"] == 0.1 == g.obs_scale
    assert not any(prm.requires_grad for prm in g.parameters()) and not g.training
    assert all(prm.dtype == torch.float32 for prm in g.parameters())
    assert g.metadata["method"] == "WGAN-GP" and math.isfinite(g.metadata["val_mmd2"])
    ref = resources.files("pyro_mi.examples").joinpath("digits_gan.pt")
    with resources.as_file(ref) as path:
        assert path.stat().st_size < 1_000_000
        again = load_digits_gan(str(path))
    for a, b in zip(g.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        load_digits_gan("/no/such/digits_gan.pt")
    with pytest.raises(ValueError):
        Generator(obs_scale=0.0)


def test_digits_gan_trace_shapes_and_broadcasting(gan):
    ex, X = gan
    sites = _sample_sites(poutine.trace(ex.model).get_trace())
    assert list(sites) == ["z", "x"]
    assert sites["z"]["value"].shape == (10,) and sites["x"]["value"].shape == (64,)
    assert not sites["x"]["is_observed"]
    with pyro.plate("c", 3, dim=-2), pyro.plate("d", 5, dim=-1):
        prior = poutine.trace(ex.model).get_trace()
        x = X[:15].reshape(3, 5, 64)
        cond = poutine.trace(poutine.condition(ex.model, data={"x": x})).get_trace()
        kw = poutine.trace(ex.model).get_trace(x=x)
    for tr in (prior, cond, kw):
        tr.compute_log_prob()
        assert tr.nodes["z"]["value"].shape == (3, 5, 10)
        assert tr.nodes["x"]["value"].shape == (3, 5, 64)
        for name in ("z", "x"):
            lp = tr.nodes[name]["log_prob"]
            assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    for tr in (cond, kw):
        assert tr.nodes["x"]["is_observed"] and torch.equal(tr.nodes["x"]["value"], x)


def test_digits_gan_log_likelihood_is_the_fixed_scale_gaussian(gan):
    ex, X = gan
    g = ex.params["generator"]
    z = torch.randn(16, 10)
    with pyro.plate("d", 16, dim=-1):
        tr = poutine.trace(poutine.condition(ex.model, data={"z": z, "x": X[:16]})).get_trace()
    tr.compute_log_prob()
    expected = dist.Normal(g(z), 0.1).log_prob(X[:16]).sum(-1)
    assert torch.allclose(tr.nodes["x"]["log_prob"], expected, atol=1e-4)
    assert torch.isfinite(expected).all()
    # gradients flow to the latent value although the weights are frozen
    z0 = torch.zeros(10, requires_grad=True)
    tr = poutine.trace(poutine.condition(ex.model, data={"z": z0, "x": X[0]})).get_trace()
    (grad,) = torch.autograd.grad(tr.log_prob_sum(), z0)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_digits_gan_means_in_unit_interval_and_look_like_digits(gan):
    from pyro_mi.examples.digits_gan import DEFAULTS, Generator, mmd2

    ex, X = gan
    g = ex.params["generator"]
    means = g.sample_means(500, generator=torch.Generator().manual_seed(0))
    assert means.shape == (500, 64) and (means >= 0).all() and (means <= 1).all()
    real = X[torch.randperm(1797, generator=torch.Generator().manual_seed(1))[:500]]
    torch.manual_seed(0)
    untrained = Generator(**DEFAULTS).sample_means(500)
    trained_mmd, untrained_mmd = mmd2(means, real), mmd2(untrained, real)
    assert trained_mmd < 0.05 and untrained_mmd > 1.0
    # the generator does not collapse: its means vary across z about as much as the digits do
    assert 0.5 < means.var(0).sum() / X.var(0).sum() < 1.5


def test_digits_gan_seed_determinism(gan):
    ex, _ = gan
    values = []
    for _ in range(2):
        pyro.set_rng_seed(123)
        with pyro.plate("d", 4, dim=-1):
            tr = poutine.trace(ex.model).get_trace()
        values.append((tr.nodes["z"]["value"], tr.nodes["x"]["value"]))
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])
    pyro.set_rng_seed(124)
    assert not torch.equal(poutine.trace(ex.model).get_trace().nodes["z"]["value"], values[0][0][0])


def test_mmd2_criterion():
    from pyro_mi.examples.digits_gan import mmd2

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=gen), torch.randn(300, 5, generator=gen)
    assert abs(mmd2(a, b)) < 0.02 < mmd2(a, b + 1.0)
    assert mmd2(a, b + 1.0) < mmd2(a, b + 3.0)
    for bad in ((a, b[:, :4]), (a[:1], b), (a[0], b)):
        with pytest.raises(ValueError):
            mmd2(*bad)
    with pytest.raises(ValueError):
        mmd2(a, b, bandwidths=())


def test_digits_gan_iwae_bracket_runs(gan):
    import pyro_mi

    ex, _ = gan
    r = pyro_mi.estimate_mi(ex.model, ex.obs_sites, method="iwae", num_data=64, num_particles=16,
                            fit_steps=50, seed=0, progress=False)
    assert r.x["x"].shape == (64, 64) and r.z.shape == (64, 10)
    assert math.isfinite(r.lower) and math.isfinite(r.upper)
    assert 0 < r.lower < r.upper


# ------------------------------------------------------------------ shipped encoders
@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_encoder_is_the_fit_of_the_current_code(name):
    """Each example's shipped encoder is the encoder that estimate_mi fits at its defaults (seed 0,
    N = 1024, 1000 BA steps): a refit now reaches the same held-out BA (within 0.02 nats, float
    differences between machines aside) and the same prior weight, so the file is not stale."""
    import pyro_mi
    from pyro_mi.examples import shipped_encoder
    from pyro_mi.proposal import GaussianEncoder, fit_guide

    ex = get_example(name)
    build = shipped_encoder(name)
    assert build is not None
    fitted, loaded = [], []

    def fit(density):
        q = GaussianEncoder(density)
        fit_guide(density, q, num_steps=1000, progress=False)
        fitted.append(q)
        loaded.append(build(density))
        return q

    pyro_mi.estimate_mi(ex.model, ex.obs_sites, method="ba", proposal=fit, num_data=1024, seed=0, progress=False)
    new, old = fitted[0], loaded[0]
    assert abs(new.fit_log.best_value - old.fit_log.best_value) < 0.02, (new.fit_log.best_value, old.fit_log.best_value)
    assert new.prior_weight == old.prior_weight
    assert old.fit_log.steps == new.fit_log.steps


def test_shipped_encoder_refuses_other_dimensions():
    from pyro_mi import ModelDensity
    from pyro_mi.examples import shipped_encoder

    ex = get_example("linear-vae", latent_dim=3)
    with pytest.raises(ValueError, match=r"shipped encoder of 'linear-vae' is for \(obs_dim, latent_dim\)"):
        shipped_encoder("linear-vae")(ModelDensity(ex.model, ex.obs_sites))


def test_cli_example_loads_its_encoder_unless_asked_to_fit(capsys):
    import json

    from pyro_mi.cli import main

    for extra, shipped in (([], True), (["--fit-steps", "50"], False)):
        assert main(["estimate", "--example", "linear-vae", "--method", "ba", "--num-data", "64", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert ("shipped encoder" in out["proposal"]) == shipped, out["proposal"]
