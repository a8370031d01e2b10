"""A paper-scale AIS run on a GPU: seconds per 1,000 annealing steps, by ``compile`` mode.

Brekelmans et al. 2022 ran AIS on MNIST VAEs for T = 30,000 steps, which took about 8 h
on a P100 (App. O.1.3). This script times :func:`pyro_mi.bounds.ais_bounds` (pilot,
forward and reverse chains: the full default sandwich) on a VAE decoder of the digits
VAE's architecture, widened to z in R^100 (``--latent``, ``--hidden``; random weights
from a fixed seed, 64 pixels or ``--pixels 784``, MNIST's), or the shipped 8-dimensional ``digits-vae`` (``--model
digits-vae``), with K chains per point for N simulated points, and prints, per mode of
:mod:`pyro_mi.samplers.compile`, the wall time, the time per 1,000 annealing steps and
the bounds (which agree across modes: the same kernels and random numbers). Usage::

    python benchmarks/ais_gpu_scale.py [--steps 10000] [--chains 48] [--num-data 64]
        [--latent 100] [--hidden 512] [--pixels 64] [--modes none trace inductor] [--model wide]

The paper's scale (MNIST's 784 pixels, K = 48 chains, T = 30,000; its latent sizes 2, 10
and 100)::

    python benchmarks/ais_gpu_scale.py --pixels 784 --latent 100 --chains 48 --steps 30000 --modes inductor

Runs on CUDA when available, else on the CPU (then use far fewer steps).
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch

from pyro_mi.bounds import ais_bounds
from pyro_mi.density import ModelDensity
from pyro_mi.examples.digits_vae import Decoder, load_digits_vae
from pyro_mi.proposal import PriorProposal


def build_model(kind: str, latent: int, hidden: int, device: torch.device, pixels: int = 64):
    """(model, latent_dim): the digits VAE decoder on ``device``, shipped or widened (to ``pixels``
    outputs)."""
    if kind == "digits-vae":
        decoder = load_digits_vae().decoder
    else:
        torch.manual_seed(0)
        decoder = Decoder(latent_dim=latent, hidden_dim=hidden, obs_dim=pixels)
        decoder.requires_grad_(False)
        for p in decoder.net.parameters():  # a decoder whose x depends strongly on z: MI of tens of nats
            p.mul_(3.0)
        decoder.raw_scale.fill_(-5.0)  # sigma = 0.05 + softplus(-5) = 0.057
    decoder = decoder.to(device)
    D = decoder.net[0].in_features
    zeros = torch.zeros(D, device=device)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(decoder(z), decoder.obs_scale()).to_event(1), obs=x)

    return model, D


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("wide", "digits-vae"), default="wide")
    ap.add_argument("--latent", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--pixels", type=int, default=64, help="the wide decoder's outputs (784: MNIST's)")
    ap.add_argument("--chains", type=int, default=48, help="K, forward chains per data point")
    ap.add_argument("--num-data", type=int, default=64, help="N simulated data points")
    ap.add_argument("--steps", type=int, default=10000, help="T annealing steps")
    ap.add_argument("--leapfrog", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["none", "trace", "inductor"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, D = build_model(args.model, args.latent, args.hidden, device, args.pixels)
    density = ModelDensity(model, "x")
    pyro.set_rng_seed(0)
    x, z = density.sample(args.num_data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} (z in R^{D}, x in R^{x['x'].shape[-1]}), K={args.chains} x N={args.num_data}, T={args.steps}, L={args.leapfrog}, "
          f"prior as pi0, adapt=pilot; {name}; torch {torch.__version__}")
    print(f"{'compile':9} {'wall s':>8} {'s / 1000 steps':>15} {'lower':>9} {'upper':>9}  notes")
    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = ais_bounds(density, PriorProposal(density), x, z, num_chains=args.chains, num_steps=args.steps,
                       num_leapfrog=args.leapfrog, generator=torch.Generator().manual_seed(0), progress=False,
                       compile=mode, precondition="none")
        wall = time.perf_counter() - t  # r.lower is a float: the run has finished on the device
        print(f"{mode:9} {wall:8.1f} {wall / args.steps * 1000:15.3f} {r.lower:9.3f} {r.upper:9.3f}  "
              f"{'; '.join(r.notes + r.warnings)[:120]}", flush=True)


if __name__ == "__main__":
    main()
