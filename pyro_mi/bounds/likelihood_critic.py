"""A MINE-AIS critic shaped as a likelihood: a Gaussian surrogate of p(x|z) fitted by maximum
likelihood on simulated pairs (Brekelmans et al. 2022, Prop. 4.1 and App. M).

The optimal IBAL critic for a base q is T*(x, z) = log p(x|z) + log p(z) - log q(z|x) + c(x)
(Prop. 4.1): with it, the energy-based posterior q e^T / Z is p(z|x) and the IBAL is the MI.
For the models MINE-AIS is for, a decoder or simulator with noise around a mean (a GAN-like
generator with Gaussian pixel noise, a simulator with measurement error), log p(x|z) is close
to a Gaussian log density log N(x; f(z), diag s^2). So :class:`LikelihoodCritic` is

    T(x, z) = log N(x; f(z), diag s^2) + log p(z) - log q(z|x)

with f an MLP and s per coordinate, and IBAL(q, T) = E[log N(x; f(z), s^2)] -
E_x log E_p(z)[N(x; f(z), s^2)] <= I(x; z) for any f and s (eq. 18; q only shapes the AIS path
from q to p(z) N(x; f(z), s^2), whose normaliser is bounded). It never evaluates p(x|z): f and
s are fitted by maximising E_p(x,z) log N(x; f(z), s^2) on fresh simulated pairs
(:func:`fit_likelihood_critic`), a regression, with none of the HMC negatives that
energy-based training needs. Energy-based training (eq. 19-20) can follow from there.

The IBAL's gap is E_x KL[p(z|x) || π(z|x)]: small when the surrogate's mean error is small
next to the noise scale. Where x given z is far from Gaussian (discrete, multimodal) the
residual critic of GIWAE is the better start.
"""

from __future__ import annotations

import torch
from torch import nn

from ..critics import mlp
from ..density import ModelDensity
from ..proposal import GaussianEncoder, PriorProposal
from ..training import TrainingLog, train
from .giwae import simulated_batches

class LikelihoodCritic(nn.Module):
    """T(x, z) = log N(x; f(z), diag s^2) + log p(z) - log q(z|x), nats (module docstring).

    Args:
        density: the model's :class:`~pyro_mi.density.ModelDensity`, of a one-data-point model
            (log p(z) is read from it at the critic's x).
        proposal: the base q: the prior (:class:`~pyro_mi.proposal.PriorProposal`, then
            T = log N(x; f(z), s^2)) or a :class:`~pyro_mi.proposal.GaussianEncoder`.
        hidden_sizes: widths of f's hidden layers (SiLU units).

    Call: ``critic(x_flat (..., N, obs_dim), z (..., N, D)) -> (..., N)``; x_flat must be the
    same along its leading dims (one x per data point, as in every IBAL and GIWAE call).
    ``critic.log_likelihood(x_flat, z)`` is the surrogate log N(x; f(z), s^2) alone.

    Raises:
        ValueError: a data-plate model, or a base other than the prior or a GaussianEncoder.
    """

    def __init__(self, density: ModelDensity, proposal, hidden_sizes: tuple[int, ...] = (256, 256)):
        super().__init__()
        if density.has_data_plate:
            raise ValueError("the likelihood critic needs a one-data-point model (no data plate)")
        if not isinstance(proposal, (PriorProposal, GaussianEncoder)):
            raise ValueError("the likelihood critic's base must be the prior or a GaussianEncoder, "
                             f"got {type(proposal).__name__}")
        self._base = (density, proposal)  # a tuple hides them from nn.Module registration
        self.f = mlp((density.latent_dim, *hidden_sizes, density.obs_dim), nn.SiLU)
        self.log_scale = nn.Parameter(torch.zeros(density.obs_dim))

    def log_likelihood(self, x_flat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x; f(z), diag s^2), summed over x's coordinates: (..., N) nats."""
        return torch.distributions.Normal(self.f(z), self.log_scale.exp()).log_prob(x_flat).sum(-1)

    def forward(self, x_flat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        density, q = self._base
        out = self.log_likelihood(x_flat, z)
        if isinstance(q, PriorProposal):
            return out  # log p(z) - log q(z|x) = 0
        mu, sigma = q.loc_scale(x_flat)
        xf = x_flat.reshape(-1, *x_flat.shape[-2:])[0]  # (N, obs_dim): the same x along the leading dims
        return out + density.log_prior(z, density.unflatten_data(xf)) - GaussianEncoder.normal_log_prob(z, mu, sigma)


def fit_likelihood_critic(
    density: ModelDensity,
    critic: LikelihoodCritic,
    *,
    max_steps: int = 2000,
    batch_size: int = 512,
    lr: float = 3e-3,
    num_val: int = 1024,
    eval_every: int = 200,
    patience: int = 5,
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: float = 60.0,
) -> TrainingLog:
    """Fits the surrogate log N(x; f(z), diag s^2) of ``critic`` by maximum likelihood on fresh
    simulated pairs (x, z) ~ p(x, z): Adam with a cosine-decayed learning rate, early stopping on
    the mean surrogate log likelihood of ``num_val`` held-out simulated pairs. Never evaluates
    p(x|z); the model is only simulated (:func:`~pyro_mi.bounds.giwae.simulated_batches`).

    Args:
        density: the model's density layer; critic: a :class:`LikelihoodCritic`, trained in place.
        max_steps, batch_size, lr, num_val, eval_every, patience: the regression's settings.
        progress: show a progress bar.
        checkpoint, checkpoint_every: as :func:`~pyro_mi.training.train` (the fit resumes where it
            was interrupted, with the same result).

    Returns:
        the :class:`~pyro_mi.training.TrainingLog` (validation scores in nats per data point).
    """
    batches = simulated_batches(density, batch_size)

    def objective(step: int) -> torch.Tensor:
        x, z = batches(step)
        return critic.log_likelihood(density.flatten_data(x), z).mean()

    with torch.no_grad():
        x_val, z_val = density.sample(num_val)
        x_val = density.flatten_data(x_val)
    return train([critic], objective, validate=lambda: float(critic.log_likelihood(x_val, z_val).mean()),
                 max_steps=max_steps, lr=lr, eval_every=eval_every, patience=patience, lr_schedule="cosine",
                 progress=progress, desc="fit likelihood critic", checkpoint=checkpoint,
                 checkpoint_every=checkpoint_every)


__all__ = ["LikelihoodCritic", "fit_likelihood_critic"]
