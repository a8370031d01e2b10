"""Fingerprints of every method's numbers, to check that a refactoring moves none of them.

Runs each method of ``estimate_mi`` (and ``eig``) on small seeded problems and prints, per run, a
hash of its per-point lower and upper values (their float64 bytes), the means, the settings it
reports and how many warnings and notes it carries. Two checkouts that print the same table give the
same numbers, bit for bit. Usage::

    OMP_NUM_THREADS=1 python benchmarks/fingerprints.py > after.txt    # and at the older commit; diff
"""

from __future__ import annotations

import hashlib

import pyro
import pyro.distributions as dist
import torch

from pyro_mi import eig, estimate_mi
from pyro_mi.examples import get_example

#: (method, options) of the estimate_mi runs: every method, each adapt mode, a traced run
RUNS = [
    ("ba", dict(num_particles=3)),
    ("iwae", dict(num_particles=20, points_per_block=16)),
    ("ais", dict(num_chains=3, num_steps=20)),
    ("im-ais", dict(num_chains=2, num_steps=10, adapt="none", step_size=0.1)),
    ("cr-ais", dict(num_chains=2, num_steps=10, refine=0.0)),
    ("bdmc", dict(num_chains=2, num_steps=10, adapt="online", schedule="linear")),
    ("ais", dict(num_chains=2, num_steps=50, num_leapfrog=3, compile="trace", points_per_block=20)),
    ("giwae", dict(num_particles=10, max_steps=30)),
    ("infonce", dict(num_particles=10, max_steps=30)),
    ("mine-ais", dict(num_chains=2, num_steps=10, max_steps=20, num_negative_steps=2)),
    ("mine-ais", dict(num_chains=2, num_steps=10, likelihood_steps=20, max_steps=10)),
]


def digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha1(t.detach().double().numpy().tobytes()).hexdigest()[:12]


def linear_design_model(design):
    with pyro.plate_stack("p", design.shape[:-1]):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        return pyro.sample("y", dist.Normal(theta.unsqueeze(-1) * design, 1.0).to_event(1))


def main() -> None:
    torch.set_num_threads(1)
    ex = get_example("linear-vae")
    print("| method | options | lower hash | upper hash | lower, upper | settings | warnings, notes |")
    print("|---|---|---|---|---|---|---|")
    for method, options in RUNS:
        r = estimate_mi(ex.model, ex.obs_sites, method=method, num_data=48, fit_steps=50, progress=False, **options)
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r.settings.items(), key=str))
        print(f"| {method} | {options} | {digest(r.lower_per_point)} | {digest(r.upper_per_point)} | "
              f"{r.lower!r}, {r.upper!r} | {settings} | {len(r.warnings)}, {len(r.notes)} |")
    design = torch.linspace(0.1, 2, 4).reshape(4, 1)
    for method, options in (("iwae", dict(num_data=64, num_particles=10)), ("ba", dict(num_data=64, num_particles=10)),
                            ("ais", dict(num_data=32, num_chains=2, num_steps=10))):
        r = eig(linear_design_model, design, ["y"], ["theta"], method=method, **options)
        print(f"| eig {method} | {options} | {digest(r.lower)} | {digest(r.upper)} | | | |")


if __name__ == "__main__":
    main()
