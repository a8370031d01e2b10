"""Built-in example models for :mod:`pyro_mi`.

Every example is a *one-data-point* Pyro model ``model(x=None)``: it has no data
plate, samples its latent site(s) and then its observed site(s), which sample
when not conditioned.  ``pyro_mi`` conditions the observed sites with
``poutine.condition`` and vectorises with its own plates, so every site
broadcasts over arbitrary leading batch dimensions.

Available examples (see :data:`EXAMPLES`):

* ``"linear-vae"`` -- linear-Gaussian VAE with an analytic MI
  (:func:`pyro_mi.examples.linear_vae.make_linear_vae`).
* ``"digits-vae"`` -- a small nonlinear VAE trained on scikit-learn's 8x8
  digits, shipped with weights (:func:`pyro_mi.examples.digits_vae.make_digits_vae`).
* ``"digits-gan"`` -- a GAN-like decoder (WGAN-GP generator, fixed Gaussian
  observation noise 0.1, no encoder) trained on the same digits, shipped with
  weights (:func:`pyro_mi.examples.digits_gan.make_digits_gan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["EXAMPLES", "Example", "encoder_path", "get_example", "shipped_encoder"]

#: Names accepted by :func:`get_example`.
EXAMPLES: tuple[str, ...] = ("linear-vae", "digits-vae", "digits-gan")


@dataclass(frozen=True)
class Example:
    """A ready-to-use one-data-point Pyro model, with its ground truth if known.

    Attributes:
        name: registry name, e.g. ``"linear-vae"``.
        model: ``model(x=None)``, a Pyro model of one data point with latent
            site(s) and the observed site(s) named in ``obs_sites``; every site
            broadcasts over leading batch dims (vector sites use
            ``.to_event(1)``).
        obs_sites: names of the observed sites, e.g. ``("x",)``.
        guide: ``guide(x)``, an amortised posterior q(z|x) over the same latent
            sites taking the observed value as keyword ``x`` (broadcasting over
            its leading batch dims), or ``None`` if the example has none.
        true_mi: the exact generative mutual information I(x; z) in nats, or
            ``None`` when it is not known analytically.
        description: one-line human-readable description.
        params: the fixed tensors that define the model (e.g. ``{"W": ..., "b":
            ...}`` for the linear VAE); informational, empty if not useful.
    """

    name: str
    model: Callable[..., Any]
    obs_sites: tuple[str, ...]
    guide: Optional[Callable[..., Any]] = None
    true_mi: Optional[float] = None
    description: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


def get_example(name: str, **kwargs: Any) -> Example:
    """Build the built-in example called ``name``.

    Args:
        name: one of :data:`EXAMPLES` (``"linear-vae"``, ``"digits-vae"``,
            ``"digits-gan"``).
        **kwargs: forwarded to the example's factory
            (:func:`~pyro_mi.examples.linear_vae.make_linear_vae`,
            :func:`~pyro_mi.examples.digits_vae.make_digits_vae` or
            :func:`~pyro_mi.examples.digits_gan.make_digits_gan`).

    Returns:
        The :class:`Example`.

    Raises:
        ValueError: if ``name`` is not a known example (the message lists the
            valid names).
    """
    if name == "linear-vae":
        from .linear_vae import make_linear_vae

        return make_linear_vae(**kwargs)
    if name == "digits-vae":
        from .digits_vae import make_digits_vae

        return make_digits_vae(**kwargs)
    if name == "digits-gan":
        from .digits_gan import make_digits_gan

        return make_digits_gan(**kwargs)
    raise ValueError(
        f"unknown example {name!r}; valid names are: {', '.join(EXAMPLES)}"
    )


def encoder_path(name: str) -> Path:
    """Where the default proposal of example ``name`` is shipped (see :func:`shipped_encoder`)."""
    return Path(__file__).with_name(f"{name.replace('-', '_')}_encoder.pt")


def shipped_encoder(name: str) -> Optional[Callable[[Any], Any]]:
    """The default proposal of the built-in example ``name`` at its default settings, shipped
    instead of fitted on every run: a function ``density -> GaussianEncoder`` for
    :func:`pyro_mi.estimate_mi`'s ``proposal``, or None where none is shipped.

    The file holds the encoder that :func:`pyro_mi.make_proposal` fits on the example's model
    (BA, 1000 steps; Barber & Agakov 2003) as ``estimate_mi(..., seed=0)`` fits it, its prior
    mixture weight and its fit's summary; ``benchmarks/fit_example_encoders.py`` writes it.
    Loaded with ``weights_only=True``.

    Raises:
        ValueError (when the function is called): a density whose dimensions differ from the
        shipped encoder's (an example built with other arguments).
    """
    path = encoder_path(name)
    if not path.exists():
        return None

    def build(density):
        import torch

        from ..proposal import GaussianEncoder
        from ..training import TrainingLog

        saved = torch.load(path, weights_only=True)
        dims = (density.obs_dim, density.latent_dim)
        if tuple(saved["dims"]) != dims:
            raise ValueError(f"the shipped encoder of {name!r} is for (obs_dim, latent_dim) = {tuple(saved['dims'])}, "
                             f"not {dims}")
        q = GaussianEncoder(density, hidden_sizes=tuple(saved["hidden_sizes"]))
        q.load_state_dict(saved["state_dict"])
        q.prior_weight = saved["prior_weight"]
        fit = saved["fit"]
        q.fit_log = TrainingLog(steps=fit["steps"], best_step=fit["best_step"], best_value=fit["best_value"],
                                stopped_early=fit["stopped_early"], stop_reason=fit["stop_reason"])
        q.fit_log.prior_weights, q.fit_log.prior_wins = fit["prior_weights"], fit["prior_wins"]
        return q

    build.description = f"the shipped encoder of {name!r} (fitted by BA, not refitted)"
    return build
