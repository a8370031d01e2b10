"""AIS throughput: pyro_mi against hand-written vectorised AIS loops doing the same work.

Every row anneals the same K x N chains (K = 16 chains per point, N points simulated from
the example) from the prior p(z) to p(x, z) along the same linear schedule, T steps,
L leapfrog steps per HMC transition, with one evaluation of both log densities and their
gradients per leapfrog step, per-chain Metropolis accept, and per-chain step sizes
adapted after every transition by the paper's rule (x1.02 above 65% acceptance, /1.02
below; App. O.1.2). The plain loops draw their momenta and uniforms from a
``torch.Generator`` in the same order as :func:`pyro_mi.samplers.hmc.step`, so every row
makes the same moves: the mean log weight column shows it (equal up to float rounding).

Rows (chain-steps per second, a chain-step being one transition of one chain):

* ``pyro_mi none``: :func:`pyro_mi.samplers.anneal` on the components of ``ais_bounds``
  (a Pyro trace of the model per leapfrog step);
* ``pyro_mi trace``: the same with ``compile="trace"`` (the transition recorded once per
  shape by :mod:`pyro_mi.samplers.compile`; recording happens in the warm-up run);
* ``distributions``: a plain torch loop, densities by ``torch.distributions``, gradients by
  ``torch.autograd.grad``;
* ``expressions``: the same loop with the densities written as tensor expressions;
* ``hand``: the same loop with hand-derived gradients (no autograd): the floor.

Examples: ``linear-vae`` (z in R^10, x in R^100, x ~ N(Wz + b, I)) and ``digits-vae``
(z in R^8, x ~ N(sigmoid(MLP(z)), sigma^2 I_64), MLP 8 -> 128 softplus -> 64). Timings
are the best of ``--repeats`` interleaved runs after a warm-up, on one CPU thread by
default; all ratios are measured in this process. The goals of issue 13 are printed
with the table. The end-to-end section times, in fresh processes (best of 3),
``import torch``, ``import pyro_mi`` and the README's first command. Usage::

    python benchmarks/ais_throughput.py [--examples linear-vae digits-vae] [--sizes 16 128 1024 8192 65536]
        [--steps 20] [--leapfrog 2] [--repeats 3] [--threads 1] [--device cpu] [--no-e2e]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_mi.bounds.ais import components_fn
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.examples.digits_vae import load_digits_vae
from pyro_mi.proposal import PriorProposal
from pyro_mi.samplers import StepSizeAdapter, anneal, compile_components, get_schedule

K = 16
STEP_SIZE = 0.05
LOG_2PI = math.log(2 * math.pi)


def linear_parts(device):
    """(distributions, expressions, hand) parts functions of the linear-vae example."""
    ex = get_example("linear-vae")
    W, b = ex.params["W"].to(device), ex.params["b"].to(device)
    D, O = W.shape[1], W.shape[0]
    prior = torch.distributions.Normal(torch.zeros(D, device=device), 1.0)

    def dist_parts(z, x):
        return _autograd(z, lambda z: (prior.log_prob(z).sum(-1),
                                       torch.distributions.Normal(z @ W.T + b, 1.0).log_prob(x).sum(-1)))

    def expr_parts(z, x):
        return _autograd(z, lambda z: (-0.5 * (z * z).sum(-1) - 0.5 * D * LOG_2PI,
                                       -0.5 * ((x - z @ W.T - b) ** 2).sum(-1) - 0.5 * O * LOG_2PI))

    def hand_parts(z, x):
        r = x - (z @ W.T + b)
        return -0.5 * (z * z).sum(-1) - 0.5 * D * LOG_2PI, -0.5 * (r * r).sum(-1) - 0.5 * O * LOG_2PI, -z, r @ W

    zeros = torch.zeros(D, device=device)

    def model(x=None):  # the example's model with its tensors on `device`
        z = pyro.sample("z", pyro.distributions.Normal(zeros, 1.0).to_event(1))
        return pyro.sample("x", pyro.distributions.Normal(z @ W.T + b, 1.0).to_event(1), obs=x)

    return model, {"distributions": dist_parts, "expressions": expr_parts, "hand": hand_parts}


def digits_parts(device):
    """(distributions, expressions, hand) parts functions of the digits-vae example."""
    vae = load_digits_vae()
    dec = vae.decoder.to(device)
    W1, b1 = dec.net[0].weight, dec.net[0].bias
    W2, b2 = dec.net[2].weight, dec.net[2].bias
    sigma = dec.obs_scale().detach()
    D, O = W1.shape[1], W2.shape[0]
    prior = torch.distributions.Normal(torch.zeros(D, device=device), 1.0)
    zeros = torch.zeros(D, device=device)

    def model(x=None):
        z = pyro.sample("z", pyro.distributions.Normal(zeros, 1.0).to_event(1))
        return pyro.sample("x", pyro.distributions.Normal(dec(z), dec.obs_scale()).to_event(1), obs=x)

    def mean(z):
        return torch.sigmoid(F.softplus(z @ W1.T + b1) @ W2.T + b2)

    def dist_parts(z, x):
        return _autograd(z, lambda z: (prior.log_prob(z).sum(-1),
                                       torch.distributions.Normal(mean(z), sigma).log_prob(x).sum(-1)))

    def expr_parts(z, x):
        c = O * (torch.log(sigma) + 0.5 * LOG_2PI)
        return _autograd(z, lambda z: (-0.5 * (z * z).sum(-1) - 0.5 * D * LOG_2PI,
                                       -0.5 * (((x - mean(z)) / sigma) ** 2).sum(-1) - c))

    def hand_parts(z, x):  # backpropagation through the MLP written out
        a1 = z @ W1.T + b1
        m = torch.sigmoid(F.softplus(a1) @ W2.T + b2)
        r = (x - m) / sigma
        d2 = r / sigma * m * (1 - m)
        g = (d2 @ W2) * torch.sigmoid(a1) @ W1
        ll = -0.5 * (r * r).sum(-1) - O * (torch.log(sigma) + 0.5 * LOG_2PI)
        return -0.5 * (z * z).sum(-1) - 0.5 * D * LOG_2PI, ll, -z, g

    with torch.no_grad():
        return model, {"distributions": dist_parts, "expressions": expr_parts, "hand": hand_parts}


def _autograd(z, densities):
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        lp, ll = densities(z)
        gp, gl = torch.autograd.grad(lp.sum(), z, retain_graph=True)[0], torch.autograd.grad(ll.sum(), z)[0]
    return lp.detach(), ll.detach(), gp, gl


EXAMPLES = {"linear-vae": linear_parts, "digits-vae": digits_parts}


def plain_ais(parts, x, z0, betas, L, generator):
    """The hand-written loop: returns the final log weights (K, N)."""
    z = z0
    eps = torch.full(z.shape[:2], STEP_SIZE, device=z.device)
    lp, ll, gp, gl = parts(z, x)
    logw = torch.zeros(z.shape[:2], device=z.device)
    T = betas.numel() - 1
    for j in range(1, T + 1):
        logw = logw + (betas[j] - betas[j - 1]) * ll
        if j == T:
            break
        beta = betas[j]
        e = eps.unsqueeze(-1)
        r0 = torch.randn(z.shape, generator=generator, device=z.device)
        u = torch.rand(z.shape[:2], generator=generator, device=z.device)
        zn, r = z, r0 + 0.5 * e * (gp + beta * gl)
        for i in range(L):
            zn = zn + e * r
            lpn, lln, gpn, gln = parts(zn, x)
            r = r + (e if i < L - 1 else 0.5 * e) * (gpn + beta * gln)
        dh = -(lpn + beta * lln) + 0.5 * (r * r).sum(-1) + (lp + beta * ll) - 0.5 * (r0 * r0).sum(-1)
        acc = torch.exp(torch.clamp(-dh, max=0.0)).nan_to_num(0.0)
        a = u < acc
        a3 = a.unsqueeze(-1)
        z, lp, ll = torch.where(a3, zn, z), torch.where(a, lpn, lp), torch.where(a, lln, ll)
        gp, gl = torch.where(a3, gpn, gp), torch.where(a3, gln, gl)
        eps = torch.where(acc > 0.65, eps * 1.02, eps / 1.02).clamp(1e-4, 10.0)
    return logw


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_size(name, device, KN, T, L, repeats):
    """{row: (best chain-steps/s, mean log weight)} at K x N = KN."""
    model, parts = EXAMPLES[name](device)
    N = max(1, KN // K)
    density = ModelDensity(model, "x")
    pyro.set_rng_seed(0)
    x_dict, _ = density.sample(N)
    x = x_dict["x"]
    z0 = torch.randn(K, N, density.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)
    betas = get_schedule("linear", T).to(device)
    comps = components_fn(density, PriorProposal(density), x_dict)
    rev = torch.zeros(K, dtype=torch.bool, device=device)
    rows = {}
    for mode in ("none", "trace"):
        c = compile_components(comps, mode)

        def ours(c=c):
            g = torch.Generator(device=device).manual_seed(2)
            with torch.no_grad(), pyro.validation_enabled(False):
                return anneal(c, z0, rev, betas, STEP_SIZE, L, g,
                              adapter=StepSizeAdapter("multiplicative", 1.02)).log_weights
        rows[f"pyro_mi {mode}"] = ours
    for label, fn in parts.items():
        rows[label] = lambda fn=fn: plain_ais(fn, x, z0, betas, L, torch.Generator(device=device).manual_seed(2))
    best, logw = {}, {}
    for f in rows.values():  # warm-up: first-call costs and recording (the transition on the first run,
        for _ in range(4):    # the evaluation of hmc.init on the fourth)
            f()
    for _ in range(repeats):
        for label, f in rows.items():
            _sync(device)
            t = time.perf_counter()
            lw = f()
            _sync(device)
            best[label] = min(best.get(label, math.inf), time.perf_counter() - t)
            logw[label] = float(lw.mean())
    return {label: (K * N * (T - 1) / best[label], logw[label]) for label in rows}


def end_to_end(repeats=3):
    """Best wall seconds of fresh processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmds = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import pyro_mi'": [sys.executable, "-c", "import pyro_mi"],
        "pyro-mi estimate --example digits-vae --method iwae": [
            sys.executable, "-m", "pyro_mi.cli", "estimate", "--example", "digits-vae", "--method", "iwae"],
    }
    out = {}
    for label, cmd in cmds.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        out[label] = min(times)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 128, 1024, 8192, 65536], help="K x N (K = 16)")
    ap.add_argument("--steps", type=int, default=20, help="T annealing steps (T - 1 transitions)")
    ap.add_argument("--leapfrog", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end timings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"AIS throughput, K = {K} chains x N points, T = {args.steps}, L = {args.leapfrog}, prior as pi0, "
          f"{args.threads} thread(s), {device}; torch {torch.__version__}")
    goals = []
    for name in args.examples:
        print(f"\n{name}: chain-steps/s (mean log weight), and pyro_mi trace / each row")
        print("| K·N | pyro_mi none | pyro_mi trace | distributions | expressions | hand | trace/none | "
              "trace/distributions | trace/expressions | trace/hand |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for KN in args.sizes:
            r = run_size(name, device, KN, args.steps, args.leapfrog, args.repeats)
            ours = r["pyro_mi trace"][0]
            cells = " | ".join(f"{r[k][0]:,.0f} ({r[k][1]:.2f})" for k in
                               ("pyro_mi none", "pyro_mi trace", "distributions", "expressions", "hand"))
            ratios = " | ".join(f"{ours / r[k][0]:.2f}" for k in ("pyro_mi none", "distributions", "expressions", "hand"))
            print(f"| {KN:,} | {cells} | {ratios} |", flush=True)
            goals.append((name, KN, ours / r["expressions"][0], ours / r["hand"][0]))
    print("\ngoals: pyro_mi >= 1.0x the expressions loop at every size; >= 0.6x the hand loop from K·N = 1,024 up")
    for name, KN, e, h in goals:
        ok_e = "met" if e >= 1.0 else "NOT met"
        ok_h = "n/a" if KN < 1024 else ("met" if h >= 0.6 else "NOT met")
        print(f"  {name:10} K·N = {KN:>6,}: {e:.2f}x expressions ({ok_e}), {h:.2f}x hand ({ok_h})")
    if not args.no_e2e:
        print("\nend to end, fresh processes, OMP_NUM_THREADS=1, best of 3 (goal: README command < 3 s on a quiet machine)")
        for label, s in end_to_end().items():
            print(f"  {s:6.2f} s  {label}")


if __name__ == "__main__":
    main()
