"""A guide's run at pyro_mi's batch layout (:meth:`~pyro_mi.density.ModelDensity.trace_guide`)."""

from __future__ import annotations

from typing import Sequence

import torch

from .plates import PlateLayout, sample_sites
from .sites import scaled_log_prob


class GuideTrace:
    """A guide run K times on each of N data points, in the model's batch layout: its sample sites,
    their values and their per-point log densities.

    Args:
        trace: the Pyro trace; plates: the model's :class:`~pyro_mi.density.plates.PlateLayout`;
        num_samples: K; num_data: N.
    """

    def __init__(self, trace, plates: PlateLayout, num_samples: int, num_data: int):
        self.trace, self._plates, self.num_samples, self.num_data = trace, plates, num_samples, num_data
        #: the sample sites of the trace (Pyro's site dicts: ``name``, ``fn``, ``value``, ...)
        self.sites = sample_sites(trace)

    def values(self) -> dict[str, torch.Tensor]:
        """``{site: value (K, 1.., N, *shape)}`` of the sample sites but ``pyro.factor`` ones."""
        return self._plates.values(self.trace, self.num_samples, self.num_data)

    def point_shape(self, site: str) -> torch.Size:
        """The shape of one data point of ``site``'s value."""
        return self._plates.point_shape(next(s["value"] for s in self.sites if s["name"] == site))

    def log_prob(self, sites: Sequence[str]) -> torch.Tensor:
        """The log densities of the named sites summed per run and data point: (K, N), nats."""
        total = 0.0
        for s in self.sites:
            if s["name"] in sites:
                total = total + self._plates.per_point(scaled_log_prob(s), self.num_samples, self.num_data)
        return total


__all__ = ["GuideTrace"]
