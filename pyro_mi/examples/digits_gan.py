"""A small GAN-like decoder on scikit-learn's 8x8 digits, with shipped weights.

This is a scaled-down MNIST-GAN20 of Brekelmans et al. (2022), "Improving Mutual
Information Estimation with Annealed and Energy-Based Bounds", App. O.1.1 and
O.2: a generator trained adversarially (with a gradient penalty) whose output,
after a sigmoid, is the mean of a Gaussian observation model with the *fixed*
standard deviation 0.1.  Architecture (shared by the training script
``benchmarks/train_digits_gan.py`` and the packaged example)::

    z ~ N(0, I_10)                                        site "z", shape (10,)
    x | z ~ N(sigmoid(MLP(z)), 0.1^2 I_64)                site "x", shape (64,)
    MLP: 10 -> 256 (ReLU) -> 64

The data are ``sklearn.datasets.load_digits()`` pixels divided by 16, so each
x is a 64-vector in [0, 1] (:func:`~pyro_mi.examples.digits_vae.load_digits_data`).
The noise scale 0.1 is not learned: it is the paper's choice, and it keeps
log p(x|z), hence I(x; z), finite (a GAN alone is a deterministic map z -> x,
whose MI with z is infinite).

The shipped weights (``digits_gan.pt``, written by
``benchmarks/train_digits_gan.py``) were trained as a Wasserstein GAN with
gradient penalty (Gulrajani et al., 2017): the generator's sigmoid means are
the fake samples, the critic is an MLP 64 -> 256 -> 256 -> 1 (LeakyReLU), five
critic steps per generator step, penalty weight 10, Adam (lr 1e-4, betas
(0.5, 0.9)), on a fixed training split of the digits.  The checkpoint kept is
the one with the smallest Gaussian-kernel MMD^2 (:func:`mmd2`) between
generated means and a held-out split of real digits.  A GAN has no encoder,
so the example has no guide; the true MI is not known analytically, and
``pyro-mi estimate --example digits-gan`` brackets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from . import Example
from .digits_vae import load_digits_data

__all__ = [
    "DEFAULTS",
    "MMD_BANDWIDTHS",
    "Generator",
    "load_digits_data",
    "load_digits_gan",
    "make_digits_gan",
    "mmd2",
]

#: Architecture hyper-parameters of the shipped model (``obs_scale`` is fixed).
DEFAULTS: dict[str, Any] = {
    "latent_dim": 10,
    "hidden_dim": 256,
    "obs_dim": 64,
    "obs_scale": 0.1,
}

#: Bandwidths (in pixel units, [0, 1] per pixel) of the Gaussian kernels summed by :func:`mmd2`.
MMD_BANDWIDTHS: tuple[float, ...] = (1.0, 2.0, 4.0)

WEIGHTS_FILE = "digits_gan.pt"


class Generator(nn.Module):
    """The GAN generator / decoder mean: ``sigmoid(MLP(z))`` with one ReLU hidden layer.

    Args:
        latent_dim: dimension of z.
        hidden_dim: width of the single hidden (ReLU) layer.
        obs_dim: dimension of x.
        obs_scale: the fixed standard deviation of the Gaussian observation
            noise around the mean (not a parameter; stored for the model).

    Raises:
        ValueError: if ``obs_scale`` is not positive.
    """

    def __init__(
        self, latent_dim: int = 10, hidden_dim: int = 256, obs_dim: int = 64, obs_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if not obs_scale > 0:
            raise ValueError(f"obs_scale must be positive, got {obs_scale!r}")
        self.hparams = {
            "latent_dim": int(latent_dim), "hidden_dim": int(hidden_dim),
            "obs_dim": int(obs_dim), "obs_scale": float(obs_scale),
        }
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, obs_dim)
        )

    @property
    def latent_dim(self) -> int:
        """Dimension of z."""
        return self.hparams["latent_dim"]

    @property
    def obs_scale(self) -> float:
        """Fixed observation standard deviation (pixel units)."""
        return self.hparams["obs_scale"]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of x given z: shape (..., latent_dim) -> (..., obs_dim), in (0, 1)."""
        return torch.sigmoid(self.net(z))

    def sample_means(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Generated means ``sigmoid(MLP(z))`` of ``num`` prior draws z ~ N(0, I); shape (num, obs_dim).

        Args:
            num: number of draws.
            generator: optional ``torch.Generator`` for the draws of z
                (the global RNG otherwise).
        """
        weight = self.net[0].weight
        z = torch.randn(num, self.latent_dim, generator=generator, dtype=weight.dtype)
        return self(z.to(weight.device))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> float:
    """Unbiased squared maximum mean discrepancy between two samples (Gretton et al., 2012, eq. 3).

    The kernel is a sum of Gaussian kernels ``exp(-|a - b|^2 / (2 h^2))`` over
    the bandwidths h, so the value is comparable only between calls with the
    same bandwidths.  Used by ``benchmarks/train_digits_gan.py`` to select the
    shipped checkpoint (generated means vs held-out real digits).

    Args:
        x: first sample, shape (n, d), n >= 2.
        y: second sample, shape (m, d), m >= 2.
        bandwidths: kernel bandwidths h (in the units of x and y).

    Returns:
        The unbiased MMD^2 estimate (a float; can be slightly negative when the
        two distributions are equal).

    Raises:
        ValueError: if x or y is not 2-D with at least two rows, their widths
            differ, or no bandwidth is given.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(f"mmd2 needs samples of shapes (n, d) and (m, d), n, m >= 2; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if len(bandwidths) == 0:
        raise ValueError("mmd2 needs at least one bandwidth")
    x, y = x.detach().double(), y.detach().double()

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2.0 * h * h)) for h in bandwidths)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def _generate(generator: Generator, x: torch.Tensor | None) -> torch.Tensor:
    """Sample sites "z" and "x" of one (possibly plated) data point."""
    zeros = generator.net[0].weight.new_zeros(generator.latent_dim)
    z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(generator(z), generator.obs_scale).to_event(1), obs=x)


