"""A small nonlinear VAE on scikit-learn's 8x8 digits, with shipped weights.

Architecture (shared by the training script ``benchmarks/train_digits_vae.py``
and the packaged example)::

    z ~ N(0, I_8)                                         site "z", shape (8,)
    x | z ~ N(sigmoid(MLP(z)), sigma^2 I_64)              site "x", shape (64,)
    MLP: 8 -> 128 (softplus) -> 64;  sigma = 0.05 + softplus(rho), one learned scalar
    q(z | x) = N(loc(x), diag scale(x)^2)                 encoder 64 -> 128 (softplus) -> 2 x 8

The data are ``sklearn.datasets.load_digits()`` pixels divided by 16, so each
x is a 64-vector in [0, 1].  The floor of 0.05 on sigma keeps log p(x|z) and
hence I(x; z) finite and moderate.

The shipped weights (``digits_vae.pt``, written by
``benchmarks/train_digits_vae.py``) were fitted by SVI on the ELBO; the guide
is the VAE's own encoder, trained on real digits only. The true MI is not known
analytically; ``pyro-mi estimate --example digits-vae`` brackets it.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from . import Example

__all__ = [
    "DEFAULTS",
    "Decoder",
    "DigitsVAE",
    "Encoder",
    "load_digits_data",
    "load_digits_vae",
    "make_digits_vae",
]

#: Architecture hyper-parameters of the shipped model.
DEFAULTS: dict[str, Any] = {
    "latent_dim": 8,
    "hidden_dim": 128,
    "obs_dim": 64,
    "min_scale": 0.05,
}

WEIGHTS_FILE = "digits_vae.pt"


def load_digits_data(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return scikit-learn's bundled 8x8 digits as a tensor.

    Args:
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape (1797, 64): each row one image, pixels divided by 16
        so that values lie in [0, 1].

    Raises:
        ImportError: if scikit-learn is not installed (``pip install
            "pyro-mi[examples]"``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on environment
        raise ImportError(
            "the digits data need scikit-learn: pip install 'pyro-mi[examples]'"
        ) from err
    return torch.as_tensor(load_digits().data / 16.0, dtype=dtype)


def load_digits_28(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The digits of :func:`load_digits_data` upsampled (bilinear) to MNIST's 28 x 28, for models
    written for MNIST such as Pyro's VAE (``pyro_mi.examples.zoo.VAE``): (1797, 784) in [0, 1]."""
    x = load_digits_data(dtype).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).reshape(-1, 784)


