"""Cost of exact-by-default AIS: the step-size pilot against the old online adaptation.

For each example and number of annealing steps T, runs the ``ais`` bound three ways on
the same simulated points (``precondition="none"``: the adaptation modes alone), interleaved, best of
``--repeats`` wall times in one process:

* ``pilot`` (default, exact): a pilot of 8 chains on a T/5-step sub-grid tunes step sizes,
  which are frozen per beta and data point for the bound-bearing chains;
* ``online`` (approximate): each forward chain adapts its step size as it anneals
  (Brekelmans et al. 2022, App. O.1.2), the old default;
* ``none`` (exact): the initial step size 0.05 throughout.

Prints seconds, the ratio to ``online`` (cost of exactness), the gap, the mean acceptance
and, for linear-vae (prior as pi0, exact MI known), the bounds. Usage::

    OMP_NUM_THREADS=1 python benchmarks/ais_exact_cost.py [--num-data 64] [--steps 30 100 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from pyro_mi.bounds import ais_bounds
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import GaussianEncoder, PriorProposal, fit_guide

MODES = ("pilot", "online", "none")


def setup(name: str, num_data: int):
    ex = get_example(name)
    d = ModelDensity(ex.model, ex.obs_sites)
    pyro.set_rng_seed(0)
    x, z = d.sample(num_data)
    if name == "linear-vae":
        return ex, d, x, z, PriorProposal(d), "prior"
    q = GaussianEncoder(d)
    fit_guide(d, q, num_steps=500, progress=False)
    return ex, d, x, z, q, "fitted encoder"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-data", type=int, default=64)
    ap.add_argument("--num-chains", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100, 300])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", nargs="+", default=["linear-vae", "digits-vae"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"ais, K = {args.num_chains}, N = {args.num_data}, L = 2, best of {args.repeats} (one thread)\n")
    print("| example | pi0 | T | adapt | seconds | ÷ online | lower | upper | gap | accept | true MI |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.examples:
        ex, d, x, z, q, q_name = setup(name, args.num_data)
        for T in args.steps:
            best, res = {m: float("inf") for m in MODES}, {}
            for _ in range(args.repeats):
                for m in MODES:
                    t = time.perf_counter()
                    res[m] = ais_bounds(d, q, x, z, num_chains=args.num_chains, num_steps=T, adapt=m, precondition="none",
                                        generator=torch.Generator().manual_seed(1), progress=False)
                    best[m] = min(best[m], time.perf_counter() - t)
            for m in MODES:
                r = res[m]
                truth = "—" if ex.true_mi is None else f"{ex.true_mi:.3f}"
                print(f"| {name} | {q_name} | {T} | {m} | {best[m]:.2f} | {best[m] / best['online']:.2f} | "
                      f"{r.lower:.3f} | {r.upper:.3f} | {r.gap:.3f} | {r.diagnostics['accept_rate']:.2f} | {truth} |",
                      flush=True)


if __name__ == "__main__":
    main()
