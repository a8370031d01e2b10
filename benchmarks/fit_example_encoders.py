"""Fit the default proposal of each built-in example and ship it (``pyro_mi/examples/*_encoder.pt``).

``pyro-mi estimate --example NAME`` then loads the encoder instead of fitting it on every run
(the fit, and the compiler stack that building a torch optimiser imports, were most of the first
command's start-up). Each encoder is fitted exactly as the command fits it at its defaults
(``estimate_mi(..., seed=0)``, N = 1024 simulated points, then :class:`GaussianEncoder` and
:func:`fit_guide` with 1000 steps, on the same random numbers), then saved with its prior mixture
weight and its fit's summary as plain tensors and numbers (read with ``weights_only=True``).
Prints each encoder's held-out BA estimate (nats).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fit_example_encoders.py [--examples digits-vae digits-gan linear-vae]
"""

from __future__ import annotations

import argparse

import torch

import pyro_mi
from pyro_mi.examples import encoder_path, get_example
from pyro_mi.proposal import GaussianEncoder, fit_guide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", nargs="+", default=["digits-vae", "digits-gan", "linear-vae"])
    args = ap.parse_args()
    for name in args.examples:
        ex = get_example(name)
        fitted = []

        def fit(density):  # the default path of make_proposal, step for step
            q = GaussianEncoder(density)
            fit_guide(density, q, num_steps=1000, progress=False)
            fitted.append((q, density))
            return q

        pyro_mi.estimate_mi(ex.model, ex.obs_sites, method="ba", proposal=fit, num_data=1024, seed=0, progress=False)
        q, density = fitted[0]
        log = q.fit_log
        torch.save({
            "dims": [density.obs_dim, density.latent_dim],
            "hidden_sizes": [m.out_features for m in q.net if isinstance(m, torch.nn.Linear)][:-1],
            "state_dict": q.state_dict(),
            "prior_weight": float(q.prior_weight),
            "fit": {"steps": log.steps, "best_step": log.best_step, "best_value": log.best_value,
                    "stopped_early": log.stopped_early, "stop_reason": log.stop_reason,
                    "prior_weights": {float(k): float(v) for k, v in getattr(log, "prior_weights", {}).items()},
                    "prior_wins": bool(getattr(log, "prior_wins", False))},
        }, encoder_path(name))
        print(f"{name}: held-out BA {log.best_value:.3f} nats after {log.steps} steps, prior weight "
              f"{q.prior_weight:g} -> {encoder_path(name).name}")


if __name__ == "__main__":
    main()
