"""Log-space means of importance weights, and their effective sample size.

The one place where pyro_mi averages weights given as logs: every bound, estimator
and loss uses :func:`log_mean_exp` (nats in, nats out, by ``torch.logsumexp``) and
:func:`importance_ess`.
"""

from __future__ import annotations

import math

import torch


def log_mean_exp(t: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """log (1/n) sum exp(t) over ``dim`` (all elements if None), by logsumexp; nats in, nats out.

    Args:
        t: log values, any shape.
        dim: the dim or dims averaged over (their sizes multiply to n), or None for all.

    Returns:
        ``t`` reduced over ``dim``.
    """
    if dim is None:
        return torch.logsumexp(t.flatten(), 0) - math.log(t.numel())
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return torch.logsumexp(t, dims) - math.log(math.prod(t.shape[d] for d in dims))


def importance_ess(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Kish's effective sample size (sum w)^2 / sum w^2 of importance weights given as log w.

    Between 1 (one weight dominates) and n (equal weights); 0 where every weight is 0.
    Not the MCMC ESS of ``pyro.ops.stats.effective_sample_size`` (autocorrelation-based).

    Args:
        log_w: log importance weights; ``dim`` indexes the samples.

    Returns:
        ``log_w`` reduced over ``dim``.
    """
    ess = torch.exp(2 * torch.logsumexp(log_w, dim) - torch.logsumexp(2 * log_w, dim))
    return torch.nan_to_num(ess, nan=0.0)
