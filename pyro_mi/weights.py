"""Log-space means of importance weights, and their effective sample size.

The one place where pyro_mi averages weights given as logs: every bound, estimator
and loss uses :func:`log_mean_exp` (nats in, nats out, by ``torch.logsumexp``), :func:`log_weight_sums`
and :func:`importance_ess`; jackknife variances over draws shared by points use
:func:`leave_one_out_log_ratios`.
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


def _log_sums(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum w and log sum w^2 over dim 0 (-inf if empty), the weights scaled by their largest
    (detached), as logsumexp does: a weight far below it may underflow, never one that matters."""
    if log_w.shape[0] == 0:
        empty = log_w.new_full(log_w.shape[1:], -math.inf)
        return empty, empty
    top = log_w.detach().amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf: the sums are 0
    w = (log_w - top).exp_()
    return w.sum(0).log() + top, (w * w).sum(0).log() + 2 * top


def log_weight_sums(log_w: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log sum_{k < head} w_k, log sum_k w_k and log sum_k w_k^2 over dim 0, each weight
    exponentiated once: twice as fast as three ``torch.logsumexp`` calls. The first ``head``
    weights and the rest are each scaled by their own largest, so a head far below the rest
    keeps its sum.

    Args:
        log_w: log weights (k, ...); head: 0 <= head <= k.

    Returns:
        three tensors of shape ``log_w.shape[1:]`` (-inf for an empty or all-zero sum).
    """
    head_sum, head_sq = _log_sums(log_w[:head])
    rest_sum, rest_sq = _log_sums(log_w[head:])
    return head_sum, torch.logaddexp(head_sum, rest_sum), torch.logaddexp(head_sq, rest_sq)


def importance_ess(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Kish's effective sample size (sum w)^2 / sum w^2 of importance weights given as log w.

    Between 1 (one weight dominates) and n (equal weights); 0 where every weight is 0.
    Not the MCMC ESS of ``pyro.ops.stats.effective_sample_size`` (autocorrelation-based).

    Args:
        log_w: log importance weights; ``dim`` indexes the samples.

    Returns:
        ``log_w`` reduced over ``dim``.
    """
    _, log_sum, log_sum_sq = log_weight_sums(log_w.movedim(dim, 0), 0)
    return torch.nan_to_num(torch.exp(2 * log_sum - log_sum_sq), nan=0.0)


def leave_one_out_log_ratios(log_w: torch.Tensor, total: torch.Tensor, keep: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """log (S_{-j} / S) for each draw j: (k, ...) -> (k, ...), nats, where S = e^keep + sum_k w_k
    = e^total and S_{-j} leaves w_j out; for jackknife variances over draws shared by data points.

    Args:
        log_w: log weights (k, ...); total: log S (``log_w.shape[1:]``), as computed by the
            caller; keep: a log weight never left out (``log_w.shape[1:]``), or None.

    log1p(-w_j / S) is exact where w_j <= S / 2 (every weight but a dominant one) and close for a
    dominant one; where a weight dominates so far that w_j / S rounds to 1 (log(S - w_j) would
    cancel to -inf), S_{-j} is summed afresh without it.
    """
    r = (log_w - total).exp()
    out = torch.log1p(-r)
    if not bool(torch.isfinite(out).all()):
        top = r > 0.5
        rest = torch.logsumexp(log_w.masked_fill(top, -math.inf), 0)
        if keep is not None:
            rest = torch.logaddexp(rest, keep)
        out = torch.where(top, rest - total, out)
    return out