def load_digits_gan(path: str | None = None) -> Generator:
    """Load the trained :class:`Generator` (frozen: no parameter requires grad).

    Args:
        path: checkpoint written by ``benchmarks/train_digits_gan.py``;
            defaults to the ``digits_gan.pt`` shipped inside this package.

    Returns:
        The generator in eval mode on CPU (float32), with ``requires_grad_(False)``;
        the checkpoint's training metadata is attached as ``generator.metadata``
        (a dict: seed, steps, best step, validation MMD^2, ...).

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
    """
    if path is None:
        ref = resources.files(__package__).joinpath(WEIGHTS_FILE)
        with resources.as_file(ref) as p:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    generator = Generator(**ckpt["hparams"])
    generator.load_state_dict(ckpt["state_dict"])
    generator.metadata = dict(ckpt.get("train", {}))
    return generator.eval().requires_grad_(False)


def make_digits_gan(path: str | None = None) -> Example:
    """Build the ``"digits-gan"`` example from the shipped (or given) weights.

    Args:
        path: optional checkpoint path (see :func:`load_digits_gan`).

    Returns:
        An :class:`~pyro_mi.examples.Example` with

        * ``model(x=None)``: z ~ N(0, I_10) (site "z", shape (10,),
          ``.to_event(1)``); x ~ N(sigmoid(MLP(z)), 0.1^2 I_64) (site "x",
          shape (64,), ``.to_event(1)``, ``obs=x``);
        * ``guide=None`` (a GAN has no encoder: pyro_mi fits its own
          proposal by BA on simulated pairs);
        * ``true_mi=None``; ``params`` holds the :class:`Generator`
          (``"generator"``) and the fixed observation scale (``"obs_scale"``,
          float, 0.1).

        The model broadcasts over leading batch dims and uses fixed float32
        CPU weights that do not require grad (gradients still flow to z and x).

    Raises:
        FileNotFoundError: if ``path`` is given and does not exist.
    """
    generator = load_digits_gan(path)

    def model(x: torch.Tensor | None = None) -> torch.Tensor:
        """One digit: z ~ N(0, I_10); x ~ N(sigmoid(MLP(z)), 0.1^2 I_64) (obs=x)."""
        return _generate(generator, x)

    hp = generator.hparams
    return Example(
        name="digits-gan",
        model=model,
        obs_sites=("x",),
        guide=None,
        true_mi=None,
        description=(
            f"WGAN-GP generator on sklearn 8x8 digits, z in R^{hp['latent_dim']}, x in "
            f"R^{hp['obs_dim']}, fixed obs scale {hp['obs_scale']:g} (no encoder, MI unknown)"
        ),
        params={"generator": generator, "obs_scale": hp["obs_scale"]},
    )
