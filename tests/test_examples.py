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


# ---------------------------------------------------------------- registry


def test_registry_names_and_bad_name():
    assert EXAMPLES == ("linear-vae", "digits-vae")
    for name in EXAMPLES:
        ex = get_example(name)
        assert isinstance(ex, Example) and ex.name == name and ex.obs_sites == ("x",)
    with pytest.raises(ValueError, match="linear-vae.*digits-vae"):
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