class Decoder(nn.Module):
    """p(x|z): mean ``sigmoid(MLP(z))`` and a learned scalar scale >= ``min_scale``.

    Args:
        latent_dim: dimension of z.
        hidden_dim: width of the single hidden (softplus) layer.
        obs_dim: dimension of x.
        min_scale: floor on the observation standard deviation.
    """

    def __init__(
        self, latent_dim: int = 8, hidden_dim: int = 128, obs_dim: int = 64,
        min_scale: float = 0.05,
    ) -> None:
        super().__init__()
        self.min_scale = float(min_scale)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, obs_dim)
        )
        self.raw_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of x given z: shape (..., latent_dim) -> (..., obs_dim), in (0, 1)."""
        return torch.sigmoid(self.net(z))

    def obs_scale(self) -> torch.Tensor:
        """Observation standard deviation ``min_scale + softplus(raw_scale)`` (scalar)."""
        return self.min_scale + nn.functional.softplus(self.raw_scale)


class Encoder(nn.Module):
    """q(z|x): diagonal Gaussian with an MLP for its location and scale.

    Args:
        latent_dim: dimension of z.
        hidden_dim: width of the single hidden (softplus) layer.
        obs_dim: dimension of x.
    """

    def __init__(self, latent_dim: int = 8, hidden_dim: int = 128, obs_dim: int = 64) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * latent_dim)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loc, scale)`` of q(z|x), each (..., latent_dim), for x (..., obs_dim)."""
        loc, raw = self.net(x).split(self.latent_dim, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-4


def _generate(decoder: Decoder, latent_dim: int, x: Optional[torch.Tensor]) -> torch.Tensor:
    """Sample sites "z" and "x" of one (possibly plated) data point."""
    zeros = decoder.raw_scale.new_zeros(latent_dim)
    z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
    return pyro.sample(
        "x", dist.Normal(decoder(z), decoder.obs_scale()).to_event(1), obs=x
    )


def _posterior(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Sample site "z" from q(z|x) for x of shape (..., obs_dim)."""
    loc, scale = encoder(x)
    return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class DigitsVAE(nn.Module):
    """The digits VAE: a :class:`Decoder`, an :class:`Encoder` and Pyro programs.

    ``model`` / ``guide`` are the usual *plate-style* training programs over a
    mini-batch (used by ``benchmarks/train_digits_vae.py`` with ``SVI``);
    :func:`make_digits_vae` wraps the trained networks as one-data-point
    programs for :mod:`pyro_mi`.

    Args:
        latent_dim, hidden_dim, obs_dim, min_scale: see :class:`Decoder`.
    """

    def __init__(
        self, latent_dim: int = 8, hidden_dim: int = 128, obs_dim: int = 64,
        min_scale: float = 0.05,
    ) -> None:
        super().__init__()
        self.hparams = {
            "latent_dim": int(latent_dim), "hidden_dim": int(hidden_dim),
            "obs_dim": int(obs_dim), "min_scale": float(min_scale),
        }
        self.decoder = Decoder(latent_dim, hidden_dim, obs_dim, min_scale)
        self.encoder = Encoder(latent_dim, hidden_dim, obs_dim)

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """Plate-style generative model p(z) p(x|z) of a batch x, shape (N, obs_dim)."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            return _generate(self.decoder, self.hparams["latent_dim"], x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """Plate-style amortised posterior q(z|x) of a batch x, shape (N, obs_dim)."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            return _posterior(self.encoder, x)


def load_digits_vae(path: Optional[str] = None) -> DigitsVAE:
    """Load a trained :class:`DigitsVAE` (frozen: no parameter requires grad).

    Args:
        path: checkpoint written by ``benchmarks/train_digits_vae.py``;
            defaults to the ``digits_vae.pt`` shipped inside this package.

    Returns:
        The network in eval mode on CPU, with ``requires_grad_(False)``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
    """
    if path is None:
        ref = resources.files(__package__).joinpath(WEIGHTS_FILE)
        with resources.as_file(ref) as p:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    vae = DigitsVAE(**ckpt["hparams"])
    vae.load_state_dict(ckpt["state_dict"])
    return vae.eval().requires_grad_(False)


def make_digits_vae(path: Optional[str] = None) -> Example:
    """Build the ``"digits-vae"`` example from the shipped (or given) weights.

    Args:
        path: optional checkpoint path (see :func:`load_digits_vae`).

    Returns:
        An :class:`~pyro_mi.examples.Example` with

        * ``model(x=None)``: z ~ N(0, I_8) (site "z", shape (8,),
          ``.to_event(1)``); x ~ N(decoder(z), sigma^2 I_64) (site "x",
          shape (64,), ``.to_event(1)``, ``obs=x``);
        * ``guide(x)``: the trained encoder, z ~ N(loc(x), diag scale(x)^2)
          (site "z"), for x of shape (..., 64), fitted to the model's own
          samples (see the module docstring); raises ``ValueError`` if
          called without ``x``;
        * ``true_mi=None``; ``params`` holds the ``DigitsVAE`` module
          (``"vae"``) and the observation scale (``"obs_scale"``, float).

        Both programs broadcast over leading batch dims and use fixed float32
        CPU weights that do not require grad (gradients still flow to z and x).
    """
    vae = load_digits_vae(path)
    latent_dim = vae.hparams["latent_dim"]
    decoder, encoder = vae.decoder, vae.encoder

    def model(x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One digit: z ~ N(0, I_8); x ~ N(decoder(z), sigma^2 I_64) (obs=x)."""
        return _generate(decoder, latent_dim, x)

    def guide(x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Amortised q(z|x) for x of shape (..., 64); site "z" of shape (..., 8)."""
        if x is None:
            raise ValueError("digits-vae guide needs the observed value: guide(x=...)")
        return _posterior(encoder, x)

    sigma = float(decoder.obs_scale())
    return Example(
        name="digits-vae",
        model=model,
        obs_sites=("x",),
        guide=guide,
        true_mi=None,
        description=(
            f"Gaussian VAE on sklearn 8x8 digits, z in R^{latent_dim}, x in "
            f"R^{vae.hparams['obs_dim']}, learned obs scale {sigma:.3f} "
            "(IWAE sandwich: MI about 16.3-17.0 nats)"
        ),
        params={"vae": vae, "obs_scale": sigma},
    )
