"""Small Pyro models with known MI, shared by the tests.

Each `make_*` returns (model, true_mi in nats). Models are one-data-point models
(observed site "x" samples when not conditioned) unless named `*_plate`.
"""

import math

import pyro
import pyro.distributions as dist
import torch


def linear_gaussian(latent_dim=2, obs_dim=3, noise=0.5, seed=0):
    """z ~ N(0, I), x | z ~ N(Wz + b, noise^2 I); MI = 1/2 logdet(I + WᵀW / noise^2)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(obs_dim, latent_dim, generator=g)
    b = torch.randn(obs_dim, generator=g)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(z @ W.T + b, noise).to_event(1), obs=x)

    def model_plate(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ W.T + b, noise).to_event(1), obs=x)

    def guide(x):
        # exact posterior mean, diagonal of the exact posterior scale: a decent user guide
        prec = torch.eye(latent_dim) + W.T @ W / noise**2
        cov = torch.linalg.inv(prec)
        loc = (x - b) @ (cov @ W.T / noise**2).T
        pyro.sample("z", dist.Normal(loc, cov.diagonal().sqrt()).to_event(1))

    true_mi = 0.5 * torch.logdet(torch.eye(latent_dim, dtype=torch.float64) + (W.T @ W).double() / noise**2)
    return model, model_plate, guide, float(true_mi)


def two_sites(noise=0.7):
    """a ~ N(0, 1), b ~ N(0, 1), x ~ N(a + 2b, noise^2); MI = 1/2 log(1 + 5 / noise^2)."""

    def model(x=None):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(a + 2 * b, noise), obs=x)

    return model, 0.5 * math.log(1 + 5 / noise**2)


def beta_binomial(alpha=2.0, beta=3.0, n=10):
    """p ~ Beta(alpha, beta), x ~ Binomial(n, p): MI = E log p(x|p) - E log p(x), exact marginal
    (beta-binomial) and a 200k-point midpoint rule over p for the conditional entropy."""

    def model(x=None):
        p = pyro.sample("p", dist.Beta(alpha, beta))
        return pyro.sample("x", dist.Binomial(n, p), obs=x)

    ks = torch.arange(n + 1, dtype=torch.float64)
    p_x = dist.BetaBinomial(torch.tensor(alpha, dtype=torch.float64), beta, n).log_prob(ks).exp()
    h_x = -(p_x * p_x.log()).sum()
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    w = dist.Beta(torch.tensor(alpha, dtype=torch.float64), beta).log_prob(grid).exp() / 200_000
    lp = dist.Binomial(n, grid.unsqueeze(-1)).log_prob(ks)
    h_x_given_p = -(w * (lp.exp() * lp).sum(-1)).sum()
    return model, float(h_x - h_x_given_p)


def param_vae_model(x):
    """The usual data-plate VAE, linear-Gaussian, with params "W" (D, d), "b", "sigma" in the param store."""
    W, b, sigma = pyro.param("W"), pyro.param("b"), pyro.param("sigma")
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(W.shape[1]), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)


def param_vae_guide(x):
    """Linear-Gaussian guide q(z|x) = N(Ax + c, diag q_scale^2) with params "A", "c", "q_scale"."""
    A, c, s = pyro.param("A"), pyro.param("c"), pyro.param("q_scale")
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A.T + c, s).to_event(1))
