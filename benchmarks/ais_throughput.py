"""AIS throughput on the linear-vae example: pyro_mi vs Pyro's stock HMC vs a plain torch loop.

All three run the same work, K chains per data point for N data points, T annealing
steps and L leapfrog steps per transition, and are reported in chain-steps per
second (one chain-step = one HMC transition of one chain for one data point):

* ``pyro_mi``: :func:`pyro_mi.samplers.anneal` through the density layer (one Pyro
  trace per leapfrog step, every chain and data point in one tensor);
* ``pyro HMC``: ``pyro.infer.mcmc.HMC`` / ``MCMC`` on the same one-data-point model
  conditioned on one x, one chain at a time at a fixed beta (its kernel takes one
  scalar state and cannot anneal many chains), with a few chains run and the rate
  extrapolated per chain-step;
* ``plain torch``: a hand-written loop with the linear-Gaussian log densities written
  out in torch (no Pyro), the same HMC arithmetic.

Usage: ``python benchmarks/ais_throughput.py [--chains 512] [--num-data 8] [--steps 20]
[--leapfrog 2] [--threads 2]``. Runs on CUDA too when available.
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_mi.bounds.ais import components_fn
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import PriorProposal
from pyro_mi.samplers import anneal, get_schedule


def bench_pyro_mi(device, K, N, T, L):
    ex = get_example("linear-vae")
    W, b = ex.params["W"].to(device), ex.params["b"].to(device)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(10, device=device), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x)

    d = ModelDensity(model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(N)
    q = PriorProposal(d)
    comps = components_fn(d, q, x)
    z0 = q.rsample(x, K)[0]
    rev = torch.zeros(K, dtype=torch.bool, device=device)
    betas = get_schedule("linear", T)
    anneal(comps, z0, rev, get_schedule("linear", 2), num_leapfrog=L, record=False)  # warm-up
    _sync(device)
    t = time.perf_counter()
    st = anneal(comps, z0, rev, betas, num_leapfrog=L, step_size=0.05, record=False)
    st.log_weights.sum().item()
    _sync(device)
    return K * N * (T - 1) / (time.perf_counter() - t)


def bench_plain(device, K, N, T, L):
    """A hand-written AIS loop: explicit log densities and gradients, per-chain MH and step sizes."""
    ex = get_example("linear-vae")
    W, b = ex.params["W"].to(device), ex.params["b"].to(device)
    torch.manual_seed(0)
    x = torch.randn(10, N, device=device).T @ W.T + b + torch.randn(N, 100, device=device)

    def parts(z):  # log prior, log likelihood and their gradients
        r = x - (z @ W.T + b)
        lp = -0.5 * (z * z).sum(-1) - 5 * math.log(2 * math.pi)
        ll = -0.5 * (r * r).sum(-1) - 50 * math.log(2 * math.pi)
        return lp, ll, -z, r @ W

    betas = get_schedule("linear", T).to(device=device, dtype=torch.float32)
    z = torch.randn(K, N, 10, device=device)
    eps = torch.full((K, N), 0.05, device=device)
    lp, ll, gp, gl = parts(z)
    logw = torch.zeros(K, N, device=device)
    _sync(device)
    t = time.perf_counter()
    for j in range(1, T + 1):
        logw = logw + (betas[j] - betas[j - 1]) * ll
        if j == T:
            break
        beta = betas[j]
        r0 = torch.randn_like(z)
        zn, r = z, r0 + 0.5 * eps[..., None] * (gp + beta * gl)
        for i in range(L):
            zn = zn + eps[..., None] * r
            lpn, lln, gpn, gln = parts(zn)
            g = gpn + beta * gln
            r = r + (0.5 if i == L - 1 else 1.0) * eps[..., None] * g
        dh = -(lpn + beta * lln) + 0.5 * (r * r).sum(-1) + (lp + beta * ll) - 0.5 * (r0 * r0).sum(-1)
        acc = torch.exp(torch.clamp(-dh, max=0.0)).nan_to_num(0.0)
        a = torch.rand_like(acc) < acc
        z = torch.where(a[..., None], zn, z)
        lp, ll = torch.where(a, lpn, lp), torch.where(a, lln, ll)
        gp, gl = torch.where(a[..., None], gpn, gp), torch.where(a[..., None], gln, gl)
        eps = torch.where(acc > 0.65, eps * 1.02, eps * 0.98).clamp(1e-4, 10.0)
    logw.sum().item()
    _sync(device)
    return K * N * (T - 1) / (time.perf_counter() - t)


def bench_pyro_hmc(device, chains, T, L):
    """Pyro's stock HMC kernel, one chain and one data point at a time, T - 1 transitions each."""
    ex = get_example("linear-vae")
    W, b = ex.params["W"].to(device), ex.params["b"].to(device)
    x = (torch.randn(10, device=device) @ W.T + b + torch.randn(100, device=device))

    def model(beta=0.5):
        z = pyro.sample("z", dist.Normal(torch.zeros(10, device=device), 1.0).to_event(1))
        with poutine.scale(scale=beta):  # the annealed density p(z) p(x|z)^beta at a fixed beta
            pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x)

    from pyro.infer.mcmc import HMC, MCMC

    t = time.perf_counter()
    for _ in range(chains):
        kernel = HMC(model, step_size=0.05, num_steps=L, adapt_step_size=False, full_mass=False)
        MCMC(kernel, num_samples=T - 1, warmup_steps=0, disable_progbar=True).run()
    _sync(device)
    return chains * (T - 1) / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=512, help="K chains per data point")
    p.add_argument("--num-data", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="T annealing steps")
    p.add_argument("--leapfrog", type=int, default=2)
    p.add_argument("--pyro-chains", type=int, default=3, help="chains run with Pyro's HMC (extrapolated)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    K, N, T, L = args.chains, args.num_data, args.steps, args.leapfrog
    print(f"linear-vae (D=10, obs 100), K={K} chains x N={N} data, T={T}, L={L}, {args.threads} threads")
    print(f"{'device':6} {'implementation':14} {'chain-steps/s':>14} {'pyro_mi / this':>15}")
    for dev in devices:
        ours = bench_pyro_mi(dev, K, N, T, L)
        plain = bench_plain(dev, K, N, T, L)
        stock = bench_pyro_hmc(dev, args.pyro_chains, T, L)
        for name, rate in (("pyro_mi", ours), ("plain torch", plain), ("pyro HMC", stock)):
            print(f"{dev.type:6} {name:14} {rate:14.0f} {ours / rate:15.2f}")


if __name__ == "__main__":
    main()
