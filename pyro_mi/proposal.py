"""Proposals q(z|x) over the packed unconstrained latent of a :class:`ModelDensity`.

A proposal has ``rsample(x, num_samples) -> (z, log_q)`` with shapes
(K, N, D) and (K, N), and ``log_prob(z, x) -> (..., N)``, all in nats and for
the packed unconstrained z (the log-Jacobian of Pyro's transforms included, as
in :mod:`pyro_mi.density`); one that can give the importance log weights of fresh
draws more cheaply than ``log p(x, z) - log q`` has ``log_weights(x, num_samples)
-> (K, N)``. Three kinds:

* :class:`PriorProposal`: q(z|x) = p(z);
* :class:`GuideDensity`: a user's Pyro guide, called as the model is, with the observed
  values written where the model reads them;
* :class:`GaussianEncoder`: the default amortised diagonal Gaussian (an MLP on
  the flattened x), fitted by :func:`fit_guide`.

:func:`fit_guide` maximises the Barber–Agakov objective E_p(x,z)[log q(z|x)]
on simulated pairs (Brekelmans et al. 2022, eq. 3; Barber & Agakov 2003).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from .density import Data, ModelDensity, site_log_prob
from .training import train


def proposal_from_point(proposal, start: int):
    """``proposal`` for data points ``start, ...`` of a block: its ``from_point(start)`` (the prior, a Pyro
    guide, a per-point fit: their rows are counted from ``start``); the default encoder depends on x
    alone."""
    return proposal.from_point(start) if hasattr(proposal, "from_point") else proposal


def proposal_for_points(proposal, index: torch.Tensor):
    """``proposal`` for the data points ``index`` (see :meth:`ModelDensity.for_points`): its
    ``for_points(index)``; the default encoder depends on x alone."""
    return proposal.for_points(index) if hasattr(proposal, "for_points") else proposal


def _for_points(proposal, index: torch.Tensor):
    """A copy of a proposal that holds a density, on the density of the points ``index``."""
    sub = copy.copy(proposal)
    sub.density = proposal.density.for_points(index)
    return sub


def log_prob_given(proposal, x: Data) -> Callable:
    """log q(z|x) of ``proposal`` for a fixed x, as ``f(z (..., N, D), log_prior (..., N)) -> (..., N)``:
    its ``log_prob_given(x)`` (which may reuse log p(z) or run a network once), else ``log_prob(z, x)``."""
    if hasattr(proposal, "log_prob_given"):
        return proposal.log_prob_given(x)
    return lambda z, log_prior: proposal.log_prob(z, x)


class PriorProposal:
    """The model's prior p(z) as a proposal (ignores x).

    Args:
        density: the :class:`ModelDensity` whose prior is used.
    """

    def __init__(self, density: ModelDensity):
        self.density = density

    def rsample(self, x: Data, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ p(z) for each data point: returns z (K, N, D) and log p(z) (K, N)."""
        return self.density.sample_prior(num_samples, x)

    def log_prob(self, z: torch.Tensor, x: Data) -> torch.Tensor:
        """log p(z) for packed z (..., N, D) -> (..., N)."""
        return self.density.log_prior(z, x)

    def log_prob_given(self, x: Data) -> Callable:
        """log q(z|x) for the fixed x: ``f(z, log_prior) -> (..., N)`` (here log p(z) itself)."""
        return lambda z, log_prior: log_prior

    def log_weights(self, x: Data, num_samples: int) -> torch.Tensor:
        """Importance log weights log p(x, z_k) - log p(z_k) = log p(x|z_k) of K fresh draws: (K, N)."""
        return self.density.prior_log_likelihood(x, num_samples)

    def parameters(self) -> Iterable[torch.Tensor]:
        return iter(())

    def from_point(self, start: int) -> "PriorProposal":
        """The prior of data points ``start, ...`` (see :meth:`ModelDensity.from_point`)."""
        return self if start == 0 else PriorProposal(self.density.from_point(start))

    def for_points(self, index: torch.Tensor) -> "PriorProposal":
        """The prior of the data points ``index`` (see :meth:`ModelDensity.for_points`)."""
        return _for_points(self, index)


