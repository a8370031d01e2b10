"""Linear-Gaussian VAE with an analytic mutual information.

Generative model (one data point)::

    z ~ N(0, I_d)                       site "z", shape (d,)
    x | z ~ N(W z + b, sigma^2 I_D)     site "x", shape (D,)

with W (D x d) and b (D,) drawn once with i.i.d. N(0, 1) entries from a seeded
``torch.Generator``.  The marginal is x ~ N(b, W W^T + sigma^2 I_D), so

    I(x; z) = H(x) - H(x|z) = 1/2 log det(I_D + W W^T / sigma^2)
            = 1/2 log det(I_d + W^T W / sigma^2)      (nats),

the second form by Sylvester's determinant identity.  This is the linear VAE
ground truth of Brekelmans et al. (2022), "Improving Mutual Information
Estimation with Annealed and Energy-Based Bounds", App. O.3 (eq. 214-218), here
with a general noise scale sigma.
"""

from __future__ import annotations

from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch

from . import Example

__all__ = ["linear_vae_mi", "linear_vae_params", "make_linear_vae"]


def linear_vae_params(
    seed: int = 0, latent_dim: int = 10, obs_dim: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the fixed decoder weights of the linear VAE.

    Args:
        seed: seed of the ``torch.Generator`` the entries are drawn from.
        latent_dim: d, the dimension of z.
        obs_dim: D, the dimension of x.

    Returns:
        ``(W, b)``: float32 tensors of shapes (D, d) and (D,) with i.i.d.
        N(0, 1) entries; W is drawn first, then b, from the same generator.

    Raises:
        ValueError: if a dimension is not a positive integer.
    """
    for label, value in (("latent_dim", latent_dim), ("obs_dim", obs_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(int(seed))
    W = torch.randn(obs_dim, latent_dim, generator=gen)
    b = torch.randn(obs_dim, generator=gen)
    return W, b


def linear_vae_mi(W: torch.Tensor, noise_scale: float = 1.0) -> float:
    """Exact I(x; z) of the linear VAE with decoder matrix ``W``.

    Computes 1/2 log det(I_d + W^T W / sigma^2) in float64 through a Cholesky
    factor of the (d x d) matrix (positive definite by construction), which
    equals 1/2 log det(I_D + W W^T / sigma^2) (Brekelmans et al. 2022,
    App. O.3, eq. 218).

    Args:
        W: decoder matrix, shape (D, d).
        noise_scale: sigma > 0, the observation noise standard deviation.

    Returns:
        The mutual information in nats, as a Python float.
    """
    W64 = W.detach().to(dtype=torch.float64, device="cpu")
    d = W64.shape[-1]
    gram = torch.eye(d, dtype=torch.float64) + W64.T @ W64 / float(noise_scale) ** 2
    chol = torch.linalg.cholesky(gram)
    return float(torch.log(torch.diagonal(chol)).sum())


def make_linear_vae(
    seed: int = 0,
    latent_dim: int = 10,
    obs_dim: int = 100,
    noise_scale: float = 1.0,
    *,
    exact_guide: bool = False,
) -> Example:
    """Build the linear-Gaussian VAE example (``"linear-vae"``).

    Args:
        seed: seed for drawing W and b (see :func:`linear_vae_params`).
        latent_dim: d, dimension of the latent site ``"z"``.
        obs_dim: D, dimension of the observed site ``"x"``.
        noise_scale: sigma > 0, the standard deviation of x given z.
        exact_guide: if True, ``Example.guide`` is the exact posterior
            p(z|x) = N(S W^T (x - b) / sigma^2, S) with
            S = (I_d + W^T W / sigma^2)^-1 (so a BA bound with it is tight);
            otherwise the example has no guide.

    Returns:
        An :class:`~pyro_mi.examples.Example` whose ``model(x=None)`` samples
        ``"z"`` (shape (d,), ``.to_event(1)``) and ``"x"`` (shape (D,),
        ``.to_event(1)``, ``obs=x``), broadcasting over leading batch dims,
        and whose ``true_mi`` is the exact I(x; z) in nats
        (:func:`linear_vae_mi`). ``params`` holds ``W``, ``b`` and
        ``noise_scale``.

    Raises:
        ValueError: on a non-positive dimension or noise scale.
    """
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
    W, b = linear_vae_params(seed, latent_dim, obs_dim)
    sigma = float(noise_scale)
    prior_loc = torch.zeros(latent_dim)
    prior_scale = torch.ones(latent_dim)

    def model(x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One data point: z ~ N(0, I_d); x ~ N(W z + b, sigma^2 I_D) (obs=x)."""
        z = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
        return pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    guide: Optional[Callable[..., torch.Tensor]] = None
    if exact_guide:
        prec = torch.eye(latent_dim, dtype=torch.float64) + (
            W.double().T @ W.double()
        ) / sigma**2
        post_cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
        post_tril = torch.linalg.cholesky(post_cov).float()
        # posterior mean = (x - b) @ gain.T, gain = S W^T / sigma^2, shape (d, D)
        gain = (post_cov @ W.double().T / sigma**2).float()

        def exact_posterior(x: torch.Tensor) -> torch.Tensor:
            """Exact posterior p(z|x) for x of shape (..., D); site "z" (..., d)."""
            loc = (x - b) @ gain.T
            return pyro.sample(
                "z", dist.MultivariateNormal(loc, scale_tril=post_tril)
            )

        guide = exact_posterior

    return Example(
        name="linear-vae",
        model=model,
        obs_sites=("x",),
        guide=guide,
        true_mi=linear_vae_mi(W, sigma),
        description=(
            f"linear-Gaussian VAE, z in R^{latent_dim}, x in R^{obs_dim}, "
            f"noise {sigma:g}, seed {seed} (Brekelmans et al. 2022, App. O.3)"
        ),
        params={"W": W, "b": b, "noise_scale": sigma},
    )
