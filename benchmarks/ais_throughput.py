"""AIS throughput on the linear-vae example: pyro_mi against Pyro's stock HMC and hand-written torch loops.

Every row does the same work on the same simulated data: K chains per data point for
N data points, T annealing steps (T - 1 HMC transitions per chain) and L leapfrog steps
per transition, with exactly one gradient evaluation of the log density per leapfrog
step, per-chain Metropolis accept/reject and per-chain step sizes adapted towards 65%
acceptance (x1.02 / x0.98, clamped). Rates are chain-steps per second (one chain-step =
one HMC transition of one chain for one data point):

* ``pyro_mi``: :func:`pyro_mi.samplers.anneal` through the density layer (one Pyro
  trace of the model per leapfrog step, every chain and data point in one tensor), as
  run by the ``ais`` bounds (per-step statistics not recorded);
* ``torch autograd``: the baseline of the goal, a straightforward hand-written AIS
  loop: the same densities written with ``torch.distributions`` and differentiated
  with ``torch.autograd.grad`` (log prior and log likelihood and both gradients kept
  at the current state, as pyro_mi does, so one gradient evaluation per leapfrog step);
* ``torch analytic``: the same loop with hand-derived gradients of the
  linear-Gaussian densities (no autograd): a reference for the floor, not a goal;
* ``pyro HMC``: ``pyro.infer.mcmc.HMC`` / ``MCMC`` (its kernel takes one state and
  cannot run many chains in one tensor) on the one-data-point model at a fixed beta,
  one chain at a time, without step-size adaptation. Its rate is the marginal cost
  of a transition, (T - 2) transitions / (time of T - 1 transitions - time of 1), so
  the per-chain set-up of ``MCMC`` does not inflate the ratio; a few chains are run
  and the rate is per chain-step.

pyro_mi runs the user's model through Pyro (a trace per leapfrog step), yet it can beat
the autograd loop: the density layer evaluates ``Normal`` sites without materialising the
scale terms at the full broadcast shape (:func:`pyro_mi.density.site_log_prob`), which
torch's ``Normal.log_prob`` does. With few chains (say K x N < 1000) the Python cost of a
Pyro trace (about 0.7 ms) dominates and the plain loops are faster; AIS is meant to run
many chains at once.

Each row is timed ``--repeats`` times, interleaved with the others (the CPU may be
shared), and the best and the median rates are shown; ratios use the best rates,
all measured in this process. Usage::

    python benchmarks/ais_throughput.py [--chains 512] [--num-data 8] [--steps 20]
        [--leapfrog 2] [--threads 1] [--repeats 5] [--pyro-chains 3] [--no-cuda]

Runs on CPU, and on CUDA too when available.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_mi.bounds.ais import components_fn
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import PriorProposal
from pyro_mi.samplers import StepSizeAdapter, anneal, get_schedule

STEP_SIZE = 0.05


class Problem:
    """The linear-vae example on one device: W, b, a pyro_mi density, N simulated x and K x N prior draws."""

    def __init__(self, device, K, N, T, L):
        ex = get_example("linear-vae")
        self.device, self.K, self.N, self.T, self.L = device, K, N, T, L
        W, b = ex.params["W"].to(device), ex.params["b"].to(device)
        self.W, self.b = W, b
        self.latent_dim, self.obs_dim = W.shape[1], W.shape[0]
        loc0 = torch.zeros(self.latent_dim, device=device)
        scale0 = torch.ones(self.latent_dim, device=device)

        def model(x=None):  # the example's model with its tensors on `device`
            z = pyro.sample("z", dist.Normal(loc0, scale0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x)

        self.model = model
        self.density = ModelDensity(model, "x")
        pyro.set_rng_seed(0)
        x, _ = self.density.sample(N)
        self.x_dict, self.x = x, x["x"]
        self.z0 = torch.randn(K, N, self.latent_dim, device=device)
        self.betas = get_schedule("linear", T)

    def rate(self, seconds: float) -> float:
        return self.K * self.N * (self.T - 1) / seconds


def time_pyro_mi(p: Problem) -> float:
    comps = components_fn(p.density, PriorProposal(p.density), p.x_dict)
    rev = torch.zeros(p.K, dtype=torch.bool, device=p.device)
    torch.manual_seed(1)
    _sync(p.device)
    t = time.perf_counter()
    # the paper's per-chain multiplicative rule, as in the plain loops below (equal work)
    gen = torch.Generator(device=p.device).manual_seed(1)
    st = anneal(comps, p.z0, rev, p.betas, STEP_SIZE, p.L, gen, adapter=StepSizeAdapter("multiplicative", 1.02))
    st.log_weights.sum().item()
    _sync(p.device)
    return time.perf_counter() - t


def _plain_ais(p: Problem, parts) -> float:
    """The hand-written AIS loop; ``parts(z) -> (log p(z), log p(x|z), their gradients)``."""
    betas = p.betas.to(device=p.device, dtype=p.z0.dtype)
    torch.manual_seed(1)
    _sync(p.device)
    t = time.perf_counter()
    z = p.z0
    eps = torch.full(z.shape[:2], STEP_SIZE, device=p.device)
    lp, ll, gp, gl = parts(z)
    logw = torch.zeros(z.shape[:2], device=p.device)
    for j in range(1, p.T + 1):
        logw = logw + (betas[j] - betas[j - 1]) * ll  # eq. 12, pi0 = prior
        if j == p.T:
            break
        beta = betas[j]
        e = eps.unsqueeze(-1)
        r0 = torch.randn_like(z)
        zn, r = z, r0 + 0.5 * e * (gp + beta * gl)
        for i in range(p.L):
            zn = zn + e * r
            lpn, lln, gpn, gln = parts(zn)
            r = r + (0.5 if i == p.L - 1 else 1.0) * e * (gpn + beta * gln)
        dh = -(lpn + beta * lln) + 0.5 * (r * r).sum(-1) + (lp + beta * ll) - 0.5 * (r0 * r0).sum(-1)
        acc = torch.exp(torch.clamp(-dh, max=0.0)).nan_to_num(0.0)
        a = torch.rand_like(acc) < acc
        a3 = a.unsqueeze(-1)
        z = torch.where(a3, zn, z)
        lp, ll = torch.where(a, lpn, lp), torch.where(a, lln, ll)
        gp, gl = torch.where(a3, gpn, gp), torch.where(a3, gln, gl)
        eps = torch.where(acc > 0.65, eps * 1.02, eps * 0.98).clamp(1e-4, 10.0)
    logw.sum().item()
    _sync(p.device)
    return time.perf_counter() - t


def time_torch_analytic(p: Problem) -> float:
    """Hand-derived log densities and gradients of the linear-Gaussian model."""
    W, b, x = p.W, p.b, p.x
    c_prior = 0.5 * p.latent_dim * math.log(2 * math.pi)
    c_lik = 0.5 * p.obs_dim * math.log(2 * math.pi)

    def parts(z):
        r = x - (z @ W.T + b)
        return -0.5 * (z * z).sum(-1) - c_prior, -0.5 * (r * r).sum(-1) - c_lik, -z, r @ W

    return _plain_ais(p, parts)


def time_torch_autograd(p: Problem) -> float:
    """The densities written with torch.distributions, gradients by torch.autograd.grad."""
    W, b, x = p.W, p.b, p.x
    prior = torch.distributions.Normal(torch.zeros(p.latent_dim, device=p.device), 1.0)

    def parts(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lp = prior.log_prob(z).sum(-1)
            ll = torch.distributions.Normal(z @ W.T + b, 1.0).log_prob(x).sum(-1)
            # two backward passes over disjoint parts of the graph (prior, likelihood)
            (gl,) = torch.autograd.grad(ll.sum(), z)
            (gp,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), ll.detach(), gp, gl

    return _plain_ais(p, parts)


def time_pyro_hmc(p: Problem, chains: int, T: int | None = None) -> float:
    """Seconds per chain-step of Pyro's stock HMC: marginal cost of a transition, one chain at a time."""
    from pyro.infer.mcmc import HMC, MCMC

    W, b, x = p.W, p.b, p.x[0]
    loc0 = torch.zeros(p.latent_dim, device=p.device)

    def model(beta=0.5):
        z = pyro.sample("z", dist.Normal(loc0, 1.0).to_event(1))
        with poutine.scale(scale=beta):  # the annealed density p(z) p(x|z)^beta at a fixed beta
            pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x)

    def run(num_samples):
        pyro.set_rng_seed(2)
        _sync(p.device)
        t = time.perf_counter()
        for _ in range(chains):
            kernel = HMC(model, step_size=STEP_SIZE, num_steps=p.L, adapt_step_size=False, full_mass=False)
            MCMC(kernel, num_samples=num_samples, warmup_steps=0, disable_progbar=True).run()
        _sync(p.device)
        return time.perf_counter() - t

    T = T or p.T
    full, one = run(T - 1), run(1)
    return max(full - one, 1e-9) / (chains * (T - 2))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=512, help="K chains per data point")
    ap.add_argument("--num-data", type=int, default=8, help="N data points")
    ap.add_argument("--steps", type=int, default=20, help="T annealing steps (T - 1 HMC transitions)")
    ap.add_argument("--leapfrog", type=int, default=2, help="L leapfrog steps per transition")
    ap.add_argument("--pyro-chains", type=int, default=3, help="chains run with Pyro's stock HMC")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (best and median shown)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-cuda", action="store_true", help="CPU only")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3")
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    K, N, T, L = args.chains, args.num_data, args.steps, args.leapfrog
    print(
        f"linear-vae (latent 10, obs 100), K={K} chains x N={N} data, T={T} (T-1 transitions), L={L}, "
        f"{args.threads} CPU thread(s), best and median of {args.repeats}; torch {torch.__version__}"
    )
    header = f"{'device':6} {'implementation':15} {'best chain-steps/s':>18} {'median':>10} {'pyro_mi / this':>15}"
    for dev in devices:
        p = Problem(dev, K, N, T, L)
        rows = {"pyro_mi": [], "torch autograd": [], "torch analytic": [], "pyro HMC": []}
        # warm-up (first-call costs), then interleaved timed runs
        time_pyro_mi(p), time_torch_autograd(p), time_torch_analytic(p)
        for _ in range(args.repeats):
            rows["pyro_mi"].append(p.rate(time_pyro_mi(p)))
            rows["torch autograd"].append(p.rate(time_torch_autograd(p)))
            rows["torch analytic"].append(p.rate(time_torch_analytic(p)))
        for _ in range(max(1, min(args.repeats, 3))):
            rows["pyro HMC"].append(1.0 / time_pyro_hmc(p, args.pyro_chains))
        ours = max(rows["pyro_mi"])
        if dev.type == "cuda":
            print(f"cuda device: {torch.cuda.get_device_name(dev)}")
        print(header)
        for name, rates in rows.items():
            best = max(rates)
            print(f"{dev.type:6} {name:15} {best:18.0f} {statistics.median(rates):10.0f} {ours / best:15.2f}")
        print(
            f"goals ({dev.type}): pyro_mi / pyro HMC = {ours / max(rows['pyro HMC']):.0f} (>= 300); "
            f"pyro_mi / torch autograd = {ours / max(rows['torch autograd']):.2f} (>= 1)"
        )


if __name__ == "__main__":
    main()
