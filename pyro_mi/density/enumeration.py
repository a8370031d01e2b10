"""Discrete latent sites marked for enumeration, summed out exactly.

A model may mark discrete latent sites for parallel enumeration (``@config_enumerate``, or
``infer={"enumerate": "parallel"}``), as Pyro's NUTS and ``TraceEnum_ELBO`` require. pyro_mi
then bounds the MI between x and the model's continuous latents z, with the discrete sites d
summed out exactly by the machinery Pyro's NUTS uses (``TraceEinsumEvaluator``): a trace made
under ``poutine.enum`` holds every site's log density with the enumerated values of d in dims of
its own, and :func:`pyro.ops.contract.contract_to_tensor` sums them out, multiplying over every
plate but the ones kept (pyro_mi's chains and data plates):

    log p(x, z) = log sum_d p(x, z, d),    log p(z) = log sum_d p(z, d),

the second over the latent sites' factors alone (a discrete site's own factor sums to one
over its values, so d with only observed children leaves p(z) unchanged).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterable

import torch
from pyro.ops import packed
from pyro.ops.einsum import torch_log
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_subsample

#: the keys of the log densities of an enumerated model (see :func:`contract`)
LATENTS = "the latent sites (discrete ones summed out)"
OBSERVED = "the observed sites (discrete latents summed out)"


def is_enumerated(site: dict) -> bool:
    """Whether a sample site is marked for parallel enumeration."""
    return (site.get("infer") or {}).get("enumerate") == "parallel"


def contract(trace, observed: Iterable[str], keep: Iterable[str] = (), with_observed: bool = True) -> dict:
    """Sums the enumerated sites of ``trace`` (made under ``poutine.enum``) out of its log densities.

    Args:
        trace: a trace of the model conditioned on its continuous latents (and observed values),
            its discrete sites enumerated in parallel.
        observed: the observed site names.
        keep: names of plates whose dims stay in the result (pyro_mi's chains and data plates);
            every other plate is multiplied over.
        with_observed: also give log p(x|z) (False: the observed sites are not scored).

    Returns:
        ``{LATENTS: log p(z), OBSERVED: log p(x|z)}`` in nats (without ``OBSERVED`` when
        ``with_observed`` is False), each with the kept plates' dims in place (size 1 elsewhere).
    """
    observed = set(observed)
    trace.compute_log_prob(lambda name, site: not site_is_subsample(site) and (with_observed or name not in observed))
    trace.pack_tensors()
    factors: OrderedDict = OrderedDict()
    latent_factors: OrderedDict = OrderedDict()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or "log_prob" not in site:
            continue
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
        if name not in observed:
            latent_factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    enum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    # a kept plate of size 1 leaves no dim in the packed factors: the result has size 1 there anyway
    present = {d for terms in factors.values() for t in terms for d in t._pyro_dims}
    target = frozenset(trace.plate_to_symbol[p] for p in keep if trace.plate_to_symbol.get(p) in present)

    def total(tree):
        return packed.unpack(contract_to_tensor(tree, enum_dims, target_ordinal=target), trace.symbol_to_dim)

    log_prior = total(latent_factors)
    out = {LATENTS: log_prior}
    if with_observed:
        out[OBSERVED] = total(factors) - log_prior
    return out


def _log(x: torch.Tensor) -> torch.Tensor:
    """log x, -inf where x is 0, with a finite gradient there (as Pyro's ``safe_log``), written
    with plain tensor ops so that ``torch.func.vmap`` can run it."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).log(), -math.inf)


@contextlib.contextmanager
def vmappable():
    """Inside, Pyro's log-space einsum takes logs by :func:`_log`: its own ``safe_log`` is an
    autograd Function without the ``setup_context`` that ``torch.func.vmap`` requires, so a
    contraction under vmap (a one-data-point model run by vmap) would fail."""
    saved = torch_log.safe_log
    torch_log.safe_log = _log
    try:
        yield
    finally:
        torch_log.safe_log = saved