def _strip_ones(shape: torch.Size) -> tuple[int, ...]:
    """``shape`` without its leading size-1 dims (a guide may leave a model's size-1 plate dims out)."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


# closed and open variants of a bound: the same set up to its boundary (a null set), and
# biject_to maps both by the same transform (Gamma's support is nonnegative, LogNormal's positive)
_OPEN_VARIANT = {
    constraints._GreaterThanEq: constraints._GreaterThan,
    constraints._HalfOpenInterval: constraints._Interval,
}


def same_support(a, b) -> bool:
    """Whether two supports are the same set, for comparing a guide's site with the model's.

    Rule: after unwrapping ``independent`` (event dims are compared as shapes),
    the same constraint class, counting a closed bound as its open variant
    (``greater_than_eq`` as ``greater_than``, ``half_open_interval`` as
    ``interval``), with equal attributes (bounds compared as values,
    broadcasting). So ``nonnegative``, ``positive`` and ``greater_than(0.)``
    are one support, and ``interval(torch.zeros(3), 1.)`` is ``unit_interval``.
    """

    def base(c):
        while isinstance(c, constraints.independent):
            c = c.base_constraint
        return c

    a, b = base(a), base(b)
    if _OPEN_VARIANT.get(type(a), type(a)) is not _OPEN_VARIANT.get(type(b), type(b)):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    for k in va:
        try:
            if not bool(torch.as_tensor(va[k] == vb[k]).all()):
                return False
        except RuntimeError:  # tensors that do not broadcast
            return False
    return True


class GuideDensity:
    """A Pyro guide q(z|x) as a proposal over the packed unconstrained z.

    Args:
        density: the model's :class:`ModelDensity`.
        guide: a Pyro guide, taking the model's arguments, as ``SVI`` calls it
            (:meth:`ModelDensity.trace_guide`): the observed values are written into the
            argument the model reads them from (``obs=x``, ``obs=x.reshape(-1, 784)``), or
            passed as keywords named after the observed sites where no argument carries them
            (``def model(x=None)``). A guide of a model without a data plate gets them with
            leading (chains, data) batch dims it must broadcast over; a data-plate model's
            guide gets one row per data point, inside its own data plate.

    Raises:
        ValueError: the guide cannot be called with the model's arguments, misses a latent
            site of the model, samples a site that is not one, or samples a latent site with
            another shape per data point (leading size-1 dims aside) or another support (see
            :func:`same_support`) than the model's; each names the site. Discrete sites the
            model enumerates are not the guide's to sample.
    """

    def __init__(self, density: ModelDensity, guide: Callable):
        if not callable(guide):
            raise TypeError(f"guide must be callable, got {type(guide).__name__}")
        self.density = density
        self.guide = guide
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            x, _ = density.sample(2)
            try:
                trace = self._trace(x, 1, {})
            except TypeError as e:
                raise ValueError(
                    f"the guide cannot be called as the model is ({e}): pyro_mi calls it with the model's "
                    "arguments, the observed values written into the argument the model reads them from, or "
                    f"as keywords named after the observed sites {list(density.obs_sites)} where no argument "
                    "carries them") from e
        names = [s["name"] for s in trace.sites]
        latents = [s.name for s in density.latent_sites]
        missing = [n for n in latents if n not in names]
        extra = [n for n in names if n not in latents]
        if missing:
            raise ValueError(f"the guide does not sample latent site {missing[0]!r} of the model")
        if extra:
            raise ValueError(
                f"the guide samples site {extra[0]!r}, which is not a latent site of the model "
                f"(latent sites: {latents})"
            )
        guide_sites = {s["name"]: s for s in trace.sites}
        for site in density.latent_sites:
            g = guide_sites[site.name]
            shape = trace.point_shape(site.name)
            if _strip_ones(shape) != _strip_ones(site.shape):
                raise ValueError(
                    f"the guide's site {site.name!r} has shape {tuple(shape)} per data point, the model's "
                    f"has {tuple(site.shape)}; the guide must sample the same event shape (e.g. .to_event())"
                )
            if not same_support(g["fn"].support, site.support):
                raise ValueError(
                    f"the guide's site {site.name!r} has support {g['fn'].support}, the model's has "
                    f"{site.support}; q(z|x) must live on the model's support (e.g. a LogNormal or a "
                    "transformed Normal for a positive latent)"
                )

    def from_point(self, start: int) -> "GuideDensity":
        """This guide for data points ``start, ...`` (see :meth:`ModelDensity.from_point`)."""
        shifted = self.density.from_point(start)
        if shifted is self.density:
            return self
        out = copy.copy(self)
        out.density = shifted
        return out

    def for_points(self, index: torch.Tensor) -> "GuideDensity":
        """This guide for the data points ``index`` (see :meth:`ModelDensity.for_points`)."""
        return _for_points(self, index)

    def _trace(self, x: Data, num_samples: int, cond: dict):
        return self.density.trace_guide(self.guide, x, num_samples, cond)

    def rsample(self, x: Data, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ q(z|x): returns z (K, N, D) and log q(z|x) (K, N), reparameterised where the guide is."""
        z = self.density.pack(self._trace(x, num_samples, {}).values())
        return z, self.log_prob(z, x)

    def log_prob(self, z: torch.Tensor, x: Data) -> torch.Tensor:
        """log q(z|x) of packed unconstrained z (*S, N, D) -> (*S, N), nats."""
        d = self.density
        lead, N = z.shape[:-2], z.shape[-2]
        zz = z.reshape(-1, N, d.latent_dim)
        values, ldj = d.unpack(zz, with_log_jacobian=True)
        trace = self._trace(x, zz.shape[0], values)
        lq = trace.log_prob([s.name for s in d.latent_sites]) + ldj
        return lq.reshape(lead + (N,))

    def log_prob_given(self, x: Data) -> Callable:
        """log q(z|x) for the fixed x: ``f(z, log_prior) -> (..., N)`` (a guide trace per call)."""
        return lambda z, log_prior: self.log_prob(z, x)

    def parameters(self) -> list[torch.Tensor]:
        """The guide's Pyro parameters (unconstrained), for :func:`fit_guide`."""
        with torch.random.fork_rng(), torch.no_grad():
            x, _ = self.density.sample(2)
            trace = poutine.trace(lambda: self._trace(x, 1, {})).get_trace()
        return [s["value"].unconstrained() for s in trace.nodes.values() if s["type"] == "param"]


