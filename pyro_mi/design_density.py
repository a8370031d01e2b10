"""The density of a model over experimental designs: :class:`~pyro_mi.density.ModelDensity` with
what :func:`pyro_mi.eig` needs of it beyond bounding one model's MI: new design values without a
new probe (:meth:`DesignDensity.with_values`), and prior draws shared by the simulated experiments of
one design (``nmc_eig``'s inner samples, :meth:`DesignDensity.shared_prior_likelihood`)."""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask

from .density import Data, ModelDensity, site_log_prob
from .density.plates import sample_sites
from .density.probe import DATA_PLATE_WAYS


class DesignDensity(ModelDensity):
    """A :class:`~pyro_mi.density.ModelDensity` of a model of a design (its arguments and covariates
    are the design), built and probed as one; see there for its arguments."""

    def with_values(self, model_args: tuple | None = None,
                    covariates: Mapping[str, torch.Tensor] | None = None) -> "ModelDensity | None":
        """This density with new values of its positional arguments and covariates, of the same
        shapes, dtypes and devices, keeping what the probe learnt (sites, layout, the way of running
        a batch and its checks) so that a caller evaluating many designs or inputs of one model pays
        the probe once. The model is traced once on the new values; if its sites differ from the
        probe's (names, distribution types, batch and event shapes), or a value differs in shape,
        dtype or device, the result is None and the caller builds a new density."""
        args = self.model_args if model_args is None else tuple(model_args)
        new_cov = dict(covariates or {})
        old = [*zip(self.model_args, args), *((self.arguments.kwargs[k], v) for k, v in new_cov.items()
                                              if k in self._covariates)]
        if len(args) != len(self.model_args) or set(new_cov) - set(self._covariates) or not all(
                _same_layout(a, b) for a, b in old):
            return None
        new = copy.copy(self)
        new.model_args = args
        new.arguments = copy.copy(self.arguments)
        new.arguments.args = args
        new.arguments.kwargs = {**self.arguments.kwargs, **new_cov}
        new.notices, new.warnings = list(self.notices), []
        sites = {s["name"]: s for s in sample_sites(new._bare_trace())}
        if _structure(sites) != _structure(self.site_fns):
            return None
        new.site_fns = {k: s["fn"] for k, s in sites.items()}
        if not self.has_data_plate:  # the point-by-point runners call the new density's model
            new._alone = new._pointwise(sites, "loop")
            new._points = None if self.vectorize in DATA_PLATE_WAYS else new._pointwise(sites, self.vectorize)
        return new

    @property
    def template_rows(self) -> int:
        """R, the rows of the model's data plate (1 for a model without one): data point i of a
        simulation has the per-point arguments of row i % R."""
        return self.arguments.rows if self.has_data_plate else 1

    def shared_prior_reason(self) -> str | None:
        """Why prior draws cannot be shared by the data points of a template row
        (:meth:`shared_prior_likelihood`); None when they can."""
        obs = self.obs_sites[-1]
        if self._points is not None or self._plates.folded:
            return f"the model runs {self.vectorize}, not batched"
        if self.enumerated:
            return "it has enumerated discrete sites"
        if len(self.obs_sites) != 1 or list(self.site_fns)[-1] != obs:
            return "it needs one observed site, sampled after every other site"
        if any(isinstance(fn, dist.Unit) for fn in self.site_fns.values()) or self._no_density:
            return "it needs a model without pyro.factor and an observed site with a density"
        return None

    def shared_prior_likelihood(self, num_samples: int) -> tuple[Callable[[Data], torch.Tensor], torch.Tensor]:
        """Draws K = ``num_samples`` latents z_k ~ p(z) per template row (:attr:`template_rows`)
        and returns ``(log_lik, z)``: ``log_lik(x) -> (K, n)`` gives log p(x_i|z_k), nats, for
        observed values ``{site: (n, *shape)}`` whose point i has row i % R, and z (K, R, D) is
        the packed draws. The K draws of a row are shared by
        all its points (``nmc_eig``'s inner samples): the model runs once, on K x R points, and
        its observed site's distribution scores every point by broadcasting, so the model's own
        computation scales with K·R, not K·n. With gradients on, latents are drawn by ``rsample``.

        Raises:
            ValueError: :meth:`shared_prior_reason` is not None (the reason), or n is not a
                multiple of R.
        """
        why = self.shared_prior_reason()
        if why is not None:
            raise ValueError(f"prior draws cannot be shared by data points: {why}")
        K, R, obs, pos = num_samples, self.template_rows, self.obs_sites[0], self._plates.pos
        with pyro.validation_enabled(False):  # a draw where p(x|z) = 0 scores -inf, not an error (as in IWAE)
            trace = self._trace(K, R, {}, sample_obs=True)
        site = next(s for s in sample_sites(trace) if s["name"] == obs)
        z = self.pack({k: v for k, v in self._plates.values(trace, K, R).items() if k in self._latent_names})

        def log_lik(x: Data) -> torch.Tensor:
            v = self.check_data(x)[obs]
            m = v.shape[0] // R
            if m * R != v.shape[0]:
                raise ValueError(f"{v.shape[0]} data points are not a multiple of the template's {R} rows")
            # (m, 1, 1.., R, *shape): the m points of each row, broadcast against the K draws
            value = v.reshape((m, 1) + (1,) * pos + (R,) + v.shape[1:])
            lp = scale_and_mask(site_log_prob(site["fn"], value), site["scale"], site["mask"])
            lp = lp.expand((m, K) + lp.shape[2:]).reshape((m * K,) + lp.shape[2:])
            lp = self._plates.per_point(lp, m * K, R).reshape(m, K, R)
            return lp.transpose(0, 1).reshape(K, m * R)

        return log_lik, z


def _same_layout(a, b) -> bool:
    """Whether two argument values can stand for each other in a probed density: tensors of one
    shape, dtype and device, or equal non-tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device)
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. an array's elementwise comparison
        return False


def _structure(sites: Mapping) -> dict:
    """``{site: (distribution type, batch shape, event shape)}`` of ``{site: fn or trace site}``."""
    fns = {k: s["fn"] if isinstance(s, dict) else s for k, s in sites.items()}
    return {k: (type(fn), tuple(fn.batch_shape), tuple(fn.event_shape)) for k, fn in fns.items()}


__all__ = ["DesignDensity"]
