"""Small Pyro models with known MI, shared by the tests.

Each `make_*` returns (model, true_mi in nats). Models are one-data-point models
(observed site "x" samples when not conditioned) unless named `*_plate`.
"""

import itertools
import math
from typing import Callable, NamedTuple

import pyro
import pyro.distributions as dist
import torch


def linear_params(latent_dim, obs_dim, seed):
    """W (obs_dim, latent_dim) and b (obs_dim,) with N(0, 1) entries drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(obs_dim, latent_dim, generator=g), torch.randn(obs_dim, generator=g)


def linear_gaussian(latent_dim=2, obs_dim=3, noise=0.5, seed=0):
    """z ~ N(0, I), x | z ~ N(Wz + b, noise^2 I); MI = 1/2 logdet(I + WᵀW / noise^2)."""
    W, b = linear_params(latent_dim, obs_dim, seed)

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


# ---------------------------------------------------------------- exact per-point marginals
# One-data-point models (observed site "x") whose marginal log p(x) is known in closed form,
# for the paired exact-validity tests (tests/test_validity.py, benchmarks/validity_table.py):
# each point's MI is m_i = log p(x_i | z_i) - log p(x_i) exactly.


class ExactModel(NamedTuple):
    """A one-data-point model with an exact marginal.

    Attributes:
        name: short name used in test ids and tables.
        model: the Pyro model ``model(x=None)``, observed site ``"x"``.
        log_px: exact log p(x) in nats, float64: x (N, *event) -> (N,).
        true_mi: I(x; z) in nats.
    """

    name: str
    model: Callable
    log_px: Callable[[torch.Tensor], torch.Tensor]
    true_mi: float


def linear_gaussian_exact(latent_dim=5, obs_dim=40, noise=0.5, seed=0) -> ExactModel:
    """z ~ N(0, I_d), x | z ~ N(Wz + b, noise^2 I_D) with W, b ~ N(0, 1) drawn from ``seed``.

    The marginal is x ~ N(b, W Wᵀ + noise^2 I_D) and I = 1/2 logdet(I_d + WᵀW / noise^2).
    """
    W, b = linear_params(latent_dim, obs_dim, seed)
    model = linear_gaussian(latent_dim, obs_dim, noise, seed)[0]
    W64, b64 = W.double(), b.double()
    marginal = torch.distributions.MultivariateNormal(
        b64, covariance_matrix=W64 @ W64.T + noise**2 * torch.eye(obs_dim, dtype=torch.float64)
    )

    def log_px(x):
        return marginal.log_prob(x.double())

    mi = 0.5 * torch.logdet(torch.eye(latent_dim, dtype=torch.float64) + W64.T @ W64 / noise**2)
    return ExactModel(f"linear-gaussian-{latent_dim}x{obs_dim}", model, log_px, float(mi))


def two_sites_exact(noise=0.7) -> ExactModel:
    """The two-site model of :func:`two_sites` (a, b ~ N(0, 1), x ~ N(a + 2b, noise^2)):
    x ~ N(0, 5 + noise^2) exactly."""
    model, mi = two_sites(noise)
    scale = math.sqrt(5.0 + noise**2)

    def log_px(x):
        return torch.distributions.Normal(0.0, scale).log_prob(x.double())

    return ExactModel("two-sites", model, log_px, mi)


def beta_binomial_exact(alpha=2.0, beta=3.0, n=10) -> ExactModel:
    """The model of :func:`beta_binomial` (p ~ Beta(alpha, beta), x ~ Binomial(n, p)):
    x ~ BetaBinomial(alpha, beta, n) exactly."""
    model, mi = beta_binomial(alpha, beta, n)
    c1, c0 = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)

    def log_px(x):
        return dist.BetaBinomial(c1, c0, n).log_prob(x.double())

    return ExactModel("beta-binomial", model, log_px, mi)


def gamma_poisson_exact(shape=3.0, rate=1.0) -> ExactModel:
    """lam ~ Gamma(shape, rate), x ~ Poisson(lam): x ~ NegativeBinomial(shape, 1 / (1 + rate)).

    I = E[lam log lam] - E[lam] - E[log x!] - E[log p(x)], with E[lam log lam] =
    (shape / rate)(digamma(shape + 1) - log rate) and the sums over x truncated where
    the tail is below 1e-12.
    """

    def model(x=None):
        lam = pyro.sample("lam", dist.Gamma(shape, rate))
        return pyro.sample("x", dist.Poisson(lam), obs=x)

    marginal = torch.distributions.NegativeBinomial(
        total_count=torch.tensor(shape, dtype=torch.float64),
        probs=torch.tensor(1.0 / (1.0 + rate), dtype=torch.float64),
    )

    def log_px(x):
        return marginal.log_prob(x.double())

    ks = torch.arange(0, 2000, dtype=torch.float64)
    lp = marginal.log_prob(ks)
    p = lp.exp()
    mean = shape / rate
    e_lam_log_lam = mean * (float(torch.digamma(torch.tensor(shape + 1.0, dtype=torch.float64))) - math.log(rate))
    mi = e_lam_log_lam - mean - float((p * torch.lgamma(ks + 1)).sum()) - float((p * lp).sum())
    return ExactModel("gamma-poisson", model, log_px, mi)


def dirichlet_multinomial_exact(alpha=(0.7, 1.5, 2.0, 0.9), n=20) -> ExactModel:
    """p ~ Dirichlet(alpha) (a simplex latent), x ~ Multinomial(n, p): x ~ DirichletMultinomial exactly.

    I = E[log p(x|p)] - E[log p(x)], both exact: E[log p(x|p)] = log n! + n sum_j
    (alpha_j / alpha_0)(digamma(alpha_j + 1) - digamma(alpha_0 + 1)) - E[sum_j log x_j!], and
    the expectations over x by enumerating every count vector.
    """
    conc = torch.tensor(alpha)

    def model(x=None):
        p = pyro.sample("p", dist.Dirichlet(conc))
        return pyro.sample("x", dist.Multinomial(n, p), obs=x)

    marginal = dist.DirichletMultinomial(conc.double(), n)

    def log_px(x):
        return marginal.log_prob(x.double())

    k = len(alpha)
    xs = torch.tensor([c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n], dtype=torch.float64)
    xs = torch.cat([xs, n - xs.sum(-1, keepdim=True)], -1)  # every count vector (outcomes, k)
    lpx = marginal.log_prob(xs)
    px = lpx.exp()
    a = conc.double()
    e_x_log_p = n * (a / a.sum() * (torch.digamma(a + 1) - torch.digamma(a.sum() + 1))).sum()
    e_log_lik = math.lgamma(n + 1) + float(e_x_log_p) - float((px * torch.lgamma(xs + 1).sum(-1)).sum())
    return ExactModel("dirichlet-multinomial", model, log_px, e_log_lik - float((px * lpx).sum()))


def normal_gamma_exact(shape=2.0, rate=2.0, dim=5) -> ExactModel:
    """tau ~ Gamma(shape, rate), x | tau ~ N(0, I_dim / tau): x is a multivariate Student t with
    2 shape degrees of freedom and scale rate / shape, exactly.

    I = h(x) - h(x|tau), with h(x|tau) = dim/2 log(2 pi e) - dim/2 E[log tau],
    E[log tau] = digamma(shape) - log rate, and the Student t entropy in closed form.
    """

    def model(x=None):
        tau = pyro.sample("tau", dist.Gamma(shape, rate))
        scale = tau.rsqrt().unsqueeze(-1).expand(tau.shape + (dim,))
        return pyro.sample("x", dist.Normal(0.0, scale).to_event(1), obs=x)

    def log_px(x):
        s = (x.double() ** 2).sum(-1)
        return (shape * math.log(rate) + math.lgamma(shape + dim / 2) - math.lgamma(shape)
                - dim / 2 * math.log(2 * math.pi) - (shape + dim / 2) * torch.log(rate + s / 2))

    nu, a = 2 * shape, (shape + dim / 2)
    dg = lambda v: float(torch.digamma(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    h_x = (dim / 2 * math.log(rate / shape) + dim / 2 * math.log(nu * math.pi) + math.lgamma(nu / 2)
           - math.lgamma(a) + a * (dg(a) - dg(nu / 2)))
    h_x_tau = dim / 2 * math.log(2 * math.pi * math.e) - dim / 2 * (dg(shape) - math.log(rate))
    return ExactModel("normal-gamma", model, log_px, h_x - h_x_tau)


#: name -> constructor (default arguments) of the exact-marginal models
EXACT_MODELS = {
    "linear-gaussian": linear_gaussian_exact,
    "two-sites": two_sites_exact,
    "beta-binomial": beta_binomial_exact,
    "gamma-poisson": gamma_poisson_exact,
    "dirichlet-multinomial": dirichlet_multinomial_exact,
    "normal-gamma": normal_gamma_exact,
}


def paired_sides(result, log_marginal) -> list[tuple[float, float]]:
    """(lower - truth, upper - truth) of a result with per-point log p(x) bounds, each (mean, standard
    error) over its points: paired per point against the exact ``log_marginal(x) -> (N,)``."""
    exact = log_marginal(result.x).double()
    out = []
    for key in ("log_p_x_upper", "log_p_x_lower"):
        d = exact - result.diagnostics[key].double()
        out.append((float(d.mean()), float(d.std() / math.sqrt(d.numel()))))
    return out
