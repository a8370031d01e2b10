"""The model zoo: models from Pyro's own examples and tutorials, written as their authors wrote them.

Each model keeps its source's priors, site names and argument conventions (the comment above
it names the source), and each :class:`ZooModel` says how its author calls it: pyro_mi is given
exactly those arguments (``model_args`` / ``model_kwargs``) and the names of the observed sites,
nothing rewritten. Data that Pyro's examples download (the rugged data set) are synthesised
with a fixed seed; the baseball counts are Efron and Morris's (1975), as in Pyro's
``examples/baseball.py``. Where the marginal log p(x) of a simulated point is exact (by
quadrature over one scale, or a Gaussian integral), ``log_marginal(x) -> (N,)`` gives it for
paired tests.

:func:`zoo` builds them all; ``benchmarks/model_zoo.py`` runs them through :func:`pyro_mi.estimate_mi`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch import nn

__all__ = ["ZooModel", "zoo"]


@dataclass
class ZooModel:
    """A model of the zoo and how its author calls it.

    Attributes:
        name: short name.
        source: where the model comes from (Pyro's examples or tutorials).
        model: the model, as written there.
        obs_sites: its observed sites.
        model_args, model_kwargs: the arguments its author calls it with.
        guide: its author's guide, where the source has one pyro_mi can use (else None).
        log_marginal: ``x -> (N,)`` exact log p(x) (nats) of simulated points ``{site: (N, ...)}``,
            where known.
        ceiling: an upper limit on the MI known from the observations' support (nats), or None.
    """

    name: str
    source: str
    model: Callable
    obs_sites: tuple[str, ...]
    model_args: tuple = ()
    model_kwargs: dict = field(default_factory=dict)
    guide: Callable | None = None
    log_marginal: Callable[[dict], torch.Tensor] | None = None
    ceiling: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the VAE
# examples/vae/vae.py: Encoder, Decoder and VAE as written there (Bernoulli likelihood, model and
# guide methods of the VAE module, site "obs" observed as obs=x.reshape(-1, 784)).
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        loc_img = torch.sigmoid(self.fc21(hidden))
        return loc_img


class VAE(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400, use_cuda=False):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        if use_cuda:
            self.cuda()
        self.use_cuda = use_cuda
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder.forward(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, 784),
            )
            return loc_img

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder.forward(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


with torch.random.fork_rng():  # the zoo's VAE, its weights from seed 0 (untrained), as a module attribute:
    torch.manual_seed(0)       # ``pyro-mi estimate pyro_mi.examples.zoo:vae.model --guide ...:vae.guide``
    vae = VAE(z_dim=10, hidden_dim=100)


# ----------------------------------------------------------------------------- eight schools
# examples/eight_schools/data.py
J = 8
Y = torch.tensor([28, 8, -3, 7, -1, 1, 18, 12]).type(torch.Tensor)
SIGMA = torch.tensor([15, 10, 16, 11, 9, 11, 10, 18]).type(torch.Tensor)


# examples/eight_schools/mcmc.py, as written (non-centred; "obs" is conditioned by the caller:
# conditioned_model = poutine.condition(model, data={"obs": y}), called as model(sigma)).
def eight_schools(sigma):
    eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
    mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
    tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))

    theta = mu + tau * eta

    return pyro.sample("obs", dist.Normal(theta, sigma))


# The same priors centred (theta ~ Normal(mu, tau) in a plate, y passed as obs=), the form of the
# eight schools model in Pyro's MCMC documentation and in NumPyro's getting-started guide.
def eight_schools_centred(J, sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfCauchy(25.0))
    with pyro.plate("J", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _eight_schools_log_marginal(sigma: torch.Tensor, mu_scale: float = 10.0, tau_scale: float = 25.0,
                                num_nodes: int = 2000):
    """log p(y) of the eight schools model: theta and mu are Gaussian integrals, tau a one-dim
    quadrature (tau = 25 tan(pi u / 2) makes its HalfCauchy prior uniform in u)."""
    s2 = sigma.double() ** 2

    def log_marginal(x: dict) -> torch.Tensor:
        y = x["obs"].double().reshape(-1, J)
        nodes, weights = _gauss_legendre(num_nodes)  # on (0, 1)
        tau = tau_scale * torch.tan(math.pi * nodes / 2)
        cov = mu_scale**2 + torch.diag_embed(s2 + tau.unsqueeze(-1) ** 2)  # (Q, J, J)
        lp = torch.distributions.MultivariateNormal(torch.zeros(J, dtype=torch.float64), cov).log_prob(
            y.unsqueeze(1))  # (N, Q)
        return torch.logsumexp(lp + weights.log(), -1).to(x["obs"].dtype)

    return log_marginal


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on (0, 1), float64."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return torch.as_tensor((x + 1) / 2), torch.as_tensor(w / 2)


# ----------------------------------------------------------------------------- baseball
# examples/baseball.py, the four models as written (at_bats, hits); the data are Efron and
# Morris's 18 players' hits in their first 45 at bats of 1970.
from pyro.distributions import Beta, Binomial, HalfCauchy, Normal, Pareto, Uniform  # noqa: E402
from pyro.distributions.util import scalar_like  # noqa: E402

AT_BATS = torch.full((18,), 45.0)
HITS = torch.tensor([18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]).type(torch.Tensor)


def fully_pooled(at_bats, hits):
    phi_prior = Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1))
    phi = pyro.sample("phi", phi_prior)
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def not_pooled(at_bats, hits):
    num_players = at_bats.shape[0]
    with pyro.plate("num_players", num_players):
        phi_prior = Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1))
        phi = pyro.sample("phi", phi_prior)
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def partially_pooled(at_bats, hits):
    num_players = at_bats.shape[0]
    m = pyro.sample("m", Uniform(scalar_like(at_bats, 0), scalar_like(at_bats, 1)))
    kappa = pyro.sample(
        "kappa", Pareto(scalar_like(at_bats, 1), scalar_like(at_bats, 1.5))
    )
    with pyro.plate("num_players", num_players):
        phi_prior = Beta(m * kappa, (1 - m) * kappa)
        phi = pyro.sample("phi", phi_prior)
        return pyro.sample("obs", Binomial(at_bats, phi), obs=hits)


def partially_pooled_with_logit(at_bats, hits):
    num_players = at_bats.shape[0]
    loc = pyro.sample("loc", Normal(scalar_like(at_bats, -1), scalar_like(at_bats, 1)))
    scale = pyro.sample("scale", HalfCauchy(scale=scalar_like(at_bats, 1)))
    with pyro.plate("num_players", num_players):
        alpha = pyro.sample("alpha", Normal(loc, scale))
        return pyro.sample("obs", Binomial(at_bats, logits=alpha), obs=hits)


def _fully_pooled_log_marginal(at_bats: torch.Tensor):
    """log p(hits) of ``fully_pooled``: a Beta(1, 1) integral of a product of Binomials."""
    n = at_bats.double()

    def log_marginal(x: dict) -> torch.Tensor:
        k = x["obs"].double()
        log_choose = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        a, b = 1 + k.sum(-1), 1 + (n - k).sum(-1)
        return (log_choose.sum(-1) + torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)).to(x["obs"].dtype)

    return log_marginal


def _not_pooled_log_marginal(at_bats: torch.Tensor):
    """log p(hits) of ``not_pooled`` per player, a data point of its plate (point i is player
    i % 18): a Uniform phi makes the hits uniform on 0 .. at_bats."""

    def log_marginal(x: dict) -> torch.Tensor:
        rows = torch.arange(x["obs"].shape[0]) % at_bats.shape[0]
        return -torch.log1p(at_bats[rows]).to(x["obs"].dtype)

    return log_marginal


# ----------------------------------------------------------------------------- regression
# tutorial/source/bayesian_regression_ii.ipynb (the rugged data set, which cannot be
# downloaded here, synthesised: 170 countries, 49 in Africa).
def linear_regression(is_cont_africa, ruggedness, log_gdp):
    a = pyro.sample("a", dist.Normal(0., 10.))
    b_a = pyro.sample("bA", dist.Normal(0., 1.))
    b_r = pyro.sample("bR", dist.Normal(0., 1.))
    b_ar = pyro.sample("bAR", dist.Normal(0., 1.))
    sigma = pyro.sample("sigma", dist.Uniform(0., 10.))
    mean = a + b_a * is_cont_africa + b_r * ruggedness + b_ar * is_cont_africa * ruggedness
    with pyro.plate("data", len(ruggedness)):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)


def rugged_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(is_cont_africa, ruggedness, log_gdp) of 170 synthetic countries, 49 in Africa."""
    g = torch.Generator().manual_seed(seed)
    is_cont_africa = (torch.arange(170) < 49).float()
    ruggedness = -torch.log(torch.rand(170, generator=g)) * 1.2
    log_gdp = 9.2 - 1.9 * is_cont_africa - 0.2 * ruggedness + 0.4 * is_cont_africa * ruggedness \
        + 0.9 * torch.randn(170, generator=g)
    return is_cont_africa, ruggedness, log_gdp


def _linear_regression_log_marginal(is_cont_africa, ruggedness, num_nodes: int = 400):
    """log p(log_gdp): given sigma the model is linear-Gaussian (y ~ N(0, X S Xᵀ + sigma² I));
    sigma ~ Uniform(0, 10) by Gauss–Legendre quadrature."""
    X = torch.stack([torch.ones_like(ruggedness), is_cont_africa, ruggedness, is_cont_africa * ruggedness], -1).double()
    prior_var = torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    base = (X * prior_var) @ X.T
    n = X.shape[0]

    def log_marginal(x: dict) -> torch.Tensor:
        y = x["obs"].double().reshape(-1, n)
        nodes, weights = _gauss_legendre(num_nodes)
        sigma = 10 * nodes
        cov = base + sigma.reshape(-1, 1, 1) ** 2 * torch.eye(n, dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
        lp = torch.stack([mvn.log_prob(yi) for yi in y])  # (N, Q)
        return torch.logsumexp(lp + weights.log(), -1).to(x["obs"].dtype)

    return log_marginal


# pyro.contrib.oed.glmm's logistic regression (weights ~ N(0, 1) per feature, a bias), for a
# fixed design of 20 rows and 3 features, written as a plain model of the design.
def logistic_regression(design, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(design.shape[-1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", design.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=design @ w + b), obs=y)


# ----------------------------------------------------------------------------- mixture
# tutorial/source/gmm.ipynb, as written (K = 2, the tutorial's data).
K = 2


@config_enumerate
def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))

    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


# ----------------------------------------------------------------------------- counts
# tutorial/source/predictive_deterministic.ipynb: a hierarchical count model (a Gamma-Poisson
# rate through a softplus link, coefficients with a shared scale), features synthesised.
def gamma_poisson_regression(features, counts):
    N, P = features.shape
    scale = pyro.sample("scale", dist.LogNormal(0, 1))
    coef = pyro.sample("coef", dist.Normal(0, scale).expand([P]).to_event(1))
    rate = pyro.deterministic("rate", torch.nn.functional.softplus(coef @ features.T))
    concentration = pyro.sample("concentration", dist.LogNormal(0, 1))
    with pyro.plate("bins", N):
        return pyro.sample("counts", dist.GammaPoisson(concentration, rate), obs=counts)


# ----------------------------------------------------------------------------- design
# tutorial/source/working_memory.ipynb (the OED tutorial), its model as written, for one design l.
sensitivity = 1.0
prior_mean = torch.tensor(7.0)
prior_sd = torch.tensor(2.0)


def working_memory(l):  # noqa: E741 - the tutorial's name
    with pyro.plate_stack("plate", l.shape[:-1]):
        theta = pyro.sample("theta", dist.Normal(prior_mean, prior_sd))
        theta = theta.unsqueeze(-1)
        logit_p = sensitivity * (theta - l)
        y = pyro.sample("y", dist.Bernoulli(logits=logit_p).to_event(1))
        return y


def _working_memory_log_marginal(l: torch.Tensor, num_nodes: int = 200):
    """log p(y) of one design: theta ~ N(7, 2) by Gauss–Hermite quadrature."""
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    theta = prior_mean.double() + prior_sd.double() * torch.as_tensor(nodes)
    log_w = torch.as_tensor(weights).log() - 0.5 * math.log(2 * math.pi)

    def log_marginal(x: dict) -> torch.Tensor:
        y = x["y"].double()  # (N, R)
        logits = sensitivity * (theta.unsqueeze(-1) - l.double())  # (Q, R)
        lp = torch.distributions.Bernoulli(logits=logits).log_prob(y.unsqueeze(1)).sum(-1)  # (N, Q)
        return torch.logsumexp(lp + log_w, -1).to(x["y"].dtype)

    return log_marginal


# ----------------------------------------------------------------------------- time series
# examples/hmm.py, model_1 (a discrete HMM over binary tones, states enumerated, pyro.markov),
# with its priors, for 2 sequences of 6 steps, 3 tones and 2 hidden states (every sequence of full
# length, so without model_1's mask).
def hmm(sequences, lengths, hidden_dim=2):
    num_sequences, max_length, data_dim = sequences.shape
    probs_x = pyro.sample(
        "probs_x", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).to_event(1))
    probs_y = pyro.sample(
        "probs_y", dist.Beta(0.1, 0.9).expand([hidden_dim, data_dim]).to_event(2))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2):
        x = 0
        for t in pyro.markov(range(int(lengths.max()))):
            x = pyro.sample("x_{}".format(t), dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
            with tones_plate:
                pyro.sample("y_{}".format(t), dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[:, t])


# ----------------------------------------------------------------------------- the zoo
def zoo(seed: int = 0) -> dict[str, ZooModel]:
    """Every zoo model, in table order (synthetic data from ``seed``)."""
    models: list[ZooModel] = []
    models.append(ZooModel("vae", "examples/vae/vae.py (z_dim 10, hidden 100, untrained weights)", vae.model,
                           ("obs",), model_args=(torch.zeros(128, 784),), guide=vae.guide,
                           ceiling=784 * math.log(2), extra={"target": "vae.model", "guide": "vae.guide"}))
    models.append(ZooModel("eight_schools", "examples/eight_schools/mcmc.py", eight_schools, ("obs",),
                           model_args=(SIGMA,), log_marginal=_eight_schools_log_marginal(SIGMA)))
    models.append(ZooModel("eight_schools_centred", "mcmc.py's priors, centred (Pyro's MCMC docs)",
                           eight_schools_centred, ("obs",), model_args=(J, SIGMA, Y),
                           log_marginal=_eight_schools_log_marginal(SIGMA)))
    ceiling = 18 * math.log(46)
    models.append(ZooModel("fully_pooled", "examples/baseball.py", fully_pooled, ("obs",),
                           model_args=(AT_BATS, HITS), log_marginal=_fully_pooled_log_marginal(AT_BATS),
                           ceiling=ceiling))
    models.append(ZooModel("not_pooled", "examples/baseball.py", not_pooled, ("obs",), model_args=(AT_BATS, HITS),
                           log_marginal=_not_pooled_log_marginal(AT_BATS), ceiling=math.log(46)))
    models.append(ZooModel("partially_pooled", "examples/baseball.py", partially_pooled, ("obs",),
                           model_args=(AT_BATS, HITS), ceiling=ceiling))
    models.append(ZooModel("partially_pooled_with_logit", "examples/baseball.py", partially_pooled_with_logit,
                           ("obs",), model_args=(AT_BATS, HITS), ceiling=ceiling))
    africa, rugged, log_gdp = rugged_data(seed)
    models.append(ZooModel("linear_regression", "tutorial/source/bayesian_regression_ii.ipynb", linear_regression,
                           ("obs",), model_args=(africa, rugged, log_gdp),
                           log_marginal=_linear_regression_log_marginal(africa, rugged)))
    g = torch.Generator().manual_seed(seed)
    design = torch.randn(20, 3, generator=g)
    models.append(ZooModel("logistic_regression", "pyro.contrib.oed.glmm (logistic regression)",
                           logistic_regression, ("y",), model_args=(design,), ceiling=20 * math.log(2)))
    models.append(ZooModel("gmm", "tutorial/source/gmm.ipynb", gmm, ("obs",), model_args=(GMM_DATA,)))
    features = torch.randn(30, 4, generator=g)
    counts = torch.distributions.Poisson(torch.nn.functional.softplus(features @ torch.tensor([0.5, -0.3, 0.8, 0.1]))
                                         ).sample()
    models.append(ZooModel("gamma_poisson", "tutorial/source/predictive_deterministic.ipynb",
                           gamma_poisson_regression, ("counts",), model_args=(features, counts)))
    design_l = torch.tensor([5.0, 7.0, 9.0, 11.0])
    models.append(ZooModel("working_memory", "tutorial/source/working_memory.ipynb (the OED tutorial)",
                           working_memory, ("y",), model_args=(design_l,),
                           log_marginal=_working_memory_log_marginal(design_l), ceiling=4 * math.log(2)))
    sequences = torch.zeros(2, 6, 3)
    models.append(ZooModel("hmm", "examples/hmm.py (model_1)", hmm, tuple(f"y_{t}" for t in range(6)),
                           model_args=(sequences, torch.full((2,), 6)), ceiling=36 * math.log(2)))
    return {m.name: m for m in models}