class GaussianEncoder(nn.Module):
    """Amortised diagonal Gaussian q(z|x) = N(mu(x), diag sigma(x)^2) on the packed unconstrained z,
    optionally mixed with the prior: q(z|x) = (1 - a) N(z; mu(x), sigma(x)^2) + a p(z).

    An MLP with tanh hidden layers plus a linear map (a skip connection) takes the standardised,
    flattened x (N, obs_dim) to (mu, log sigma), each (N, D); it starts at N(0, I). The linear
    part extrapolates where the saturating MLP cannot: a point far outside the simulated pairs
    it was fitted on (from a heavy tail of the prior) still gets a posterior mean that follows x.

    The prior component (``prior_weight`` a > 0) is a defensive mixture (Hesterberg 1995): every
    importance weight p(x, z) / q(z|x) is then at most p(x|z) / a, so a simulated point the
    network never saw (a draw from a heavy-tailed prior) cannot carry a weight of millions of
    nats, and the bounds stay finite and near where they belong. :func:`fit_guide` chooses a
    on held-out pairs.

    Args:
        density: the model's :class:`ModelDensity` (gives obs_dim, latent_dim and flattening).
        hidden_sizes: widths of the hidden layers.
        prior_weight: a in [0, 1), the prior's weight in the mixture.
    """

    def __init__(self, density: ModelDensity, hidden_sizes: tuple[int, ...] = (128, 128), prior_weight: float = 0.0):
        super().__init__()
        self.density = density
        self.prior_weight = float(prior_weight)
        if not 0 <= self.prior_weight < 1:
            raise ValueError(f"prior_weight must be in [0, 1), got {prior_weight!r}")
        sizes = (density.obs_dim, *hidden_sizes)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        out = nn.Linear(sizes[-1], 2 * density.latent_dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.skip = nn.Linear(density.obs_dim, 2 * density.latent_dim, bias=False)
        nn.init.zeros_(self.skip.weight)
        self.register_buffer("x_mean", torch.zeros(density.obs_dim))
        self.register_buffer("x_std", torch.ones(density.obs_dim))

    def standardize_from(self, x: Data) -> None:
        """Sets the input standardisation from observed values (N, ...), and moves the encoder
        to their device."""
        xf = self.density.flatten_data(x)
        self.to(device=xf.device)  # the encoder follows the model's data (e.g. onto CUDA)
        self.x_mean.copy_(xf.mean(0))
        self.x_std.copy_(xf.std(0).clamp_min(1e-3))

    def forward(self, x: Data) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mu, sigma), each (N, D)."""
        return self.loc_scale(self.density.flatten_data(x))

    def loc_scale(self, x_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma), each (..., D), from already flattened x (..., obs_dim)."""
        xs = (x_flat - self.x_mean) / self.x_std
        mu, log_sigma = (self.net(xs) + self.skip(xs)).chunk(2, -1)
        return mu, log_sigma.clamp(-12.0, 6.0).exp()

    def draw(self, x: Data, num_samples: int) -> torch.Tensor:
        """z ~ q(z|x): (K, N, D), reparameterised in the Gaussian component."""
        mu, sigma = self(x)
        z = mu + sigma * torch.randn((num_samples,) + mu.shape, dtype=mu.dtype, device=mu.device)
        if self.prior_weight == 0:
            return z
        from_prior = torch.rand(z.shape[:2], device=z.device) < self.prior_weight
        z_prior = self.density.sample_prior(num_samples, x)[0]
        return torch.where(from_prior.unsqueeze(-1), z_prior, z)

    def rsample(self, x: Data, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ q(z|x): returns z (K, N, D) and log q(z|x) (K, N)."""
        z = self.draw(x, num_samples)
        return z, self.log_prob(z, x)

    def log_prob(self, z: torch.Tensor, x: Data, log_prior: torch.Tensor | None = None) -> torch.Tensor:
        """log q(z|x) for z (..., N, D) -> (..., N), nats. ``log_prior``: log p(z) at z, if already
        computed (the mixture's prior component; one model run otherwise)."""
        return self.mix(self.normal_log_prob(z, *self(x)), z, x, log_prior)

    def log_prob_given(self, x: Data) -> Callable:
        """log q(z|x) for the fixed x: ``f(z, log_prior) -> (..., N)``, the network run once here (x does
        not change along an annealing path) and the mixture's prior component read from ``log_prior``."""
        with torch.no_grad():
            mu, sigma = self(x)
        q = dist.Normal(mu, sigma, validate_args=False).to_event(1)
        return lambda z, log_prior: self.mix(site_log_prob(q, z), z, x, log_prior)

    def mix(self, log_gaussian: torch.Tensor, z: torch.Tensor, x: Data, log_prior=None) -> torch.Tensor:
        """The mixture's log density from its Gaussian component's, (..., N)."""
        a = self.prior_weight
        if a == 0:
            return log_gaussian
        if log_prior is None:
            log_prior = self.density.log_prior(z, x)
        return torch.logaddexp(math.log1p(-a) + log_gaussian, math.log(a) + log_prior)

    @staticmethod
    def normal_log_prob(z, mu, sigma):
        """log N(z; mu, diag sigma^2) summed over the last dim: (..., D) -> (...), nats."""
        return torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)


#: the prior's weight in the default encoder's mixture while it is fitted (a robust objective: a
#: pair the network cannot fit pulls on it through its share of the mixture only)
FIT_PRIOR_WEIGHT = 0.1
#: the prior weights :func:`fit_guide` chooses from by held-out BA (1: the prior alone)
PRIOR_WEIGHTS = (0.0, 0.01, 0.1, 1.0)


def fit_guide(
    density: ModelDensity,
    guide,
    *,
    num_steps: int = 1000,
    batch_size: int = 256,
    lr: float = 3e-3,
    num_pairs: int = 65536,
    num_val: int = 1024,
    eval_every: int = 50,
    patience: int = 4,
    progress: bool = True,
):
    """Fits a proposal by maximising the Barber–Agakov objective E_p(x,z)[log q(z|x)].

    Simulates a pool of ``min(num_pairs, num_steps * batch_size)`` pairs
    (x, z) ~ p(x, z) from the model in one vectorised call, then takes Adam steps
    on -mean log q(z|x) over random minibatches of it (Brekelmans et al. 2022,
    eq. 3: the BA lower bound's gap is E_p(x) KL[p(z|x) || q(z|x)], so this fit
    is mass-covering, as an importance proposal should be). The steps are those
    of the shared loop :func:`pyro_mi.training.train`, with a cosine-decayed
    learning rate, stopped early when the BA estimate E[log q(z|x) - log p(z)] on
    ``num_val`` held-out simulated pairs has not improved for ``patience``
    evaluations (every ``eval_every`` steps); the best parameters are kept.

    A :class:`GaussianEncoder` is fitted as a defensive mixture with the prior (weight
    :data:`FIT_PRIOR_WEIGHT`: a pair the network cannot fit, from a heavy tail of the prior,
    pulls on it through its share of the mixture only), and then its prior weight is chosen
    from :data:`PRIOR_WEIGHTS` by the held-out BA estimate; the weight 1 (the prior alone)
    wins when no mixture's held-out BA exceeds the prior's (0) by 2 standard errors, and
    ``guide.fit_log.prior_wins`` says so (:func:`pyro_mi.estimate_mi` then uses the prior).

    Args:
        density: the model's :class:`ModelDensity`.
        guide: a :class:`GaussianEncoder` or :class:`GuideDensity` (whose Pyro
            parameters are trained in place).
        num_steps, batch_size, lr: optimisation settings (at most ``num_steps``
            steps; cosine-decayed learning rate).
        num_pairs: the most simulated pairs held at once.
        num_val, eval_every, patience: early stopping (``num_val=0``: none). A Pyro guide
            (:class:`GuideDensity`) has no ``state_dict`` to restore, so it is fitted for
            ``num_steps`` without it.
        progress: show a tqdm progress bar.

    Returns:
        list of the per-step losses (-E log q, nats). The guide keeps the
        :class:`~pyro_mi.training.TrainingLog` as ``guide.fit_log`` (``best_value``: the
        held-out BA estimate of the kept parameters, nats; ``best_step``, ``steps``; for an
        encoder ``prior_weights``: the held-out BA of each prior weight, and ``prior_wins``).

    Raises:
        ValueError: negative ``num_steps`` or ``num_val``, ``batch_size`` < 1,
            non-positive ``lr``, or a non-finite loss (usually a learning rate that is
            too large).
    """
    if num_steps < 0 or batch_size < 1 or num_val < 0:
        raise ValueError(f"num_steps and num_val must be >= 0 and batch_size >= 1, got {num_steps}, {num_val}, "
                         f"{batch_size}")
    num_val = num_val if num_steps > 0 and isinstance(guide, nn.Module) else 0
    with torch.no_grad():
        x_pool, z_pool = density.sample(max(batch_size, min(num_pairs, num_steps * batch_size)) + num_val)
        x_val, z_val = {k: v[:num_val] for k, v in x_pool.items()}, z_pool[:num_val]
        x_pool, z_pool = {k: v[num_val:] for k, v in x_pool.items()}, z_pool[num_val:]
        log_prior_val = density.log_prior(z_val, x_val) if num_val else None
    encoder = isinstance(guide, GaussianEncoder)
    if encoder:
        guide.standardize_from(x_pool)
        guide.prior_weight = FIT_PRIOR_WEIGHT
        with torch.no_grad():
            log_prior_pool = density.log_prior(z_pool, x_pool)
    n = z_pool.shape[0]

    def objective(step: int) -> torch.Tensor:
        idx = torch.randint(n, (batch_size,), device=z_pool.device)
        x = {k: v[idx] for k, v in x_pool.items()}
        if encoder:
            return guide.log_prob(z_pool[idx], x, log_prior=log_prior_pool[idx]).mean()
        return guide.log_prob(z_pool[idx], x).mean()

    def validate() -> float:  # the BA lower bound on these pairs' MI (eq. 3), nats
        lq = guide.log_prob(z_val, x_val, log_prior=log_prior_val) if encoder else guide.log_prob(z_val, x_val)
        return float((lq - log_prior_val).mean())

    log = train(
        [guide], objective, validate=validate if num_val else None, max_steps=num_steps, lr=lr,
        eval_every=eval_every, patience=patience, lr_schedule="cosine", progress=progress, desc="fit guide (BA)",
    )
    if encoder and num_val:
        with torch.no_grad():
            gaussian = GaussianEncoder.normal_log_prob(z_val, *guide(x_val))
        scores, errors = {}, {}
        for a in PRIOR_WEIGHTS:  # held-out BA of each mixture; a = 1 is the prior, whose BA is 0
            if a < 1:
                guide.prior_weight = a
                ba = (guide.mix(gaussian, z_val, x_val, log_prior_val) - log_prior_val).double()
                scores[a], errors[a] = float(ba.mean()), float(ba.std() / math.sqrt(ba.numel()))
            else:
                scores[a], errors[a] = 0.0, 0.0
        best = max(scores, key=lambda a: scores[a] if math.isfinite(scores[a]) else -math.inf)
        if best < 1 and not scores[best] > 2 * errors[best]:  # not clearly better than the prior
            best = 1.0
        guide.prior_weight = 0.0 if best == 1 else best
        log.prior_weights = scores
        log.prior_wins = best == 1
        log.best_value = scores[best]
    elif encoder:
        guide.prior_weight = 0.0
    guide.fit_log = log
    return [-v for v in log.objective]
